# SPDX-License-Identifier: Apache-2.0
"""Load Google's ImageNet-21k R50+ViT-B/16 ``.npz`` checkpoint into a :class:`~networks.nets.transunet.TransUNet`."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from networks.blocks.vit import resize_position_embedding

if TYPE_CHECKING:
    from networks.nets.transunet import TransUNet

__all__ = ["load_vit_r50_npz"]


class _NpzReader:
    """Reads arrays by name and checks each against the shape that the model expects."""

    def __init__(self, arrays: dict[str, np.ndarray], path: str) -> None:
        self.arrays = arrays
        self.path = path
        self.used: set[str] = set()

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.arrays:
            raise KeyError(f"'{key}' is missing from {self.path}.")
        array = self.arrays[key]
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"'{key}' in {self.path} has shape {tuple(array.shape)}, the model needs {tuple(shape)}.")
        self.used.add(key)
        return array

    def vector(self, key: str, size: int) -> np.ndarray:
        """A 1-D parameter; norm scales and biases may be stored with leading singleton axes."""
        array = self.arrays.get(key)
        if array is not None and array.ndim > 1 and array.size == size:
            return self.get(key, array.shape).reshape(size)
        return self.get(key, (size,))

    def conv(self, key: str, conv: nn.Conv2d) -> np.ndarray:
        """A conv kernel stored HWIO, returned OIHW."""
        out_ch, in_ch, kh, kw = conv.weight.shape
        return self.get(key, (kh, kw, in_ch, out_ch)).transpose(3, 2, 0, 1)

    def dense(self, key: str, linear: nn.Linear) -> np.ndarray:
        """A dense kernel stored (in, out), returned (out, in)."""
        out_features, in_features = linear.weight.shape
        return self.get(key, (in_features, out_features)).T


def _position_embedding(reader: _NpzReader, key: str, hidden_size: int, grid: list[int]) -> torch.Tensor:
    """Drop the class token if present and resize the square token grid of the checkpoint to ``grid``."""
    if key not in reader.arrays:
        raise KeyError(f"'{key}' is missing from {reader.path}.")
    array = reader.arrays[key]
    n_tokens = array.shape[1] if array.ndim == 3 else 0
    has_class_token = int(math.isqrt(n_tokens) ** 2 != n_tokens)
    side = math.isqrt(n_tokens - has_class_token)
    if side == 0 or tuple(array.shape) != (1, has_class_token + side * side, hidden_size):
        raise ValueError(
            f"'{key}' in {reader.path} has shape {tuple(array.shape)}, the model needs "
            f"(1, [1 +] side * side, {hidden_size})."
        )
    reader.used.add(key)
    embedding = torch.from_numpy(array[:, has_class_token:].astype(np.float32))
    if [side, side] != grid:
        embedding = resize_position_embedding(embedding, [side, side], grid, mode="bilinear")
    return embedding


def load_vit_r50_npz(model: TransUNet, path: str | os.PathLike) -> list[str]:
    """Copy the ImageNet-21k R50+ViT-B/16 weights from a local ``.npz`` file into ``model``'s encoder.

    The file is ``R50+ViT-B_16.npz`` from Google's ViT model release (bucket ``vit_models``, path
    ``imagenet21k/R50+ViT-B_16.npz``), the checkpoint the official TransUNet README asks for; nothing is
    downloaded here.  It fits the default R50-ViT-B/16 configuration with ``in_channels=3`` (repeat grey images
    to 3 channels); a smaller model only takes the file if every shape it reads matches.

    Loaded: the ResNet (``conv_root``, ``gn_root``, ``block{s}/unit{u}/{conv,gn}{1,2,3,_proj}``), the patch
    embedding (``embedding``), the position embedding (``Transformer/posembed_input/pos_embedding``; the class
    token is dropped and the square grid bilinearly resized to the model's grid), every transformer layer
    (``Transformer/encoderblock_{i}/...``) and ``Transformer/encoder_norm``.  Conv kernels are converted from
    HWIO to OIHW and dense kernels transposed; the per-head query/key/value kernels ``(hidden, heads, head_dim)``
    and the output kernel ``(heads, head_dim, hidden)`` are flattened to ``(hidden, hidden)`` and transposed,
    and q, k, v are stacked into the fused ``qkv`` layer.  The decoder and the head keep their initialisation.

    Every array is checked before any parameter changes, so a failed load leaves the model untouched.

    Args:
        model: the :class:`~networks.nets.transunet.TransUNet` to fill.
        path: local path of the ``.npz`` file.

    Returns:
        The sorted names in the file that were not used (for the released file: ``cls``, ``head/*`` and
        ``pre_logits/*`` if present, and units beyond the model's ``resnet_block_units``).

    Raises:
        KeyError: a name that the model needs is missing; the message names it.
        ValueError: an array's shape does not fit the model; the message names it and both shapes.
    """
    path = os.fspath(path)
    with np.load(path) as npz:
        reader = _NpzReader({key: npz[key] for key in npz.files}, path)
    pairs: list[tuple[torch.Tensor, np.ndarray | torch.Tensor]] = []
    hidden = model.transformer.norm.normalized_shape[0]

    resnet = model.resnet
    pairs.append((resnet.root_conv.weight, reader.conv("conv_root/kernel", resnet.root_conv)))
    pairs.append((resnet.root_norm.weight, reader.vector("gn_root/scale", resnet.root_norm.num_channels)))
    pairs.append((resnet.root_norm.bias, reader.vector("gn_root/bias", resnet.root_norm.num_channels)))
    for s, stage in enumerate(resnet.stages, start=1):
        for u, unit in enumerate(stage, start=1):
            prefix = f"block{s}/unit{u}"
            convs = [("1", unit.conv1, unit.norm1), ("2", unit.conv2, unit.norm2), ("3", unit.conv3, unit.norm3)]
            if isinstance(unit.shortcut, nn.Sequential):
                convs.append(("_proj", unit.shortcut.conv, unit.shortcut.norm))
            for suffix, conv, norm in convs:
                pairs.append((conv.weight, reader.conv(f"{prefix}/conv{suffix}/kernel", conv)))
                pairs.append((norm.weight, reader.vector(f"{prefix}/gn{suffix}/scale", norm.num_channels)))
                pairs.append((norm.bias, reader.vector(f"{prefix}/gn{suffix}/bias", norm.num_channels)))

    pairs.append((model.patch_embedding.weight, reader.conv("embedding/kernel", model.patch_embedding)))
    pairs.append((model.patch_embedding.bias, reader.vector("embedding/bias", hidden)))
    position = model.position_embedding
    pos_key = "Transformer/posembed_input/pos_embedding"
    pairs.append((position.position_embedding, _position_embedding(reader, pos_key, hidden, position.grid_size)))

    for i, block in enumerate(model.transformer.blocks):
        prefix = f"Transformer/encoderblock_{i}"
        attn = block.attn
        head_shape = (attn.num_heads, attn.head_dim)
        qkv_weight, qkv_bias = [], []
        for name in ("query", "key", "value"):
            key = f"{prefix}/MultiHeadDotProductAttention_1/{name}"
            qkv_weight.append(reader.get(f"{key}/kernel", (hidden, *head_shape)).reshape(hidden, hidden).T)
            qkv_bias.append(reader.get(f"{key}/bias", head_shape).reshape(hidden))
        pairs.append((attn.qkv.weight, np.concatenate(qkv_weight, axis=0)))
        pairs.append((attn.qkv.bias, np.concatenate(qkv_bias, axis=0)))
        key = f"{prefix}/MultiHeadDotProductAttention_1/out"
        out_kernel = reader.get(f"{key}/kernel", (*head_shape, hidden))
        pairs.append((attn.out_proj.weight, out_kernel.reshape(hidden, hidden).T))
        pairs.append((attn.out_proj.bias, reader.vector(f"{key}/bias", hidden)))
        for name, linear in (("Dense_0", block.mlp.linear1), ("Dense_1", block.mlp.linear2)):
            key = f"{prefix}/MlpBlock_3/{name}"
            pairs.append((linear.weight, reader.dense(f"{key}/kernel", linear)))
            pairs.append((linear.bias, reader.vector(f"{key}/bias", linear.out_features)))
        for name, norm in (("LayerNorm_0", block.norm1), ("LayerNorm_2", block.norm2)):
            pairs.append((norm.weight, reader.vector(f"{prefix}/{name}/scale", hidden)))
            pairs.append((norm.bias, reader.vector(f"{prefix}/{name}/bias", hidden)))
    encoder_norm = model.transformer.norm
    pairs.append((encoder_norm.weight, reader.vector("Transformer/encoder_norm/scale", hidden)))
    pairs.append((encoder_norm.bias, reader.vector("Transformer/encoder_norm/bias", hidden)))

    with torch.no_grad():
        for parameter, value in pairs:
            value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            parameter.copy_(value.reshape(parameter.shape))
    return sorted(set(reader.arrays) - reader.used)
