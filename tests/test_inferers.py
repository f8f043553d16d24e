# SPDX-License-Identifier: Apache-2.0
"""Test-time mirroring: the mean of the mirrored predictions, mirrored back."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer

from bundletools.inferers import MirroredInferer


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 3, kernel_size=3, padding=1).eval()  # not mirror-symmetric


def test_mirrored_probabilities_are_the_mean_over_every_flip():
    net, x = _net(), torch.randn(2, 1, 6, 7, 8)
    with torch.no_grad():
        out = MirroredInferer(SimpleInferer(), axes=(0, 1, 2))(x, net)
        expected = torch.zeros(2, 3, 6, 7, 8)
        for k in range(4):
            for dims in itertools.combinations((2, 3, 4), k):
                expected += torch.flip(torch.softmax(net(torch.flip(x, dims)), 1), dims) if dims else torch.softmax(net(x), 1)
        expected /= 8
    assert out.shape == (2, 3, 6, 7, 8)
    torch.testing.assert_close(torch.softmax(out, 1), expected)
    # differs from the plain prediction: the network is not symmetric
    assert not torch.allclose(torch.softmax(out, 1), torch.softmax(net(x), 1), atol=1e-3)


def test_no_axes_is_the_inner_inferer_and_bad_axes_are_refused():
    net, x = _net(), torch.randn(1, 1, 16, 16, 16)
    inner = SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.25)
    with torch.no_grad():
        torch.testing.assert_close(MirroredInferer(inner, axes=())(x, net), inner(x, net))
        with pytest.raises(ValueError, match="do not exist"):
            MirroredInferer(inner, axes=(3,))(x, net)
    with pytest.raises(ValueError, match="distinct"):
        MirroredInferer(inner, axes=(0, 0))


def test_a_symmetric_network_gives_its_own_prediction():
    net = torch.nn.Conv3d(1, 2, kernel_size=1).eval()  # pointwise: mirroring changes nothing
    x = torch.randn(1, 1, 5, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(MirroredInferer(SimpleInferer(), (0, 2))(x, net), 1),
                                   torch.softmax(net(x), 1))
