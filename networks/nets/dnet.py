# SPDX-License-Identifier: Apache-2.0
"""D-Net: Dynamic Large Kernel with Dynamic Feature Fusion (Yang et al., arXiv 2403.10674)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Act, Norm
from monai.utils import ensure_tuple_rep
from torch import nn

from networks.blocks.common import ChannelLayerNorm, ConvBlock
from networks.blocks.dff import DFF
from networks.blocks.dlk import DepthwiseConvMlp, DLKBlock
from networks.blocks.fast import fast_conv_transpose_type, fast_conv_type, to_channels_last
from networks.registry import register_network

__all__ = ["DNet", "SalienceLayer", "dnet_official", "dnet_paper"]

NUM_LEVELS = 5
SIZE_DIVISOR = 2**NUM_LEVELS


class SalienceLayer(nn.Module):
    """Full-resolution salience layer: conv3 + BN + LeakyReLU(0.2), then a residual channel mixer BN -> MLP."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: int, shared_norm: bool = False) -> None:
        super().__init__()
        self.embed = fast_conv_type(spatial_dims)(in_channels, channels, kernel_size=3, padding=1)
        self.embed_norm = Norm[Norm.BATCH, spatial_dims](channels)
        self.act = Act[Act.LEAKYRELU](negative_slope=0.2)
        # None: the mixer reuses the embedding's BatchNorm, as the official code does.
        self.mixer_norm = None if shared_norm else Norm[Norm.BATCH, spatial_dims](channels)
        self.mixer = DepthwiseConvMlp(spatial_dims, channels, mlp_ratio=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.embed_norm(self.embed(x)))
        if self.mixer_norm is None:
            return x + self.mixer(self.embed_norm(x))
        return x + self.mixer(self.mixer_norm(x))


class DNet(nn.Module):
    """
    D-Net (Yang et al., "D-Net: Dynamic Large Kernel with Dynamic Feature Fusion for Volumetric Medical Image
    Segmentation", arXiv 2403.10674; Biomedical Signal Processing and Control 113 (2026) 108837), following the
    journal version and the official code (github.com/sotiraslab/DLK, HEAD).

    Structure, for widths ``channels`` = F0..F4 (the official code's ``feat_size``):

    - Encoder: a 7-kernel stride-2 conv stem (F0 @ 1/2), then four 3-kernel stride-2 convs (F1..F4 @ 1/4..1/32);
      every level is followed by a channel LayerNorm and ``depths[i]`` DLK blocks.
    - Salience layer on the full-resolution input (F0 @ 1/1).
    - Decoder, from 1/16 up to 1/2: 2-kernel stride-2 transposed conv, LayerNorm, DFF with the encoder feature
      of the same resolution, ``depths[i]`` DLK blocks, and (for deep supervision) a 1x1 segmentation head.
    - Full resolution: a transposed conv F0 -> F0, DFF with the salience features, two conv3 + BN + LeakyReLU(0.2)
      layers, dropout, and a 1x1 output conv.

    Defaults are the paper's configuration: ``DNet(3, 1, 16)`` has 39,292,518 parameters; with
    ``per_branch_selection=False, shared_norm=True`` (the official code) it has 39,279,174, the official count.

    Args:
        spatial_dims: number of spatial dimensions, 3 (the paper) or 2.
        in_channels: number of input channels.
        out_channels: number of output channels (classes).
        channels: widths of the five levels (1/2 to 1/32 resolution), the paper's ``feat_size``; each must be even.
        depths: number of DLK blocks per level, one int for all levels or five ints. The decoder level at a
            resolution uses the depth of the encoder level at that resolution.
        drop_path_rate: stochastic depth rate, rising linearly from 0 over the encoder's DLK blocks and again
            over the decoder's (deepest first).
        layer_scale_init: initial value of the DLK blocks' layer-scale vectors.
        deep_supervision: if True, in training mode return the outputs at full, 1/2, 1/4, 1/8 and 1/16 resolution
            as a list, highest resolution first (the input format of MONAI ``DeepSupervisionLoss``). In eval mode,
            and always when False, return the full-resolution output only.
        dropout: dropout probability applied to the features entering every segmentation head.
        per_branch_selection: if True (the paper, as in LSK), each spatial weight map of a DLK module weights
            its own kernel branch. False matches the official code, where each map weights both branches.
        shared_norm: if False (the paper's ViT-style block), each of the two sub-blocks of a DLK block has its own
            LayerNorm and layer scale, and the salience layer has two BatchNorms. True matches the official code,
            where one instance of each is applied twice.
        use_checkpointing: if True, recompute the DLK blocks' activations in the backward pass during training
            (torch.utils.checkpoint), trading compute for much less activation memory; results are unchanged.

    Input: (B, in_channels, H, W[, D]) with every spatial size divisible by 32, the ``size_divisor`` attribute
    (otherwise ``ValueError``; pad the input, e.g. with MONAI ``DivisiblePad(k=net.size_divisor)``).
    Output: (B, out_channels, H, W[, D]), or in training with deep supervision a list of five tensors
    (B, out_channels, H / 2**k, W / 2**k[, D / 2**k]), k = 0..4.

    The network scripts with ``torch.jit.script`` (forward returns ``Union[Tensor, List[Tensor]]``; the eval path
    always gives a Tensor) and traces in eval mode. Scripted modules skip activation checkpointing.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (48, 96, 192, 384, 768),
        depths: Sequence[int] | int = 2,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
        deep_supervision: bool = True,
        dropout: float = 0.0,
        per_branch_selection: bool = True,
        shared_norm: bool = False,
        use_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}.")
        if len(channels) != NUM_LEVELS or any(f < 2 or f % 2 != 0 for f in channels):
            raise ValueError(f"channels must be {NUM_LEVELS} positive even ints, got {channels}.")
        depths = ensure_tuple_rep(depths, NUM_LEVELS)
        if any(d < 1 for d in depths):
            raise ValueError(f"depths must be positive, got {depths}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}.")
        if layer_scale_init <= 0.0:
            raise ValueError(f"layer_scale_init must be positive, got {layer_scale_init}.")
        self.spatial_dims = spatial_dims
        self.deep_supervision = deep_supervision
        self.size_divisor = (SIZE_DIVISOR,) * spatial_dims
        widths = tuple(channels)
        conv_type = fast_conv_type(spatial_dims)
        up_conv_type = fast_conv_transpose_type(spatial_dims)

        def dlk_stage(channels: int, rates: Sequence[float]) -> nn.Sequential:
            return nn.Sequential(
                *[
                    DLKBlock(
                        spatial_dims,
                        channels,
                        drop_path=rate,
                        layer_scale_init=layer_scale_init,
                        per_branch_selection=per_branch_selection,
                        shared_norm=shared_norm,
                        use_checkpointing=use_checkpointing,
                    )
                    for rate in rates
                ]
            )

        # Encoder, 1/2 to 1/32.
        # schedules on the CPU: a network built under torch.device('meta') (shapes only) can still read them
        enc_rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.downsamples = nn.ModuleList([conv_type(in_channels, widths[0], kernel_size=7, stride=2, padding=3)])
        self.downsamples.extend(
            conv_type(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1) for i in range(NUM_LEVELS - 1)
        )
        self.encoder_norms = nn.ModuleList(ChannelLayerNorm(w) for w in widths)
        self.encoder_stages = nn.ModuleList(
            dlk_stage(widths[i], enc_rates[sum(depths[:i]) : sum(depths[: i + 1])]) for i in range(NUM_LEVELS)
        )

        # Salience layer at full resolution.
        self.salience = SalienceLayer(spatial_dims, in_channels, widths[0], shared_norm)

        # Decoder, 1/16 up to 1/2 (deepest first).
        dec_levels = list(range(NUM_LEVELS - 2, -1, -1))
        dec_depths = [depths[lvl] for lvl in dec_levels]
        dec_rates = torch.linspace(0, drop_path_rate, sum(dec_depths), device="cpu").tolist()
        self.upsamples = nn.ModuleList(
            up_conv_type(widths[lvl + 1], widths[lvl], kernel_size=2, stride=2) for lvl in dec_levels
        )
        self.decoder_norms = nn.ModuleList(ChannelLayerNorm(widths[lvl]) for lvl in dec_levels)
        self.fusions = nn.ModuleList(DFF(spatial_dims, widths[lvl]) for lvl in dec_levels)
        self.decoder_stages = nn.ModuleList(
            dlk_stage(widths[lvl], dec_rates[sum(dec_depths[:k]) : sum(dec_depths[: k + 1])])
            for k, lvl in enumerate(dec_levels)
        )
        self.heads = nn.ModuleList(conv_type(widths[lvl], out_channels, kernel_size=1) for lvl in dec_levels)

        # Full resolution: fuse with the salience features, refine, classify.
        self.final_upsample = up_conv_type(widths[0], widths[0], kernel_size=2, stride=2)
        self.final_fusion = DFF(spatial_dims, widths[0])
        self.final_block = ConvBlock(
            spatial_dims, widths[0], widths[0], norm="batch", act=("leakyrelu", {"negative_slope": 0.2})
        )
        self.dropout = nn.Dropout(dropout)
        self.output = conv_type(widths[0], out_channels, kernel_size=1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"DNet expects a (B, C, *spatial) input with {self.spatial_dims} spatial dims, got shape {x.shape}."
            )
        divisors = [d for d in self.size_divisor]  # a list: TorchScript cannot zip or index a tuple attribute
        for size, divisor in zip(x.shape[2:], divisors):
            if size % divisor != 0:
                raise ValueError(
                    f"DNet needs every spatial size divisible by {divisor}, got {x.shape[2:]}; pad the input."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        # A trace is specialised to its example's shape, so the check would only add tracer warnings there.
        if not torch.jit.is_tracing():
            self._check_input(x)
        with_heads = self.deep_supervision and self.training
        if not torch.jit.is_scripting():
            x = to_channels_last(x)  # the layout the CPU kernels are fastest in; see networks.blocks.fast

        salience = self.salience(x)
        skips: list[torch.Tensor] = []
        for down, norm, stage in zip(self.downsamples, self.encoder_norms, self.encoder_stages):
            x = stage(norm(down(x)))
            skips.append(x)

        x = skips.pop()
        outputs: list[torch.Tensor] = []
        for up, norm, fusion, stage, head in zip(
            self.upsamples, self.decoder_norms, self.fusions, self.decoder_stages, self.heads
        ):
            x = stage(fusion(norm(up(x)), skips.pop()))
            if with_heads:
                outputs.append(head(self.dropout(x)).contiguous())

        x = self.final_block(self.final_fusion(self.final_upsample(x), salience))
        x = self.output(self.dropout(x)).contiguous()
        if with_heads:
            outputs.append(x)
            outputs.reverse()
            return outputs
        return x


@register_network(input_shape=(1, 1, 64, 64, 64))
def dnet_paper(**overrides: Any) -> DNet:
    """D-Net with the paper's defaults (per-branch selection, a norm per sub-block), 3D, widths 48-768, 1 input
    channel, 16 classes: 39,292,518 parameters."""
    return DNet(**({"spatial_dims": 3, "in_channels": 1, "out_channels": 16} | overrides))


@register_network(input_shape=(1, 1, 64, 64, 64))
def dnet_official(**overrides: Any) -> DNet:
    """D-Net as the official code builds it (sotiraslab/DLK: widths 48-768, shared norm, both-branch selection),
    3D, 1 input channel, 3 classes: 39,269,125 parameters (39,279,174 with 16 classes, the official count)."""
    return DNet(
        **(
            {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "per_branch_selection": False, "shared_norm": True}
            | overrides
        )
    )
