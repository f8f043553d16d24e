# SPDX-License-Identifier: Apache-2.0
"""Network modules of the collection, named in bundle configs as ``"_target_": "networks.<Name>"``."""

from __future__ import annotations

from .blocks import CSAM, DFF, DLK, DLKBlock, KANConv, KANLinear
from .nets import UKAN, CSAMUNet, DNet, TransUNet, load_vit_r50_npz, ukan_param_groups

__all__ = [
    "CSAM",
    "CSAMUNet",
    "DFF",
    "DLK",
    "DLKBlock",
    "DNet",
    "KANConv",
    "KANLinear",
    "TransUNet",
    "UKAN",
    "load_vit_r50_npz",
    "ukan_param_groups",
]
