# SPDX-License-Identifier: Apache-2.0
"""CSAM U-Net: a 2D U-Net over the slices of a volume with cross-slice attention on its skips (arXiv 2311.04942)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UpSample
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from networks.blocks.common import ConvBlock
from networks.blocks.csam import CSAM
from networks.registry import register_network

__all__ = ["CSAMUNet", "EncoderLevel", "UpBlock", "csam_unet_paper"]


class EncoderLevel(nn.Module):
    """A ConvBlock whose output goes on unchanged and, through the optional CSAM, to the skip connection."""

    def __init__(self, conv: ConvBlock, csam: CSAM | None) -> None:
        super().__init__()
        self.conv = conv
        self.csam = csam

    def forward(self, x: torch.Tensor, num_slices: int, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.conv(x)
        csam = self.csam
        if csam is None:
            return features, features
        return features, csam(features, num_slices, sample)


class UpBlock(nn.Module):
    """Bilinear x2 upsampling and a 3x3 convolution, concatenation with the skip, then a ConvBlock."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, act: str | tuple, norm: str | tuple, bias: bool
    ) -> None:
        super().__init__()
        self.up = UpSample(
            2,
            in_channels,
            in_channels,
            scale_factor=2,
            mode="nontrainable",
            pre_conv=None,
            post_conv=Conv[Conv.CONV, 2](in_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            interp_mode="bilinear",
            align_corners=True,
        )
        self.conv = ConvBlock(2, out_channels + skip_channels, out_channels, norm=norm, act=act, bias=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class CSAMUNet(nn.Module):
    """
    2.5D U-Net with cross-slice attention (CSAM), after Hung et al., "CSAM: A 2.5D Cross-Slice Attention Module for
    Anisotropic Volumetric Medical Image Segmentation", WACV 2024 (arXiv 2311.04942).

    The network takes volumes like a 3D network, so MONAI's inferers can use it unchanged; inside, the slices of
    each volume (along the last axis, D) form the batch of a 2D U-Net:

    - encoder: per level a ConvBlock (2x [3x3 conv, instance norm, LeakyReLU 0.01]) and 2x2 max pooling, widths
      ``channels``; the last level is the bottleneck (no pooling);
    - CSAM (semantic, positional and slice attention, see :class:`networks.blocks.csam.CSAM`) on the skip features
      of every encoder level (the pooled path goes on without it) and on the bottleneck output, as in the paper's
      released code; every attention pools per volume, so volumes of a batch never mix;
    - decoder: per level bilinear x2 upsampling (align_corners=True), a 3x3 convolution to the level's width,
      concatenation with the skip and a ConvBlock;
    - head: dropout and a 1x1 convolution.

    ``use_csam=False`` gives the same 2D U-Net without CSAM (the ablation baseline). Any number of slices D >= 1
    works with the same weights. In eval mode the output is deterministic (the slice attention uses its
    distribution's mean); :meth:`predict_with_uncertainty` draws Monte-Carlo samples of the slice attention.
    Differences from the released code are listed in :class:`networks.blocks.csam.CSAM` (slice attention
    independent of S, reparameterised sampling, deterministic eval); besides, the decoder here has a forward,
    nothing relies on ``squeeze()``, and the semantic MLP keeps at least one hidden unit when C < 16.

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels (classes).
        channels: widths of the encoder levels, the last one being the bottleneck (the released code's
            ``base_num * 2**i`` for ``num_layers`` levels; paper: base 64, 6 levels). H and W must be divisible by
            ``2 ** (len(channels) - 1)`` (the ``size_divisor`` attribute is ``(d, d, 1)`` for H, W, D), and with
            instance norm the bottleneck, ``H * W / 4 ** (len(channels) - 1)``, needs more than one pixel.
        use_csam: apply CSAM; ``False`` gives the plain 2D U-Net.
        semantic: use CSAM's semantic (channel) attention.
        positional: use CSAM's positional (spatial) attention.
        slice_attention: use CSAM's slice attention.
        uncertainty: use the stochastic (low-rank normal) slice attention.
        rank: rank of the slice attention's covariance factor.
        reduction: channel reduction inside CSAM.
        slice_kernel_size: kernel size of CSAM's convolutions along the slice axis.
        act: activation type and arguments.
        norm: normalisation type and arguments.
        bias: whether the convolutions have a bias.
        dropout: dropout probability before the 1x1 head.

    Shapes:
        input ``(B, in_channels, H, W, D)``, output ``(B, out_channels, H, W, D)`` (logits), D the slice axis.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        use_csam: bool = True,
        semantic: bool = True,
        positional: bool = True,
        slice_attention: bool = True,
        uncertainty: bool = True,
        rank: int = 5,
        reduction: int = 16,
        slice_kernel_size: int = 3,
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": False}),
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}.")
        features = tuple(int(f) for f in channels)
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"channels needs at least two positive widths, got {features}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")

        self.out_channels = out_channels
        self.spatial_dims = 3
        divisor = 2 ** (len(features) - 1)
        self.size_divisor = (divisor, divisor, 1)
        self.stochastic = use_csam and slice_attention and uncertainty

        encoder = []
        for level, width in enumerate(features):
            csam = None
            if use_csam:
                csam = CSAM(
                    width,
                    spatial_dims=2,
                    semantic=semantic,
                    positional=positional,
                    slice_attention=slice_attention,
                    uncertainty=uncertainty,
                    rank=rank,
                    reduction=reduction,
                    slice_kernel_size=slice_kernel_size,
                )
            level_in = in_channels if level == 0 else features[level - 1]
            conv = ConvBlock(2, level_in, width, norm=norm, act=act, bias=bias)
            encoder.append(EncoderLevel(conv, csam))
        self.encoder = nn.ModuleList(encoder)
        self.pool = Pool[Pool.MAX, 2](kernel_size=2)
        self.decoder = nn.ModuleList(
            [
                UpBlock(features[level + 1], features[level], features[level], act, norm, bias)
                for level in reversed(range(len(features) - 1))
            ]
        )
        self.dropout = nn.Dropout(dropout)
        self.head = Conv[Conv.CONV, 2](features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, H, W, D)``; the slice attention samples in training mode only."""
        return self._forward(x, self.training)

    def _forward(self, x: torch.Tensor, sample: bool) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"CSAMUNet expects a (B, C, H, W, D) tensor, got shape {list(x.shape)}.")
        volumes, channels, height, width, slices = x.shape
        if height % self.size_divisor[0] != 0 or width % self.size_divisor[1] != 0:
            raise ValueError(
                f"H and W must be divisible by {self.size_divisor[0]} (2 ** (len(channels) - 1)), "
                f"got {[height, width]}; pad the input in-plane."
            )
        # slices of one volume become consecutive entries of the 2D batch
        h = x.permute(0, 4, 1, 2, 3).reshape(volumes * slices, channels, height, width)

        skips: list[torch.Tensor] = []
        for level, encoder_level in enumerate(self.encoder):
            if level > 0:
                h = self.pool(h)
            h, skip = encoder_level(h, slices, sample)
            skips.append(skip)
        h = skips[-1]  # the attended bottleneck
        for level, up_block in enumerate(self.decoder):
            h = up_block(h, skips[-2 - level])
        h = self.head(self.dropout(h))

        return h.reshape(volumes, slices, self.out_channels, height, width).permute(0, 2, 3, 4, 1)

    @torch.jit.export
    def predict_with_uncertainty(
        self, x: torch.Tensor, num_samples: int = 8, measure: str = "entropy"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Monte-Carlo inference: ``num_samples`` passes that each draw the slice attention from its distribution.

        Call it in eval mode (dropout, if any, follows the module's mode). Runs without gradients.

        Args:
            x: ``(B, in_channels, H, W, D)`` volumes.
            num_samples: number of Monte-Carlo samples (>= 1).
            measure: ``"entropy"``: entropy of the mean class probabilities (predictive entropy);
                ``"variance"``: variance of the class probabilities across samples, averaged over classes.

        Returns:
            the mean class probabilities ``(B, out_channels, H, W, D)`` (softmax, or sigmoid when
            ``out_channels == 1``) and the uncertainty map ``(B, 1, H, W, D)``.
        """
        if not self.stochastic:
            raise ValueError("predict_with_uncertainty needs use_csam, slice_attention and uncertainty enabled.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if measure not in ["entropy", "variance"]:
            raise ValueError(f"measure must be 'entropy' or 'variance', got '{measure}'.")
        with torch.no_grad():
            prob_sum = torch.zeros(0)
            prob_sq_sum = torch.zeros(0)
            for i in range(num_samples):
                logits = self._forward(x, True)
                probs = torch.sigmoid(logits) if self.out_channels == 1 else torch.softmax(logits, dim=1)
                if i == 0:
                    prob_sum = probs
                    prob_sq_sum = probs * probs
                else:
                    prob_sum = prob_sum + probs
                    prob_sq_sum = prob_sq_sum + probs * probs
            mean = prob_sum / num_samples
            if measure == "variance":
                uncertainty = (prob_sq_sum / num_samples - mean * mean).clamp_min(0.0).mean(dim=1, keepdim=True)
            else:
                # a single sigmoid channel is the two-class distribution (p, 1 - p)
                dist = torch.cat([mean, 1.0 - mean], dim=1) if self.out_channels == 1 else mean
                uncertainty = -(dist * torch.log(dist.clamp_min(1e-12))).sum(dim=1, keepdim=True)
        return mean, uncertainty


@register_network(input_shape=(2, 1, 128, 128, 20))
def csam_unet_paper(**overrides: Any) -> CSAMUNet:
    """CSAM U-Net at the paper's size (6 levels of widths 64-2048, the released code's base_num 64) for the
    authors' prostate setting (128x128 in-plane, 20 slices, 2 volumes per batch), 1 input channel, 3 classes:
    141,134,499 parameters."""
    return CSAMUNet(**({"in_channels": 1, "out_channels": 3, "channels": (64, 128, 256, 512, 1024, 2048)} | overrides))
