# SPDX-License-Identifier: Apache-2.0
"""Named configurations: registered next to their network, found by listing the network files."""

from __future__ import annotations

import pytest
import torch

import networks
from networks import create_network, list_networks, network_entry, register_network
from networks.nets.dnet import DNet
from tests.utils import assert_network_conventions

PAPER_CONFIGURATIONS = ["csam_unet_paper", "dnet_official", "dnet_paper", "transunet_r50_vit_b16", "ukan_official"]


def test_the_papers_configurations_are_registered_with_a_description_and_an_input():
    assert set(PAPER_CONFIGURATIONS) <= set(list_networks())
    assert list_networks("dnet_*") == ["dnet_official", "dnet_paper"]
    entry = network_entry("transunet_r50_vit_b16")
    assert entry.input_shape == (2, 3, 224, 224)
    assert entry.description.startswith("TransUNet R50-ViT-B/16 as the official train.py builds it")


def test_create_network_overrides_any_constructor_argument():
    net = create_network("dnet_official", channels=(4, 8, 8, 8, 8), out_channels=2)
    assert isinstance(net, DNet) and net.output.out_channels == 2
    official = [m for m in net.modules() if type(m).__name__ == "DLKBlock"]
    assert official and all(block.mlp_norm is None for block in official)  # shared_norm=True kept


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown network 'dnet'; known: .*dnet_official"):
        create_network("dnet")


def test_a_name_taken_by_another_module_is_refused():
    def dnet_paper(**overrides):
        return torch.nn.Identity()

    dnet_paper.__module__ = "somewhere.else"
    with pytest.raises(ValueError, match="registered by both networks.nets.dnet and somewhere.else"):
        register_network(input_shape=(1, 1, 8, 8))(dnet_paper)


def test_a_new_network_file_is_found_without_being_listed(scratch_network):
    """A module put next to the networks (tests/conftest.py's scratch_network) registers its configurations as
    soon as the networks are listed, and shows the collection's face."""
    assert scratch_network not in networks.registry._REGISTRY  # nothing imported it yet
    assert scratch_network in list_networks()
    assert create_network(scratch_network, out_channels=4).up.out_channels == 4
    assert_network_conventions(scratch_network)
