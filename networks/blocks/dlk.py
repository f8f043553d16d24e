# SPDX-License-Identifier: Apache-2.0
"""Dynamic Large Kernel (DLK) blocks of D-Net (Yang et al., arXiv 2403.10674), for 2D and 3D."""

from __future__ import annotations

import torch
from monai.networks.layers import DropPath
from monai.networks.layers.factories import Act, Pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from networks.blocks.common import ChannelLayerNorm
from networks.blocks.fast import fast_conv_type

__all__ = ["DepthwiseConvMlp", "DLK", "DLKAttention", "DLKBlock"]


class DepthwiseConvMlp(nn.Sequential):
    """Channel MLP with a depthwise 3x3(x3) conv: 1x1 C->rC, depthwise 3, GELU, 1x1 rC->C."""

    def __init__(self, spatial_dims: int, channels: int, mlp_ratio: int = 4) -> None:
        conv_type = fast_conv_type(spatial_dims)
        hidden = channels * mlp_ratio
        super().__init__(
            conv_type(channels, hidden, kernel_size=1),
            conv_type(hidden, hidden, kernel_size=3, padding=1, groups=hidden),
            Act[Act.GELU](),
            conv_type(hidden, channels, kernel_size=1),
        )


class DLK(nn.Module):
    """
    Dynamic Large Kernel module: two cascaded depthwise large kernels with spatial and channel selection.

    The input (B, C, *spatial) is projected to C/2 channels, passed through a depthwise 5-kernel conv and then
    a depthwise 7-kernel conv with dilation 3 (cascaded receptive field 23). The two branch outputs are
    concatenated (C channels); their channel-mean and channel-max maps go through a 7-kernel conv (2 -> 2) and a
    sigmoid to give two spatial weight maps; a global-average-pooled 1x1 conv and a sigmoid give channel
    weights; the input is added back. The output has the input's shape.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        channels: number of input and output channels; must be even.
        per_branch_selection: if True (the paper and LSK behaviour), spatial map k weights branch k only. If
            False, each map weights the concatenation of both branches and the two products are summed, as in
            the official D-Net code (HEAD); both settings have the same parameters.
    """

    def __init__(self, spatial_dims: int, channels: int, per_branch_selection: bool = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if channels < 2 or channels % 2 != 0:
            raise ValueError(f"DLK needs an even number of channels, got {channels}.")
        conv_type = fast_conv_type(spatial_dims)
        branch_channels = channels // 2
        self.per_branch_selection = per_branch_selection
        self.proj = conv_type(channels, branch_channels, kernel_size=1, bias=False)
        self.small_kernel = conv_type(
            branch_channels, branch_channels, kernel_size=5, padding=2, groups=branch_channels
        )
        self.large_kernel = conv_type(
            branch_channels, branch_channels, kernel_size=7, padding=9, dilation=3, groups=branch_channels
        )
        self.spatial_select = nn.Sequential(conv_type(2, 2, kernel_size=7, padding=3), nn.Sigmoid())
        self.channel_select = nn.Sequential(
            Pool[Pool.ADAPTIVEAVG, spatial_dims](1),
            conv_type(channels, channels, kernel_size=1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = self.small_kernel(self.proj(x))
        large = self.large_kernel(small)
        features = torch.cat([small, large], dim=1)
        pooled = torch.cat([features.mean(dim=1, keepdim=True), features.amax(dim=1, keepdim=True)], dim=1)
        weights = self.spatial_select(pooled)
        if self.per_branch_selection:
            features = torch.cat([small * weights[:, 0:1], large * weights[:, 1:2]], dim=1)
        else:
            features = features * (weights[:, 0:1] + weights[:, 1:2])
        features = features * self.channel_select(features)
        return features + x


class DLKAttention(nn.Module):
    """Spatial gating unit around DLK (VAN/LSK pattern): x + 1x1 conv(DLK(GELU(1x1 conv(x))))."""

    def __init__(self, spatial_dims: int, channels: int, per_branch_selection: bool = True) -> None:
        super().__init__()
        conv_type = fast_conv_type(spatial_dims)
        self.proj_in = conv_type(channels, channels, kernel_size=1)
        self.act = Act[Act.GELU]()
        self.dlk = DLK(spatial_dims, channels, per_branch_selection)
        self.proj_out = conv_type(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.dlk(self.act(self.proj_in(x))))


class DLKBlock(nn.Module):
    """
    DLK block (a ViT-style block with DLK as token mixer), shape-preserving on (B, C, *spatial).

    ``x + drop_path(scale_1 * DLKAttention(LN_1(x)))`` then ``x + drop_path(scale_2 * MLP(LN_2(x)))``, where the
    MLP is :class:`DepthwiseConvMlp` and LN is a channel LayerNorm (eps 1e-6).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        channels: number of channels; must be even.
        mlp_ratio: hidden width of the MLP over ``channels``.
        drop_path: stochastic depth probability of both residual branches.
        layer_scale_init: initial value of the layer-scale vectors.
        per_branch_selection: see :class:`DLK`; True is the paper's behaviour, False the official code's.
        shared_norm: if True, one LayerNorm and one layer-scale vector serve both sub-blocks, as in the official
            D-Net code (HEAD); False (the paper's ViT-style block) gives each sub-block its own.
        use_checkpointing: if True, recompute this block's activations in the backward pass during training
            (torch.utils.checkpoint) to save memory; the result is unchanged.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
        per_branch_selection: bool = True,
        shared_norm: bool = False,
        use_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}.")
        self.use_checkpointing = use_checkpointing
        scale_shape = (channels,) + (1,) * spatial_dims
        self.attn_norm = ChannelLayerNorm(channels)
        self.attn = DLKAttention(spatial_dims, channels, per_branch_selection)
        self.attn_scale = nn.Parameter(torch.full(scale_shape, layer_scale_init))
        self.mlp = DepthwiseConvMlp(spatial_dims, channels, mlp_ratio)
        # None: the MLP sub-block reuses the attention sub-block's norm and scale, as the official code does.
        self.mlp_norm = None if shared_norm else ChannelLayerNorm(channels)
        self.mlp_scale = None if shared_norm else nn.Parameter(torch.full(scale_shape, layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn_scale * self.attn(self.attn_norm(x)))
        if self.mlp_norm is None:
            y = self.attn_norm(x)
        else:
            y = self.mlp_norm(x)
        scale = self.attn_scale if self.mlp_scale is None else self.mlp_scale
        return x + self.drop_path(scale * self.mlp(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript compiles only the branch it can reach when scripting, so checkpoint need not script.
        if self.use_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(self._block, x, use_reentrant=False)
        return self._block(x)
