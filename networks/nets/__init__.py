# SPDX-License-Identifier: Apache-2.0
"""The collection's networks, one per file."""

from __future__ import annotations

from .csam_unet import CSAMUNet
from .dnet import DNet
from .transunet import TransUNet
from .transunet_weights import load_vit_r50_npz
from .ukan import UKAN, KANBlock, TokenShift, ukan_param_groups

__all__ = ["CSAMUNet", "DNet", "TransUNet", "load_vit_r50_npz", "UKAN", "KANBlock", "TokenShift", "ukan_param_groups"]
