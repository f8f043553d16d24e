# SPDX-License-Identifier: Apache-2.0
"""U-KAN: a small conv U-Net with tokenized Kolmogorov-Arnold blocks at its deepest levels (arXiv 2406.02918)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath, trunc_normal_
from monai.networks.layers.factories import Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from networks.blocks.common import ChannelLayerNorm, ConvBlock
from networks.blocks.fast import fast_conv_type, to_channels_last
from networks.blocks.kan import KANConv, KANLinear
from networks.registry import register_network

__all__ = ["KANBlock", "TokenShift", "UKAN", "ukan_official", "ukan_param_groups"]

NUM_LEVELS = 5
SIZE_DIVISOR = 2**NUM_LEVELS
# Each KANBlock holds three KANLinear layers (U-KAN's fc1..fc3).
NUM_KAN_LAYERS = 3
LAYER_NORM_EPS = 1e-5


def _init_conv_fan_out(conv: nn.Module) -> None:
    """He-normal initialisation over the fan-out, as U-KAN initialises the convs of its tokenized stages."""
    fan_out = conv.out_channels // conv.groups
    for size in conv.kernel_size:
        fan_out *= size
    nn.init.normal_(conv.weight, 0.0, (2.0 / fan_out) ** 0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class TokenShift(nn.Module):
    """
    UNeXt's token shift (arXiv 2203.04421) along one spatial axis: the channels are split into ``shift_size``
    groups and group g is shifted by ``g - shift_size // 2`` voxels along ``axis``, zero-filled at the border.
    It has no parameters. Input and output (B, C, H, W[, D]); ``axis`` counts the spatial axes from 0 (H).
    """

    def __init__(self, spatial_dims: int, axis: int, shift_size: int = 5) -> None:
        super().__init__()
        if shift_size < 1 or shift_size % 2 == 0:
            raise ValueError(f"shift_size must be a positive odd number, got {shift_size}.")
        if not 0 <= axis < spatial_dims:
            raise ValueError(f"axis must be in [0, {spatial_dims}), got {axis}.")
        self.dim = axis + 2
        self.groups = shift_size
        self.max_shift = shift_size // 2
        # F.pad lists (before, after) pairs from the last axis backwards.
        padding = [0] * (2 * spatial_dims)
        padding[2 * (spatial_dims - 1 - axis)] = self.max_shift
        padding[2 * (spatial_dims - 1 - axis) + 1] = self.max_shift
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[self.dim]
        padded = F.pad(x, self.padding)
        shifted = []
        for group, chunk in enumerate(torch.tensor_split(padded, self.groups, dim=1)):
            # Window start 2 * max_shift - group shifts this group by group - max_shift.
            shifted.append(chunk.narrow(self.dim, 2 * self.max_shift - group, length))
        return torch.cat(shifted, dim=1)


class DepthwiseConvNormAct(nn.Sequential):
    """Depthwise conv 3 (plain, or a depthwise :class:`KANConv`) + norm + act: U-KAN's ``DW_bn_relu``."""

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        use_kan_conv: bool = False,
        grid_size: int = 5,
        spline_order: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        conv: nn.Module
        if use_kan_conv:
            conv = KANConv(
                spatial_dims,
                channels,
                channels,
                kernel_size=3,
                padding=1,
                groups=channels,
                grid_size=grid_size,
                spline_order=spline_order,
            )
        else:
            conv = fast_conv_type(spatial_dims)(channels, channels, kernel_size=3, padding=1, groups=channels)
            _init_conv_fan_out(conv)
        super().__init__(conv, get_norm_layer(norm, spatial_dims, channels), get_act_layer(act))


class KANStep(nn.Module):
    """One step of a KAN block: optional token shift, KANLinear (or Linear) over channels, depthwise conv+norm+act."""

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        shift_axis: int | None,
        shift_size: int = 5,
        use_kan: bool = True,
        use_kan_conv: bool = False,
        grid_size: int = 5,
        spline_order: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        self.shift: nn.Module = (
            nn.Identity() if shift_axis is None else TokenShift(spatial_dims, shift_axis, shift_size)
        )
        self.fc: nn.Module
        if use_kan:
            self.fc = KANLinear(channels, channels, grid_size=grid_size, spline_order=spline_order)
        else:
            self.fc = nn.Linear(channels, channels)
            trunc_normal_(self.fc.weight, std=0.02)
            nn.init.zeros_(self.fc.bias)
        self.dwconv = DepthwiseConvNormAct(spatial_dims, channels, use_kan_conv, grid_size, spline_order, norm, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shift(x)
        x = self.fc(x.movedim(1, -1)).movedim(-1, 1)
        return self.dwconv(x)


class KANBlock(nn.Module):
    """
    Tokenized KAN block of U-KAN: ``x + DropPath(KANLayer(LayerNorm(x)))``, where the KAN layer is three steps of
    [token shift] -> KANLinear over channels -> depthwise conv + norm + act, at constant width.

    With ``token_shift``, step i shifts the tokens along spatial axis i (UNeXt's shifted MLP, where a shift along H
    precedes the first and a shift along W the second channel mixer). In 2D the third step is not shifted; in 3D it
    shifts along D, so each of the three axes is shifted once. Shifting all three axes of a volume rather than two
    keeps the block's context isotropic, and as the block has exactly three channel mixers it costs nothing: no
    parameters, one zero-filled copy per step.

    Input and output (B, C, H, W[, D]).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        drop_path: float = 0.0,
        use_kan: bool = True,
        token_shift: bool = False,
        shift_size: int = 5,
        use_kan_conv: bool = False,
        grid_size: int = 5,
        spline_order: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels, eps=LAYER_NORM_EPS)
        self.steps = nn.ModuleList(
            [
                KANStep(
                    spatial_dims,
                    channels,
                    shift_axis=i if token_shift and i < spatial_dims else None,
                    shift_size=shift_size,
                    use_kan=use_kan,
                    use_kan_conv=use_kan_conv,
                    grid_size=grid_size,
                    spline_order=spline_order,
                    norm=norm,
                    act=act,
                )
                for i in range(NUM_KAN_LAYERS)
            ]
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        for step in self.steps:
            y = step(y)
        return x + self.drop_path(y)


class TokenizedKANStage(nn.Sequential):
    """
    Tokenized KAN stage: [patch embedding: conv 3 stride 2 + LayerNorm, when ``in_channels`` is given], then
    ``len(drop_paths)`` KAN blocks, then a LayerNorm. Input and output (B, C, H, W[, D]).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int | None, channels: int, drop_paths: Sequence[float], **block_args
    ) -> None:
        layers: list[nn.Module] = []
        if in_channels is not None:
            embed = fast_conv_type(spatial_dims)(in_channels, channels, kernel_size=3, stride=2, padding=1)
            _init_conv_fan_out(embed)
            layers += [embed, ChannelLayerNorm(channels, eps=LAYER_NORM_EPS)]
        layers += [KANBlock(spatial_dims, channels, drop_path=rate, **block_args) for rate in drop_paths]
        layers.append(ChannelLayerNorm(channels, eps=LAYER_NORM_EPS))
        super().__init__(*layers)


class UKAN(nn.Module):
    """
    U-KAN (Li et al., "U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation", AAAI 2025,
    arXiv 2406.02918), for 2D images and 3D volumes, following the official segmentation code
    (github.com/CUHK-AIM-Group/U-KAN, ``Seg_UKAN``).

    Structure, for ``channels = (E0, E1, E2)`` (the official code's ``embed_dims``):

    - Convolution phase: three blocks of 2x (conv 3 + norm + act), each followed by a 2x max-pool:
      E0/8 @ 1/2, E0/4 @ 1/4, E0 @ 1/8 (the skips t1, t2, t3).
    - Tokenized KAN phase: patch embedding (conv 3 stride 2 + LayerNorm) and ``depths[1]`` KAN blocks, E1 @ 1/16
      (skip t4); again for the bottleneck, E2 @ 1/32 with ``depths[2]`` blocks. Each stage ends with a LayerNorm.
    - Decoder, each step 2x (conv 3 + norm + act), then a 2x (bi/tri)linear upsampling and an additive skip:
      E2 -> E1 @ 1/16 + t4, then ``depths[1]`` KAN blocks; E1 -> E0 @ 1/8 + t3, then ``depths[0]`` KAN blocks;
      E0 -> E0/4 @ 1/4 + t2; E0/4 -> E0/8 @ 1/2 + t1; E0/8 -> E0/8 @ 1/1. Dropout, then a 1x1 conv head.

    A KAN block is ``x + DropPath(KANLayer(LayerNorm(x)))`` with three steps of KANLinear (grid 5, cubic splines,
    SiLU base) over channels followed by a depthwise conv 3 + norm + act; see :class:`KANBlock`.

    The defaults are the configuration the paper trained: ``UKAN(2, 3, 1)`` has 6,356,689 parameters, the count of
    the official model, of which 3,993,600 are in KANLinear layers. Options:

    - ``use_kan=False`` replaces every KANLinear by an ``nn.Linear`` of the same shape (the MLP ablation; the
      official ``no_kan`` flag is not passed on to the blocks and has no effect). 2,764,561 parameters.
    - ``token_shift=True`` adds UNeXt's token shift before each KANLinear (no parameters; see
      :class:`KANBlock` for the axes). The released U-KAN has no working shift.
    - ``use_kan_conv=True`` makes the depthwise conv after each KANLinear a depthwise :class:`KANConv`, a learnable
      spline function per channel and kernel tap (+72 parameters per channel and conv at grid 5, cubic:
      6,508,753 parameters). The released segmentation U-KAN has no KAN convolution.

    Differences from the official code: ``in_channels`` is used (the official first conv always takes 3
    channels); the ReLU after each max-pool and each upsampling, which acts on non-negative values, is left out;
    ``depths`` sets the number of KAN blocks per level (the official code accepts it but always builds one);
    ``dropout`` acts before the head (the official dropout module is never applied); the drop-path schedule is
    the one described under ``drop_path_rate``.

    Spatial sizes must be divisible by 32 (the ``size_divisor`` attribute). The KANLinear and KANConv parameters
    all have ``kan`` in their names; :func:`ukan_param_groups` builds the paper's optimizer parameter groups.

    Args:
        spatial_dims: number of spatial dimensions, 2 (the paper) or 3.
        in_channels: number of input channels.
        out_channels: number of output channels (classes); the paper uses 1 with a sigmoid for binary tasks.
        channels: widths (E0, E1, E2) at 1/8, 1/16 and 1/32 resolution, the paper's ``embed_dims``; E0 must be
            divisible by 8.
            The paper trained (128, 160, 256); the official constructor's default is (256, 320, 512) (25.4 M).
        depths: number of KAN blocks at 1/8 (decoder only), 1/16 (encoder and decoder each) and 1/32.
        drop_path_rate: stochastic depth rate, rising linearly from 0 over the encoder's KAN blocks (1/16, then
            1/32) and again over the decoder's (deepest first).
        dropout: dropout probability before the 1x1 head.
        use_kan: if False, the KAN blocks use ``nn.Linear`` instead of ``KANLinear``.
        token_shift: if True, shift tokens along one spatial axis before each KANLinear (UNeXt).
        shift_size: number of channel groups of the token shift (odd); shifts range over +-shift_size // 2.
        use_kan_conv: if True, the depthwise convs of the KAN blocks are depthwise KAN convolutions.
        grid_size: number of B-spline grid intervals of the KAN layers.
        spline_order: B-spline degree of the KAN layers.
        norm: normalisation of the conv layers (MONAI name or (name, args)); the tokenized stages also use
            LayerNorm as in the paper.
        act: activation of the conv layers.

    Input (B, in_channels, H, W[, D]), output (B, out_channels, H, W[, D]) logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (128, 160, 256),
        depths: Sequence[int] = (1, 1, 1),
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        use_kan: bool = True,
        token_shift: bool = False,
        shift_size: int = 5,
        use_kan_conv: bool = False,
        grid_size: int = 5,
        spline_order: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}.")
        if len(channels) != 3 or min(channels) < 1 or channels[0] % 8:
            raise ValueError(f"channels must be 3 positive widths, the first divisible by 8, got {channels}.")
        if len(depths) != 3 or min(depths) < 1:
            raise ValueError(f"depths must be 3 positive block counts, got {depths}.")
        if not 0.0 <= drop_path_rate <= 1.0 or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"drop_path_rate and dropout must be in [0, 1], got {drop_path_rate}, {dropout}.")
        if token_shift and (shift_size < 1 or shift_size % 2 == 0):
            raise ValueError(f"shift_size must be a positive odd number, got {shift_size}.")
        self.spatial_dims = spatial_dims
        self.size_divisor = (SIZE_DIVISOR,) * spatial_dims
        e0, e1, e2 = channels
        block_args = {
            "use_kan": use_kan,
            "token_shift": token_shift,
            "shift_size": shift_size,
            "use_kan_conv": use_kan_conv,
            "grid_size": grid_size,
            "spline_order": spline_order,
            "norm": norm,
            "act": act,
        }
        # schedules on the CPU: a network built under torch.device('meta') (shapes only) can still read them
        encoder_rates = torch.linspace(0, drop_path_rate, depths[1] + depths[2], device="cpu").tolist()
        decoder_rates = torch.linspace(drop_path_rate, 0, depths[1] + depths[0], device="cpu").tolist()

        self.encoder1 = ConvBlock(spatial_dims, in_channels, e0 // 8, norm=norm, act=act)
        self.encoder2 = ConvBlock(spatial_dims, e0 // 8, e0 // 4, norm=norm, act=act)
        self.encoder3 = ConvBlock(spatial_dims, e0 // 4, e0, norm=norm, act=act)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)
        self.encoder4 = TokenizedKANStage(spatial_dims, e0, e1, encoder_rates[: depths[1]], **block_args)
        self.bottleneck = TokenizedKANStage(spatial_dims, e1, e2, encoder_rates[depths[1] :], **block_args)

        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear" if spatial_dims == 2 else "trilinear")
        self.decoder1 = ConvBlock(spatial_dims, e2, e1, mid_channels=e2, norm=norm, act=act)
        self.decoder_blocks1 = TokenizedKANStage(spatial_dims, None, e1, decoder_rates[: depths[1]], **block_args)
        self.decoder2 = ConvBlock(spatial_dims, e1, e0, mid_channels=e1, norm=norm, act=act)
        self.decoder_blocks2 = TokenizedKANStage(spatial_dims, None, e0, decoder_rates[depths[1] :], **block_args)
        self.decoder3 = ConvBlock(spatial_dims, e0, e0 // 4, mid_channels=e0, norm=norm, act=act)
        self.decoder4 = ConvBlock(spatial_dims, e0 // 4, e0 // 8, mid_channels=e0 // 4, norm=norm, act=act)
        self.decoder5 = ConvBlock(spatial_dims, e0 // 8, e0 // 8, norm=norm, act=act)
        self.dropout = nn.Dropout(dropout)
        self.head = fast_conv_type(spatial_dims)(e0 // 8, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        divisors = [d for d in self.size_divisor]  # a list: TorchScript cannot zip or index a tuple attribute
        for size, divisor in zip(x.shape[2:], divisors):
            if size % divisor != 0:
                raise ValueError(f"spatial sizes must be divisible by {divisor}, got {x.shape[2:]}.")
        if not torch.jit.is_scripting():
            x = to_channels_last(x)  # the layout the CPU kernels are fastest in; see networks.blocks.fast
        t1 = self.pool(self.encoder1(x))
        t2 = self.pool(self.encoder2(t1))
        t3 = self.pool(self.encoder3(t2))
        t4 = self.encoder4(t3)
        x = self.bottleneck(t4)

        x = self.decoder_blocks1(self.upsample(self.decoder1(x)) + t4)
        x = self.decoder_blocks2(self.upsample(self.decoder2(x)) + t3)
        x = self.upsample(self.decoder3(x)) + t2
        x = self.upsample(self.decoder4(x)) + t1
        x = self.upsample(self.decoder5(x))
        return self.head(self.dropout(x)).contiguous()

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> torch.Tensor:
        """Sum of the KANLinear spline regularisers (zero without KAN layers); the paper does not use it."""
        losses = [
            m.regularization_loss(regularize_activation, regularize_entropy)
            for m in self.modules()
            if isinstance(m, KANLinear)
        ]
        return torch.stack(losses).sum() if losses else self.head.weight.new_zeros(())


@register_network(input_shape=(4, 3, 256, 256))
def ukan_official(**overrides: Any) -> UKAN:
    """U-KAN as the official train.py builds it (embed_dims 128-160-256), 2D, 3 input channels, 1 class (with a
    sigmoid): 6,356,689 parameters."""
    return UKAN(**({"spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": (128, 160, 256)} | overrides))


def ukan_param_groups(model: nn.Module, lr: float, kan_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """
    Optimizer parameter groups with U-KAN's learning-rate split: the parameters of every KANLinear and KANConv
    (their names all contain ``kan``) get ``kan_lr``, all others ``lr``; both get ``weight_decay``. The official
    training uses Adam with lr 1e-4, kan_lr 1e-2 and weight decay 1e-4. Empty groups are left out, and so are
    frozen parameters.

    Example: ``torch.optim.Adam(ukan_param_groups(net, 1e-4, 1e-2, 1e-4))``.
    """
    kan_ids = {id(p) for m in model.modules() if isinstance(m, (KANLinear, KANConv)) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in kan_ids], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in kan_ids], "lr": kan_lr, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]
