# SPDX-License-Identifier: Apache-2.0
"""ResNet with weight-standardised convolutions and GroupNorm, the CNN half of the R50+ViT hybrid encoder."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer

from networks.blocks.fast import FastConv2d, FastConv3d

__all__ = ["StdConv2d", "StdConv3d", "std_conv", "ResNetV2Bottleneck", "ResNetV2"]


def standardize_weight(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero mean, unit variance per output filter (weight standardisation, arXiv 1903.10520)."""
    dims = list(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, unbiased=False, keepdim=True)
    return (weight - mean) / torch.sqrt(var + eps)


class StdConv2d(FastConv2d):
    """2D convolution whose kernel is weight-standardised at every forward pass."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast_forward(x, standardize_weight(self.weight, self.eps))


class StdConv3d(FastConv3d):
    """3D convolution whose kernel is weight-standardised at every forward pass."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast_forward(x, standardize_weight(self.weight, self.eps))


def std_conv(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> StdConv2d | StdConv3d:
    """Bias-free weight-standardised convolution with 'same' padding for odd kernels."""
    conv_type = {2: StdConv2d, 3: StdConv3d}.get(spatial_dims)
    if conv_type is None:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    return conv_type(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class ResNetV2Bottleneck(nn.Module):
    """Bottleneck unit (1x1, 3x3 with stride, 1x1) with StdConv + GroupNorm.

    The order is conv -> norm -> act in every branch and the activation follows the residual sum, as in the
    hybrid ResNet of the ViT paper (Google's ``vit_jax``) and TransUNet, although both call it "ResNetV2";
    it is not the pre-activation order of BiT.  A projection shortcut (StdConv 1x1 + norm) is used when the
    stride or channel count changes.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mid_channels: int,
        stride: int = 1,
        norm: str | tuple = ("group", {"num_groups": 32, "eps": 1e-6}),
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        self.conv1 = std_conv(spatial_dims, in_channels, mid_channels, 1)
        self.norm1 = get_norm_layer(norm, spatial_dims, mid_channels)
        self.conv2 = std_conv(spatial_dims, mid_channels, mid_channels, 3, stride=stride)
        self.norm2 = get_norm_layer(norm, spatial_dims, mid_channels)
        self.conv3 = std_conv(spatial_dims, mid_channels, out_channels, 1)
        self.norm3 = get_norm_layer(norm, spatial_dims, out_channels)
        self.act = get_act_layer(act)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=std_conv(spatial_dims, in_channels, out_channels, 1, stride=stride),
                    norm=get_norm_layer(norm, spatial_dims, out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.act(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return self.act(self.shortcut(x) + y)


class ResNetV2(nn.Module):
    """ResNet stem and bottleneck stages with StdConv + GroupNorm (the R50 of "R50+ViT-B/16", arXiv 2010.11929).

    The stem is a 7x7 stride-2 StdConv, norm and activation, then a 3x3 stride-2 max pool.  Stage ``i``
    has ``block_units[i]`` bottleneck units of width ``width * 2**i`` and output ``width * 4 * 2**i``
    channels, where ``width = int(64 * width_factor)``; the first stage keeps the resolution and each later
    stage halves it.  ``block_units=(3, 4, 9)`` gives ResNet-50's stages 1 to 3 (output stride 16).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: channels of the input image.
        block_units: number of bottleneck units per stage.
        width_factor: multiplies the base width of 64.
        norm: normalisation of every conv; GroupNorm(32, eps=1e-6) as in the pretrained hybrid.
        act: activation.

    Returns from ``forward`` a list ``[stem, stage_1, ..., stage_n]`` of feature maps of shape
    ``(B, C_i, H / s_i, W / s_i[, D / s_i])`` with strides ``s = 2, 4, 8, ...``; the stem output is taken
    before the max pool.  The max pool pads only at the far end ("SAME" padding, via ``ceil_mode``), so
    every spatial size divisible by ``2 ** (len(block_units) + 1)`` is divided exactly.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        block_units: Sequence[int] = (3, 4, 9),
        width_factor: float = 1.0,
        norm: str | tuple = ("group", {"num_groups": 32, "eps": 1e-6}),
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(block_units) == 0 or any(units < 1 for units in block_units):
            raise ValueError(f"block_units must be a non-empty sequence of positive ints, got {block_units}.")
        if width_factor <= 0:
            raise ValueError(f"width_factor must be positive, got {width_factor}.")
        self.width = int(64 * width_factor)
        self.out_channels = [self.width] + [self.width * 4 * 2**i for i in range(len(block_units))]

        self.root_conv = std_conv(spatial_dims, in_channels, self.width, 7, stride=2)
        self.root_norm = get_norm_layer(norm, spatial_dims, self.width)
        self.root_act = get_act_layer(act)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, ceil_mode=True)

        self.stages = nn.ModuleList()
        in_ch = self.width
        for i, units in enumerate(block_units):
            mid_ch, out_ch = self.width * 2**i, self.width * 4 * 2**i
            stage = nn.Sequential()
            for j in range(units):
                stride = 2 if i > 0 and j == 0 else 1
                stage.add_module(
                    f"unit{j + 1}",
                    ResNetV2Bottleneck(spatial_dims, in_ch, out_ch, mid_ch, stride=stride, norm=norm, act=act),
                )
                in_ch = out_ch
            self.stages.append(stage)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.root_act(self.root_norm(self.root_conv(x)))
        features = [x]
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
