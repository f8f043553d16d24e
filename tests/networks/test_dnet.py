# SPDX-License-Identifier: Apache-2.0
"""D-Net (networks.DNet) and its blocks, DLK and DFF: shapes, the paper's and the official code's configurations,
TorchScript, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from monai.networks import eval_mode, train_mode

from networks import create_network
from networks.blocks.dff import DFF
from networks.blocks.dlk import DLK, DLKAttention, DLKBlock
from networks.nets.dnet import DNet

TINY = (8, 16, 32, 64, 128)
OFFICIAL_PARAMS = 39_279_174  # official HEAD code, in_channels=1, 16 classes
PAPER_DEFAULT_PARAMS = 39_292_518  # + a LayerNorm and a layer scale per DLK sub-block, + one salience BatchNorm


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/networks/conftest.py


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


BLOCK_CASES = [
    [DLK, {"spatial_dims": 3, "channels": 8}, (2, 8, 9, 10, 11)],
    [DLK, {"spatial_dims": 2, "channels": 6, "per_branch_selection": False}, (2, 6, 13, 7)],
    [DLKAttention, {"spatial_dims": 3, "channels": 4}, (1, 4, 8, 8, 8)],
    [DLKBlock, {"spatial_dims": 3, "channels": 8}, (2, 8, 6, 7, 8)],
    [DLKBlock, {"spatial_dims": 2, "channels": 8, "shared_norm": True, "drop_path": 0.1}, (2, 8, 12, 10)],
]


@pytest.mark.parametrize("block, kwargs, shape", BLOCK_CASES)
def test_dlk_shapes(block, kwargs, shape):
    net = block(**kwargs)
    with eval_mode(net):
        assert net(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("spatial_dims, shape", [[3, (2, 8, 9, 10, 11)], [2, (2, 8, 13, 7)]])
def test_dff_shape(spatial_dims, shape):
    net = DFF(spatial_dims, shape[1])
    with eval_mode(net):
        assert net(torch.randn(shape), torch.randn(shape)).shape == shape


@pytest.mark.parametrize("block, spatial_dims, channels", [[DLK, 3, 7], [DLK, 1, 8], [DLKBlock, 4, 8], [DFF, 1, 8]])
def test_block_bad_args(block, spatial_dims, channels):
    with pytest.raises(ValueError):
        block(spatial_dims, channels)


# (registered configuration, overrides, input shape, output shape), all at the TINY widths
NET_CASES = [
    ["dnet_paper", {"out_channels": 3}, (1, 1, 32, 32, 32), (1, 3, 32, 32, 32)],
    ["dnet_official", {"in_channels": 2, "out_channels": 4, "depths": (1, 1, 2, 1, 1)}, (2, 2, 64, 32, 32),
     (2, 4, 64, 32, 32)],
    ["dnet_paper", {"out_channels": 2, "deep_supervision": False}, (1, 1, 32, 64, 32), (1, 2, 32, 64, 32)],
    ["dnet_paper", {"spatial_dims": 2, "in_channels": 3, "out_channels": 2}, (2, 3, 64, 32), (2, 2, 64, 32)],
]


@pytest.mark.parametrize("name, kwargs, input_shape, expected_shape", NET_CASES)
def test_dnet_eval_shape(name, kwargs, input_shape, expected_shape):
    net = create_network(name, channels=TINY, **kwargs)
    with eval_mode(net):
        out = net(torch.randn(input_shape))
    assert isinstance(out, torch.Tensor) and out.shape == expected_shape


@pytest.mark.parametrize("spatial_dims, input_shape", [[3, (1, 1, 64, 32, 32)], [2, (2, 1, 64, 32)]])
def test_dnet_deep_supervision_outputs(spatial_dims, input_shape):
    net = DNet(spatial_dims, 1, 3, channels=TINY)
    with train_mode(net):
        outs = net(torch.randn(input_shape))
    assert isinstance(outs, list) and len(outs) == 5
    for k, out in enumerate(outs):  # full, 1/2, 1/4, 1/8, 1/16
        assert out.shape == (input_shape[0], 3, *(s // 2**k for s in input_shape[2:]))


def test_dnet_without_deep_supervision_returns_tensor_in_training():
    net = DNet(3, 1, 3, channels=TINY, deep_supervision=False)
    with train_mode(net):
        out = net(torch.randn(2, 1, 32, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32, 32)


@pytest.mark.parametrize("input_shape", [(1, 1, 32, 32, 40), (1, 1, 48, 48, 48), (1, 1, 32, 32)])
def test_dnet_bad_input_raises(input_shape):
    net = DNet(3, 1, 2, channels=TINY)
    with eval_mode(net), pytest.raises(ValueError):
        net(torch.randn(input_shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": (8, 16, 32, 64)},
        {"channels": (8, 16, 32, 64, 127)},
        {"channels": TINY, "depths": (2, 2, 2)},
        {"channels": TINY, "depths": 0},
        {"channels": TINY, "spatial_dims": 1},
        {"channels": TINY, "dropout": 1.5},
        {"channels": TINY, "drop_path_rate": -0.1},
    ],
)
def test_dnet_bad_args(kwargs):
    with pytest.raises(ValueError):
        DNet(**{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, **kwargs})


def test_parameter_counts():
    with torch.device("meta"):  # shapes only: the counts need no weights
        default = num_params(create_network("dnet_paper"))
        official = num_params(create_network("dnet_official", out_channels=16))
    assert official == OFFICIAL_PARAMS
    assert default == PAPER_DEFAULT_PARAMS
    assert abs(default - OFFICIAL_PARAMS) <= 0.01 * OFFICIAL_PARAMS


def test_shared_norm_ties_parameters():
    separate, shared = DLKBlock(3, 8), DLKBlock(3, 8, shared_norm=True)
    assert num_params(separate) - num_params(shared) == 3 * 8  # LayerNorm weight + bias, layer scale
    assert shared.mlp_norm is None and shared.mlp_scale is None


def test_per_branch_selection_changes_output():
    torch.manual_seed(0)
    per_branch, official = DLK(3, 8), DLK(3, 8, per_branch_selection=False)
    official.load_state_dict(per_branch.state_dict())
    x = torch.randn(1, 8, 8, 8, 8)
    assert not torch.allclose(per_branch(x), official(x))


def test_quirk_switches_change_network_output():
    torch.manual_seed(0)
    nets = [DNet(3, 1, 2, channels=TINY, layer_scale_init=1.0, per_branch_selection=pb) for pb in (True, False)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with eval_mode(*nets):
        assert not torch.allclose(nets[0](x), nets[1](x))


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = DNet(3, 1, 2, channels=TINY, drop_path_rate=0.1, dropout=0.1)
    with train_mode(net):
        outs = net(torch.randn(2, 1, 32, 32, 32))
    sum(out.mean() for out in outs).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = DNet(3, 1, 2, channels=TINY, layer_scale_init=0.5, drop_path_rate=0.2)
    checkpointed = DNet(3, 1, 2, channels=TINY, layer_scale_init=0.5, drop_path_rate=0.2, use_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    grads, dlk_calls = [], []
    for net in (plain, checkpointed):
        calls = []
        for module in net.modules():
            if isinstance(module, DLK):
                module.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)
        with train_mode(net):
            sum(out.square().mean() for out in net(x)).backward()
        grads.append({name: p.grad for name, p in net.named_parameters()})
        dlk_calls.append(len(calls))
    assert dlk_calls[1] == 2 * dlk_calls[0]  # the backward pass recomputed every DLK
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("name", ["dnet_paper", "dnet_official"])
def test_torchscript_and_trace_match_eager(name):
    torch.manual_seed(0)
    net = create_network(name, out_channels=3, channels=TINY, layer_scale_init=0.5, dropout=0.2)
    x = torch.randn(1, 1, 32, 32, 32)
    with eval_mode(net):
        expected = net(x)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x)
        assert torch.allclose(scripted(x), expected, atol=1e-6)
        assert torch.allclose(traced(x), expected, atol=1e-6)
