# SPDX-License-Identifier: Apache-2.0
"""TransUNet: a hybrid CNN-Transformer encoder with a cascaded upsampler (Chen et al., arXiv 2102.04306)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.utils import ensure_tuple_rep

from networks.blocks.fast import FastConv2d, to_channels_last
from networks.blocks.resnetv2 import ResNetV2
from networks.blocks.vit import GridPositionEmbedding, ViTEncoder
from networks.nets.transunet_weights import load_vit_r50_npz
from networks.registry import register_network

__all__ = ["TransUNet", "CascadedUpsampler", "CascadedUpsamplerBlock", "transunet_r50_vit_b16"]

ENCODER_STRIDE = 16


class CascadedUpsamplerBlock(nn.Module):
    """One CUP step: bilinear x2 upsampling, concatenation of an optional skip, two 3x3 conv + BN + ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = Convolution(
            2, in_channels + skip_channels, out_channels, kernel_size=3, norm="batch", act="relu", bias=False
        )
        self.conv2 = Convolution(2, out_channels, out_channels, kernel_size=3, norm="batch", act="relu", bias=False)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CascadedUpsampler(nn.Module):
    """Cascaded upsampler (CUP): a 3x3 conv + BN + ReLU on the token grid, then one block per decoder level.

    ``skip_channels[i]`` is the channel count of the skip joined at level ``i`` (0 for none); ``forward`` takes
    the skips deepest first and leaves the levels beyond ``len(skips)`` without one.
    """

    def __init__(
        self, in_channels: int, head_channels: int, decoder_channels: Sequence[int], skip_channels: Sequence[int]
    ) -> None:
        super().__init__()
        self.conv_more = Convolution(2, in_channels, head_channels, kernel_size=3, norm="batch", act="relu", bias=False)
        block_in_channels = [head_channels] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            CascadedUpsamplerBlock(in_ch, skip_ch, out_ch)
            for in_ch, skip_ch, out_ch in zip(block_in_channels, skip_channels, decoder_channels)
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            skip: Optional[torch.Tensor] = None
            if i < len(skips):
                skip = skips[i]
            x = block(x, skip)
        return x


class TransUNet(nn.Module):
    """TransUNet, "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation" (arXiv 2102.04306).

    The defaults build the paper's R50-ViT-B/16 model (105,277,081 parameters with ``out_channels=9``):

    1. Hybrid encoder, CNN part: ResNet-50 stages 1 to 3 (``resnet_block_units=(3, 4, 9)``) with
       weight-standardised convolutions and GroupNorm (:class:`~networks.blocks.resnetv2.ResNetV2`).  It gives
       skips at 1/2 (64 ch), 1/4 (256 ch) and 1/8 (512 ch) and a 1024-channel map at 1/16.
    2. Hybrid encoder, Transformer part: a 1x1 patch embedding of the 1/16 map to ``hidden_size`` tokens plus
       learned position embeddings, then a ViT-B encoder (12 layers, 12 heads, MLP 3072, final LayerNorm).
    3. Cascaded upsampler: the tokens are reshaped to the 1/16 grid, a 3x3 conv maps them to
       ``decoder_head_channels``, and four bilinear x2 blocks (``decoder_channels``) join the ``n_skip``
       deepest CNN skips.
    4. Segmentation head: a 3x3 conv to ``out_channels`` at full resolution (no activation).

    Differences from the official code (``Beckschen/TransUNet``):

    - Any ``H, W`` divisible by 16 works, square or not.  The position embeddings are learned for the
      ``img_size // 16`` grid and bilinearly interpolated (``align_corners=True``) at forward time for another grid.
    - The stem max pool uses "SAME" padding at the far end, as the Google R50+ViT hybrid whose weights
      :meth:`load_from_npz` loads.  The official code pools to 55x55 at 224 and zero-pads the 1/4 skip back to 56x56.
    - The projection shortcut uses GroupNorm(32, eps=1e-6) like every other norm of the pretrained hybrid, where
      the official port has GroupNorm(C, C).  The parameter count is the same.
    - ``in_channels`` is explicit: the official model repeats 1-channel input to 3 channels inside ``forward``.

    Args:
        in_channels: number of input channels. The pretrained weights need 3 (repeat grey images,
            e.g. with ``monai.transforms.RepeatChannel(repeats=3)``).
        out_channels: number of output channels (classes, background included).
        img_size: the training image size ``(H, W)`` or one int for both. It fixes the grid that the position
            embeddings are learned on; must be divisible by 16.
        hidden_size: transformer width (768 for ViT-B).
        num_layers: number of transformer layers.
        num_heads: number of attention heads; must divide ``hidden_size``.
        mlp_dim: hidden width of the transformer MLP.
        resnet_block_units: number of bottleneck units in each of the three ResNet stages.
        resnet_width_factor: multiplies the ResNet base width of 64 (every stage width must stay divisible by
            the 32 GroupNorm groups, so use at least 0.5).
        decoder_channels: output channels of the four cascaded-upsampler blocks (1/8, 1/4, 1/2, 1/1).
        decoder_head_channels: channels of the 3x3 conv that starts the decoder on the token grid.
        n_skip: number of CNN skips joined by the decoder, 0 to 3, deepest (1/8) first.
        dropout_rate: dropout of the transformer after the position embedding and in the MLPs; 0.1 in the
            official R50-ViT-B/16 configuration.
        attention_dropout_rate: dropout on the attention weights and after the attention projection, as in the
            official code; 0.0 in the official configuration.
        dropout: dropout before the segmentation head, e.g. for Monte-Carlo sampling; 0.0 by default.

    Input ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by 16 (the ``size_divisor`` attribute,
    ``(16, 16)``); output ``(B, out_channels, H, W)`` logits. TransUNet is 2D (``spatial_dims`` attribute 2), so it
    takes no ``spatial_dims`` argument; run it slice by slice on volumes (MONAI ``SliceInferer``).

    TorchScript: ``torch.jit.script`` works; inside scripted code a bad input size raises ``torch.jit.Error``
    whose message starts with ``ValueError``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int = 224,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        resnet_block_units: Sequence[int] = (3, 4, 9),
        resnet_width_factor: float = 1.0,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        decoder_head_channels: int = 512,
        n_skip: int = 3,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        img_size = ensure_tuple_rep(img_size, 2)
        if any(s < ENCODER_STRIDE or s % ENCODER_STRIDE != 0 for s in img_size):
            raise ValueError(f"img_size must be positive multiples of {ENCODER_STRIDE}, got {img_size}.")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        if len(resnet_block_units) != 3:
            raise ValueError(f"resnet_block_units must have 3 entries (output stride 16), got {resnet_block_units}.")
        if len(decoder_channels) != 4:
            raise ValueError(f"decoder_channels must have 4 entries (1/8 to 1/1), got {decoder_channels}.")
        if not 0 <= n_skip <= 3:
            raise ValueError(f"n_skip must be between 0 and 3, got {n_skip}.")
        for name, rate in (
            ("dropout_rate", dropout_rate),
            ("attention_dropout_rate", attention_dropout_rate),
            ("dropout", dropout),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}.")
        self.n_skip = n_skip
        self.spatial_dims = 2
        self.size_divisor = (ENCODER_STRIDE, ENCODER_STRIDE)

        self.resnet = ResNetV2(2, in_channels, resnet_block_units, resnet_width_factor)
        self.patch_embedding = FastConv2d(self.resnet.out_channels[-1], hidden_size, kernel_size=1)
        self.position_embedding = GridPositionEmbedding([s // ENCODER_STRIDE for s in img_size], hidden_size)
        self.embedding_dropout = nn.Dropout(dropout_rate)
        # the official port drops the attention output at the attention-dropout rate, not at dropout_rate as ViT
        self.transformer = ViTEncoder(
            hidden_size,
            num_layers,
            num_heads,
            mlp_dim,
            dropout_rate,
            attention_dropout_rate,
            projection_dropout_rate=attention_dropout_rate,
        )

        skip_channels = self.resnet.out_channels[-2::-1][:n_skip]  # 1/8, 1/4, 1/2
        skip_channels += [0] * (len(decoder_channels) - n_skip)
        self.decoder = CascadedUpsampler(hidden_size, decoder_head_channels, decoder_channels, skip_channels)
        self.dropout = nn.Dropout(dropout)
        self.head = FastConv2d(decoder_channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.size_divisor
        if x.dim() != 4 or x.shape[2] % h != 0 or x.shape[3] % w != 0:
            raise ValueError(f"TransUNet expects input (B, C, H, W), H divisible by {h} and W by {w}, got {x.shape}.")
        if not torch.jit.is_scripting():
            x = to_channels_last(x)  # the layout the CPU kernels are fastest in; see networks.blocks.fast
        features = self.resnet(x)
        grid = self.patch_embedding(features[-1])
        tokens = self.transformer(self.embedding_dropout(self.position_embedding(grid)))
        x = tokens.transpose(1, 2).reshape(grid.shape)

        skips = [features[len(features) - 2 - i] for i in range(self.n_skip)]
        x = self.decoder(x, skips)
        return self.head(self.dropout(x)).contiguous()

    def load_from_npz(self, path: str | os.PathLike) -> list[str]:
        """Load Google's ImageNet-21k ``R50+ViT-B_16.npz`` into the encoder; see :func:`load_vit_r50_npz`."""
        return load_vit_r50_npz(self, path)


@register_network(input_shape=(2, 3, 224, 224))
def transunet_r50_vit_b16(**overrides: Any) -> TransUNet:
    """TransUNet R50-ViT-B/16 as the official train.py builds it: 224x224, 3 input channels, 9 classes (Synapse):
    105,277,081 parameters."""
    return TransUNet(**({"in_channels": 3, "out_channels": 9, "img_size": 224} | overrides))
