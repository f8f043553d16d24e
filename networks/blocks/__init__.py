# SPDX-License-Identifier: Apache-2.0
"""Reusable blocks: shared conv/norm blocks, the D-Net large-kernel and fusion blocks, CSAM, KAN layers, ResNetV2
and ViT layers."""

from __future__ import annotations

from .common import ChannelLayerNorm, ConvBlock
from .csam import CSAM
from .dff import DFF
from .dlk import DLK, DepthwiseConvMlp, DLKAttention, DLKBlock
from .kan import KANConv, KANLinear, b_spline_bases, make_uniform_grid
from .resnetv2 import ResNetV2, ResNetV2Bottleneck, StdConv2d, StdConv3d, std_conv
from .vit import GridPositionEmbedding, MultiHeadSelfAttention, ViTEncoder, ViTEncoderBlock, resize_position_embedding

__all__ = [
    "CSAM",
    "DFF",
    "DLK",
    "DLKAttention",
    "DLKBlock",
    "ChannelLayerNorm",
    "ConvBlock",
    "DepthwiseConvMlp",
    "KANConv",
    "KANLinear",
    "b_spline_bases",
    "make_uniform_grid",
    "ResNetV2",
    "ResNetV2Bottleneck",
    "StdConv2d",
    "StdConv3d",
    "std_conv",
    "GridPositionEmbedding",
    "MultiHeadSelfAttention",
    "ViTEncoder",
    "ViTEncoderBlock",
    "resize_position_embedding",
]
