# SPDX-License-Identifier: Apache-2.0
"""Blocks shared by several networks of the collection: a channel LayerNorm and a double convolution block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from networks.blocks.fast import as_fast_conv

__all__ = ["ChannelLayerNorm", "ConvBlock"]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first tensor (B, C, *spatial).

    The normalisation runs on the channels-last view of ``x`` (``movedim``), so a tensor stored channels-last
    (``torch.channels_last`` / ``channels_last_3d``) is normalised in place of memory order, without a copy, and
    the output keeps the input's memory format.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class ConvBlock(nn.Sequential):
    """
    Two (conv + norm + act) layers, ``in_channels -> mid_channels -> out_channels``, "same" padding: the double
    convolution of U-Net-like encoders and decoders (U-KAN's ``ConvLayer``/``D_ConvLayer``, D-Net's ``Convblock``,
    the CSAM host U-Net's ``ConvBlock``). Each layer is a MONAI :class:`~monai.networks.blocks.Convolution`
    (conv, then norm, then act), its convolution with the fast CPU paths of :mod:`networks.blocks.fast`.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        mid_channels: channels between the two layers; ``out_channels`` when None.
        kernel_size: kernel size of both convolutions.
        norm: normalisation (MONAI name or (name, args)).
        act: activation (MONAI name or (name, args)).
        bias: whether the convolutions have a bias.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        kernel_size: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        bias: bool = True,
    ) -> None:
        mid = out_channels if mid_channels is None else mid_channels
        args = {"kernel_size": kernel_size, "norm": norm, "act": act, "bias": bias}
        super().__init__(
            Convolution(spatial_dims, in_channels, mid, **args), Convolution(spatial_dims, mid, out_channels, **args)
        )
        for layer in self:
            as_fast_conv(layer.conv)

    # the plain nn.Sequential layout (conv, norm, act, conv, norm, act): U-KAN's official ConvLayer/D_ConvLayer and
    # this collection's U-KAN checkpoints from before the block was shared; their keys are read into this layout
    _PLAIN_LAYOUT = {"0.": "0.conv.", "1.": "0.adn.N.", "3.": "1.conv.", "4.": "1.adn.N."}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if f"{prefix}0.weight" in state_dict and f"{prefix}0.conv.weight" not in state_dict:
            for key in [k for k in state_dict if k.startswith(prefix)]:
                rest = key[len(prefix):]
                old = next((o for o in self._PLAIN_LAYOUT if rest.startswith(o)), None)
                if old is not None:
                    state_dict[prefix + self._PLAIN_LAYOUT[old] + rest[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
