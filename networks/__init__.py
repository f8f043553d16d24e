# SPDX-License-Identifier: Apache-2.0
"""Network modules of the collection, named in bundle configs as ``"_target_": "networks.<Name>"``, and their
configurations by name (``networks.create_network("transunet_r50_vit_b16")``, ``networks.list_networks()``)."""

from __future__ import annotations

from . import nets
from .blocks import CSAM, DFF, DLK, DLKBlock, KANConv, KANLinear
from .nets import *  # noqa: F403  every name a network module exports (networks/nets/__init__.py finds them)
from .registry import create_network, list_networks, network_entry, register_network

__all__ = [
    "CSAM",
    "DFF",
    "DLK",
    "DLKBlock",
    "KANConv",
    "KANLinear",
    "create_network",
    "list_networks",
    "network_entry",
    "register_network",
    *nets.__all__,
]
