# SPDX-License-Identifier: Apache-2.0
"""The face every network of the collection shows, checked for every registered configuration: MONAI-style
arguments and one ``size_divisor`` attribute (``tests.utils.assert_network_conventions``)."""

from __future__ import annotations

import pytest
import torch

from networks import UKAN, list_networks
from tests.utils import assert_network_conventions

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/networks/conftest.py


@pytest.mark.parametrize("name", list_networks())
def test_every_registered_configuration_shows_the_collection_face(name):
    assert_network_conventions(name)


def test_conv_blocks_read_the_plain_sequential_layout():
    """A U-KAN checkpoint with its conv blocks in the plain nn.Sequential layout (conv, norm, act, conv, norm, act:
    the official ConvLayer and this collection's U-KAN before the block was shared) loads into the shared block
    with the same outputs."""
    torch.manual_seed(0)
    net = UKAN(2, 1, 2, channels=(16, 24, 32)).eval()
    for m in net.modules():  # running statistics that are not the defaults, so a dropped one shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    new_to_plain = {".0.conv.": ".0.", ".0.adn.N.": ".1.", ".1.conv.": ".3.", ".1.adn.N.": ".4."}
    plain = {}
    for key, value in net.state_dict().items():
        for new, old in new_to_plain.items():
            if new in key:
                key = key.replace(new, old)
                break
        plain[key] = value
    assert any(k.endswith(".4.running_var") for k in plain)  # the layout the old checkpoints have
    fresh = UKAN(2, 1, 2, channels=(16, 24, 32)).eval()
    fresh.load_state_dict(plain)  # strict: no key missing or left over
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x))
