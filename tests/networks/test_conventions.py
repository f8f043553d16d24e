# SPDX-License-Identifier: Apache-2.0
"""The face every network of the collection shows: MONAI-style arguments and one ``size_divisor`` attribute."""

from __future__ import annotations

import inspect

import pytest
import torch
from monai.networks import eval_mode
from monai.transforms import DivisiblePad
from parameterized import parameterized

from networks import UKAN, CSAMUNet, DNet, TransUNet

TINY_TRANSUNET = {
    "img_size": 32,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "mlp_dim": 32,
    "resnet_block_units": (1, 1, 1),
    "resnet_width_factor": 0.5,
    "decoder_channels": (16, 8, 8, 4),
    "decoder_head_channels": 16,
}
# (network, constructor arguments, input shape that is not a multiple of the divisor, expected size_divisor)
CASES = [
    [DNet, {"spatial_dims": 3, "channels": (4, 8, 8, 8, 8)}, (1, 1, 30, 33, 17), (32, 32, 32)],
    [DNet, {"spatial_dims": 2, "channels": (4, 8, 8, 8, 8)}, (1, 1, 30, 33), (32, 32)],
    [UKAN, {"spatial_dims": 3, "channels": (8, 8, 8)}, (1, 1, 30, 33, 17), (32, 32, 32)],
    [UKAN, {"spatial_dims": 2, "channels": (8, 8, 8)}, (1, 1, 30, 33), (32, 32)],
    [CSAMUNet, {"channels": (4, 8, 8)}, (1, 1, 6, 9, 5), (4, 4, 1)],
    [TransUNet, TINY_TRANSUNET, (1, 1, 30, 33), (16, 16)],
]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/networks/conftest.py


@parameterized.expand(CASES)
def test_size_divisor_pads_any_input(network, kwargs, shape, divisor):
    """``DivisiblePad(k=net.size_divisor)`` (what the configs use) makes any input acceptable; unpadded it is not."""
    net = network(in_channels=1, out_channels=2, **kwargs)
    assert net.size_divisor == divisor and len(divisor) == net.spatial_dims == len(shape) - 2
    x = torch.randn(shape)
    padded = DivisiblePad(k=net.size_divisor)(x[0]).as_tensor()[None]
    with eval_mode(net):
        assert net(padded).shape == (1, 2, *padded.shape[2:])
        with pytest.raises(ValueError, match="divisible by"):
            net(x)


@parameterized.expand([[DNet], [UKAN], [CSAMUNet], [TransUNet]])
def test_monai_argument_names(network):
    """``spatial_dims`` (where the network has a choice) first, then in_channels, out_channels; one width name."""
    names = list(inspect.signature(network).parameters)
    start = ["in_channels", "out_channels"]
    if "spatial_dims" in names:
        start.insert(0, "spatial_dims")
    assert names[: len(start)] == start
    widths = {"channels", "feature_sizes", "embed_dims", "features"} & set(names)
    assert widths <= {"channels"}


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
