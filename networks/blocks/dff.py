# SPDX-License-Identifier: Apache-2.0
"""Dynamic Feature Fusion (DFF) of D-Net (Yang et al., arXiv 2403.10674), for 2D and 3D."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Pool
from torch import nn

from networks.blocks.fast import fast_conv_type

__all__ = ["DFF"]


class DFF(nn.Module):
    """
    Dynamic Feature Fusion of a decoder feature with a skip feature of the same shape (B, C, *spatial).

    The two inputs are concatenated (2C); a global-average-pooled 1x1 conv and a sigmoid reweight the 2C
    channels; a 1x1 conv reduces them to C; a spatial gate ``sigmoid(conv_x(x) + conv_skip(skip))`` (two 1x1
    convs to one channel) multiplies the result. The output is (B, C, *spatial).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        channels: number of channels C of each input and of the output.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}.")
        conv_type = fast_conv_type(spatial_dims)
        self.channel_select = nn.Sequential(
            Pool[Pool.ADAPTIVEAVG, spatial_dims](1),
            conv_type(2 * channels, 2 * channels, kernel_size=1, bias=False),
            nn.Sigmoid(),
        )
        self.reduce = conv_type(2 * channels, channels, kernel_size=1, bias=False)
        self.gate_x = conv_type(channels, 1, kernel_size=1)
        self.gate_skip = conv_type(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        fused = torch.cat([x, skip], dim=1)
        fused = self.reduce(fused * self.channel_select(fused))
        return fused * torch.sigmoid(self.gate_x(x) + self.gate_skip(skip))
