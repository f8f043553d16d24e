# SPDX-License-Identifier: Apache-2.0
"""Input checks that turn a bad scan into a clear error naming the file, before it reaches the network."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

__all__ = ["InvalidImageError", "CheckImaged"]


class InvalidImageError(ValueError):
    """A loaded image cannot be segmented by the bundle; the message names the file and the problem."""


def _source(img: torch.Tensor, key: Hashable) -> str:
    if isinstance(img, MetaTensor):
        return str(img.meta.get(ImageMetaKey.FILENAME_OR_OBJ, key))
    return str(key)


class CheckImaged(MapTransform):
    """Check channel-first images right after loading (``LoadImaged``, then ``EnsureChannelFirstd``).

    Raises :class:`InvalidImageError` naming the file when an image does not have ``spatial_dims`` spatial axes
    (a 2D slice given to a 3D model), has an axis of size 0, has a channel count other than ``num_channels``,
    or contains NaN or Inf voxels. Without this check such images fail deep inside a convolution or produce
    silently wrong segmentations.

    Args:
        keys: keys of the images to check.
        num_channels: channels the network expects; ``None`` skips the check.
        spatial_dims: number of spatial axes expected.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int | None = None,
        spatial_dims: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = num_channels
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            source = _source(img, key)
            spatial = tuple(img.shape[1:])
            if img.numel() == 0:
                # readers drop the shape of an image without voxels; the header's shape is in the metadata
                shape = img.meta.get("spatial_shape") if isinstance(img, MetaTensor) else None
                shape = tuple(int(s) for s in shape) if shape is not None else spatial
                raise InvalidImageError(f"{source}: has an empty axis (shape {shape})")
            if len(spatial) != self.spatial_dims:
                raise InvalidImageError(
                    f"{source}: has {len(spatial)} spatial axes (shape {spatial}), the model needs "
                    f"{self.spatial_dims}D volumes"
                )
            if self.num_channels is not None and img.shape[0] != self.num_channels:
                raise InvalidImageError(
                    f"{source}: has {img.shape[0]} channel(s), the model expects {self.num_channels}"
                )
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise InvalidImageError(f"{source}: contains NaN or Inf voxels")
        return d
