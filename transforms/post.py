# SPDX-License-Identifier: Apache-2.0
"""Postprocessing."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

__all__ = ["Argmaxd", "channel_argmax"]


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=0, keepdim=True)`` as float32, computed one channel at a time.

    The same labels as ``torch.argmax``: the first maximal channel wins, and a NaN counts as the maximum (the
    first NaN wins). It exists for speed: with the torch 2.x CPU kernels a reduction over the first axis of a
    channel-first volume with few channels runs far below memory speed (a 3x36x47x41 volume: about 9 ms of CPU
    against under 1 ms for these few element-wise passes).
    """
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"argmax over the channel axis needs at least one channel, got shape {tuple(x.shape)}")
    labels = torch.zeros((1, *x.shape[1:]), dtype=torch.float32, device=x.device)
    best = x[0]
    check_nan = x.is_floating_point() or x.is_complex()
    best_nan = torch.isnan(best) if check_nan else None
    for c in range(1, x.shape[0]):
        value = x[c]
        take = value > best
        if check_nan:
            value_nan = torch.isnan(value)
            take |= value_nan & ~best_nan
            best_nan = best_nan | value_nan
        labels[0].masked_fill_(take, float(c))
        best = torch.maximum(best, value)  # propagates NaN: a NaN stays the maximum, as for torch.argmax
    return labels


class Argmaxd(MapTransform):
    """MONAI's ``AsDiscreted(keys, argmax=True)``: the label of each voxel, the index of its largest channel, as
    a float32 tensor with one channel (metadata kept). The same values, faster on CPUs (see
    :func:`channel_argmax`)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=isinstance(d[key], MetaTensor))
            plain = img.as_tensor() if isinstance(img, MetaTensor) else img
            d[key], *_ = convert_to_dst_type(channel_argmax(plain), img, dtype=torch.float32)
        return d
