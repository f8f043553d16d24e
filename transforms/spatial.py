# SPDX-License-Identifier: Apache-2.0
"""Spatial transforms."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Spacingd

__all__ = ["SpacingMetaSafed"]


class SpacingMetaSafed(Spacingd):
    """MONAI's :class:`~monai.transforms.Spacingd` that leaves the data entries it does not own alone.

    Since MONAI 1.6, ``Spacingd`` updates every entry whose name starts with ``"<key>_"`` with the resampled
    image's metadata, assuming they are all metadata dicts (``image_meta_dict``). MONAI Label puts a string there
    (``image_path``), so every inference request failed inside ``Spacingd`` (``'str' object has no attribute
    'update'``). This subclass hides such entries that are not mappings during the call and puts them back
    unchanged. Everything else, inversion by ``Invertd`` included, is ``Spacingd``'s own; with MONAI before 1.6
    it behaves exactly like ``Spacingd``.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        prefixes = tuple(f"{key}_" for key in self.keys if isinstance(key, str))
        d = dict(data)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], Mapping)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(hidden)
        return out
