# SPDX-License-Identifier: Apache-2.0
"""Custom MONAI transforms shared by the bundles (``"_target_": "transforms.<Name>"`` in a config)."""

from __future__ import annotations

from .io import LoadImageSeriesd, LoadScand
from .post import Argmaxd, channel_argmax
from .slices import SliceAxisLast, SliceAxisLastd, SplitUncertaintyd, slice_last_order
from .spatial import SpacingMetaSafed
from .validation import CheckImaged, InvalidImageError

__all__ = ["Argmaxd", "CheckImaged", "InvalidImageError", "LoadImageSeriesd", "LoadScand", "SliceAxisLast",
           "SliceAxisLastd", "SpacingMetaSafed", "SplitUncertaintyd", "channel_argmax", "slice_last_order"]
