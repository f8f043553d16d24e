# SPDX-License-Identifier: Apache-2.0
"""Transforms for 2.5D networks that treat one array axis as the slice axis.

A 2.5D network such as :class:`networks.CSAMUNet` runs a 2D network over the slices along the last axis, so the
thick (largest-spacing) axis of an anisotropic scan must be last; :class:`SliceAxisLastd` moves it there and,
through ``Invertd``, back. :class:`SplitUncertaintyd` separates the uncertainty channel that
:class:`networks.wrappers.MonteCarloUncertainty` appends to the mean probabilities.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import affine_to_spacing
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys, TransformBackends, convert_to_tensor, ensure_tuple_rep

__all__ = ["slice_last_order", "SliceAxisLast", "SliceAxisLastd", "SplitUncertaintyd"]


def slice_last_order(spacing: Sequence[float], rtol: float = 1e-3) -> list[int]:
    """Spatial axes reordered so that the axis with the largest spacing comes last, the others keeping their order.

    Spacings within ``rtol`` (relative) of the largest count as equal, and among them the last axis is kept as the
    slice axis, so an isotropic or nearly isotropic volume is left as it is.
    """
    spacing = np.asarray(spacing, dtype=float)
    thick = np.flatnonzero(spacing >= spacing.max() * (1.0 - rtol))[-1]
    return [axis for axis in range(len(spacing)) if axis != thick] + [int(thick)]


class SliceAxisLast(InvertibleTransform):
    """
    Move the spatial axis with the largest voxel spacing (the slice axis of a thick-slice scan) to the last position.

    The spacing is read from the affine of a channel-first ``MetaTensor`` (a plain tensor is left as it is). The
    affine is updated with the permutation, so the voxels keep their world positions and later spatial transforms
    (``Spacingd``, crops, ``Invertd``) stay consistent; :meth:`inverse` restores the original axis order and affine
    exactly. Best placed after ``Orientation``, so that the in-plane axes keep a fixed orientation.

    Args:
        rtol: spacings within this relative tolerance of the largest count as equal (the last of them stays last).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, rtol: float = 1e-3) -> None:
        if not 0.0 <= rtol < 1.0:
            raise ValueError(f"rtol must be in [0, 1), got {rtol}.")
        self.rtol = rtol

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        spatial_dims = img.ndim - 1
        if isinstance(img, MetaTensor):
            order = slice_last_order(affine_to_spacing(img.affine, r=spatial_dims).tolist(), self.rtol)
        else:
            order = list(range(spatial_dims))
        return self._permute(img, order, self.get_transform_info())

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        order = transform[TraceKeys.EXTRA_INFO]["order"]
        with self.trace_transform(False):
            return self._permute(data, np.argsort(order).tolist(), self.get_transform_info())

    @staticmethod
    def _permute(img: torch.Tensor, order: list[int], transform_info: dict) -> torch.Tensor:
        spatial_dims = len(order)
        # maps the new voxel index to the old one: the affine becomes affine @ xform
        xform = torch.zeros(spatial_dims + 1, spatial_dims + 1, dtype=torch.float64)
        for new_axis, old_axis in enumerate(order):
            xform[old_axis, new_axis] = 1.0
        xform[-1, -1] = 1.0
        new_size = [int(img.shape[1 + axis]) for axis in order]
        meta_info = TraceableTransform.track_transform_meta(
            img, sp_size=new_size, affine=xform, extra_info={"order": order}, transform_info=transform_info
        )
        out = img.permute(0, *[axis + 1 for axis in order]).contiguous()
        return out.copy_meta_from(meta_info) if isinstance(out, MetaTensor) else out


class SliceAxisLastd(MapTransform, InvertibleTransform):
    """
    Dictionary-based :class:`SliceAxisLast`: each key's largest-spacing axis becomes its last spatial axis.

    Each key is reordered by its own affine (an image and its label share one), and ``Invertd`` undoes it with the
    order recorded on the reference key, so predictions return to the input's layout.

    Args:
        keys: keys of the channel-first images to reorder.
        rtol: spacings within this relative tolerance of the largest count as equal.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = SliceAxisLast.backend

    def __init__(self, keys: KeysCollection, rtol: float = 1e-3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reorder = SliceAxisLast(rtol)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.reorder(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.reorder.inverse(d[key])
        return d


class SplitUncertaintyd(MapTransform):
    """
    Move the last channel of each key (an uncertainty map appended to class probabilities) to a key of its own.

    The new item shares the source's metadata (affine, applied transforms), so ``Invertd`` and ``SaveImaged``
    treat it like the prediction it came from.

    Args:
        keys: keys of the ``(C + 1, *spatial)`` outputs.
        names: the keys for the uncertainty channels, one per key.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, names: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.names = ensure_tuple_rep(names, len(self.keys))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            if d[key].shape[0] < 2:
                raise ValueError(f"{key!r} needs at least 2 channels to split off an uncertainty map.")
            d[name] = d[key][-1:].clone()
            d[key] = d[key][:-1]
        return d
