# SPDX-License-Identifier: Apache-2.0
"""The fast CPU paths (networks.blocks.fast, even_b_spline_bases) give the plain ops' numbers, and are taken."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks import DNet, create_network
from networks.blocks.fast import FastConv2d, FastConv3d, FastConvTranspose2d, FastConvTranspose3d, plain_ops
from networks.blocks.kan import KANConv, KANLinear, b_spline_bases, even_b_spline_bases


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/networks/conftest.py


def outputs_and_grads(module: nn.Module, x: torch.Tensor, plain: bool) -> tuple[list[torch.Tensor], dict]:
    """Outputs and the gradients of ``x`` and every parameter for the loss sum(mean(out ** 2))."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    if plain:
        with plain_ops():
            out = module(x)
    else:
        out = module(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    sum(o.square().mean() for o in outs).backward()
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters() if p.grad is not None})
    return [o.detach() for o in outs], grads


def assert_same_numbers(module: nn.Module, x: torch.Tensor, rtol: float) -> None:
    """Fast and plain paths agree on outputs and gradients, relative to each tensor's largest magnitude."""
    plain_out, plain_grads = outputs_and_grads(module, x, plain=True)
    fast_out, fast_grads = outputs_and_grads(module, x, plain=False)
    for p, f in zip(plain_out, fast_out):
        assert f.shape == p.shape
        torch.testing.assert_close(f, p, rtol=0, atol=rtol * p.abs().max().item())
    assert plain_grads.keys() == fast_grads.keys()
    largest = max(g.abs().max().item() for g in plain_grads.values())
    for name, p in plain_grads.items():
        # a gradient that is zero up to rounding (a conv bias before a BatchNorm) has no relative error to speak of
        scale = max(p.abs().max().item(), 1e-2 * largest)
        torch.testing.assert_close(fast_grads[name], p, rtol=0, atol=rtol * scale, msg=name)


DEPTHWISE = {"kernel_size": 3, "padding": 1}
UP = {"kernel_size": 2, "stride": 2}
CONV_CASES = [
    # depthwise, "same" padding: the custom autograd function
    [FastConv3d, {"in_channels": 6, "kernel_size": 7, "padding": 9, "dilation": 3, "groups": 6}, (1, 6, 9, 8, 10)],
    [FastConv3d, {"in_channels": 4, "kernel_size": 5, "padding": 2, "groups": 4}, (2, 4, 7, 6, 5)],
    [FastConv3d, {"in_channels": 4, **DEPTHWISE, "groups": 4, "bias": False}, (2, 4, 5, 5, 5)],
    [FastConv2d, {"in_channels": 5, **DEPTHWISE, "groups": 5}, (3, 5, 9, 7)],
    [FastConv2d, {"in_channels": 4, "kernel_size": 7, "padding": 9, "dilation": 3, "groups": 4}, (1, 4, 12, 11)],
    # pointwise: a matrix product on channels-last input, the plain conv otherwise
    [FastConv3d, {"in_channels": 6, "out_channels": 10, "kernel_size": 1}, (2, 6, 4, 5, 3)],
    [FastConv2d, {"in_channels": 6, "out_channels": 3, "kernel_size": 1, "bias": False}, (2, 6, 5, 7)],
    # kernels reaching beyond the input (7-kernel, dilation 3 on 4 and 2 voxels): the taps on padding only are cut
    [FastConv3d, {"in_channels": 6, "kernel_size": 7, "padding": 9, "dilation": 3, "groups": 6}, (2, 6, 4, 2, 9)],
    [FastConv3d, {"in_channels": 2, "kernel_size": 7, "padding": 3}, (1, 2, 2, 3, 8)],
    [FastConv2d, {"in_channels": 3, "kernel_size": 5, "padding": 2, "groups": 3}, (2, 3, 1, 6)],
    # neither: the plain conv
    [FastConv3d, {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1}, (2, 3, 8, 8, 8)],
    # transposed, kernel == stride: a matrix product and a reshape
    [FastConvTranspose3d, {"in_channels": 6, "out_channels": 4, **UP}, (2, 6, 3, 4, 5)],
    [FastConvTranspose2d, {"in_channels": 6, "out_channels": 4, **UP, "bias": False}, (1, 6, 3, 5)],
]


@pytest.mark.parametrize("layer_type, kwargs, shape", CONV_CASES)
def test_fast_conv_matches_plain_conv(layer_type, kwargs, shape):
    torch.manual_seed(0)
    layer = layer_type(**{"out_channels": kwargs["in_channels"], **kwargs})
    for memory_format in (torch.contiguous_format, torch.channels_last_3d if len(shape) == 5 else torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=memory_format)
        assert_same_numbers(layer, x, rtol=1e-5)


def test_depthwise_fast_path_is_taken_in_3d():
    """A 3D depthwise conv's backward is the custom one; 2D depthwise convs keep PyTorch's (faster there)."""
    layer = FastConv3d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    assert layer(x).grad_fn.name() == "_DepthwiseConvBackward"
    with plain_ops():
        assert layer(x).grad_fn.name() == "ConvolutionBackward0"
    assert FastConv2d(4, 4, 3, padding=1, groups=4)(x[..., 0]).grad_fn.name() == "ConvolutionBackward0"


@pytest.mark.parametrize("spline_order", [3, 2, 1, 0])
def test_even_bases_match_cox_de_boor(spline_order):
    torch.manual_seed(0)
    layer = KANLinear(5, 3, grid_size=5, spline_order=spline_order)
    assert layer.even_knots
    # inside the grid range, in the extended knots, beyond every knot; and on knots, where splines of degree 0 jump
    # and those of degree 1 have a kink, so that rounding may pick either side
    x = torch.rand(200, 5) * 6 - 3
    if spline_order >= 2:
        x = torch.cat([x, layer.grid[:, :7].t()])
    x.requires_grad_()
    bases = even_b_spline_bases(x, layer.knot_start, layer.knot_step, 5, spline_order)
    expected = b_spline_bases(x, layer.grid, spline_order)
    torch.testing.assert_close(bases, expected, rtol=0, atol=1e-5)
    weights = torch.randn_like(bases)
    (grad,) = torch.autograd.grad((bases * weights).sum(), x)
    if spline_order == 0:  # piecewise constant
        assert not grad.any()
        return
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-4)


def test_kan_layers_fast_path_and_uneven_knots():
    torch.manual_seed(0)
    layer = KANLinear(6, 4)
    assert_same_numbers(layer, torch.randn(2, 50, 6) * 1.5, rtol=1e-5)
    conv = KANConv(3, 6, 6, kernel_size=3, padding=1, groups=3)
    assert_same_numbers(conv, torch.randn(2, 6, 5, 4, 6), rtol=1e-5)
    # update_grid moves the knots to the data: no longer even, so the layer takes the Cox-de Boor path
    layer.update_grid(torch.randn(500, 6))
    assert not layer.even_knots
    # a state dict with uneven knots makes a fresh layer take that path too; one with even knots, the fast one
    fresh = KANLinear(6, 4)
    fresh.load_state_dict(layer.state_dict())
    assert not fresh.even_knots
    x = torch.randn(10, 6)
    torch.testing.assert_close(fresh(x), layer(x))
    fresh.load_state_dict(KANLinear(6, 4).state_dict())
    assert fresh.even_knots


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
    "dropout_rate": 0.0,
}
SMALL_DNET = {"channels": (8, 16, 16, 16, 32), "layer_scale_init": 0.5}
SMALL_UKAN = {"channels": (16, 24, 32)}
# (registered configuration, overrides that make it small, input)
NETWORK_CASES = [
    ["dnet_official", SMALL_DNET, (1, 1, 32, 32, 32)],
    ["dnet_paper", SMALL_DNET, (2, 1, 32, 32, 32)],
    ["dnet_paper", {"spatial_dims": 2, **SMALL_DNET}, (2, 1, 64, 32)],
    ["ukan_official", SMALL_UKAN, (2, 3, 64, 64)],
    ["ukan_official", {"spatial_dims": 3, **SMALL_UKAN, "use_kan_conv": True, "token_shift": True}, (2, 1, 32, 32, 32)],
    ["transunet_r50_vit_b16", TINY_TRANSUNET, (2, 1, 32, 48)],
]


@pytest.mark.parametrize("name, kwargs, shape", NETWORK_CASES)
def test_network_fast_path_matches_plain_path(name, kwargs, shape):
    """
    The whole network in training mode: outputs (every deep-supervision head) and all gradients. The tolerance is
    that of PyTorch's channels-last BatchNorm, which computes batch statistics in one float32 pass (errors near
    1e-4 where a channel's mean is several standard deviations); the other fast paths agree to about 1e-5.
    """
    torch.manual_seed(0)
    net = create_network(name, in_channels=shape[1], out_channels=3, **kwargs).train()
    x = torch.randn(shape)
    assert_same_numbers(net, x, rtol=1e-3)
    outs = net(x)
    assert all(out.is_contiguous() for out in (outs if isinstance(outs, list) else [outs]))


def test_network_runs_channels_last_inside():
    """The fast path runs the convolutions channels-last; the plain path does not."""
    net = DNet(3, 2, 2, channels=(8, 16, 16, 16, 32)).eval()
    layouts = []
    net.downsamples[0].register_forward_hook(
        lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last_3d))
    )
    x = torch.randn(1, 2, 32, 32, 32)  # two channels: a one-channel tensor is laid out both ways
    with torch.no_grad():
        net(x)
        with plain_ops():
            net(x)
    assert layouts == [True, False]


def test_deepcopy_and_double_keep_kan_layers_exact():
    """A float64 copy of a float32 layer has knots that are even only up to float32 rounding: plain path."""
    layer = KANLinear(4, 2)
    double = copy.deepcopy(layer).double()
    assert layer.even_knots and not double.even_knots


@pytest.mark.parametrize("case", [NETWORK_CASES[1], NETWORK_CASES[3], NETWORK_CASES[5]])
def test_bf16_autocast_trains(case):
    """Under CPU bfloat16 autocast the custom autograd functions run in float32 and every parameter gets a gradient."""
    name, kwargs, shape = case
    net = create_network(name, in_channels=shape[1], out_channels=2, **kwargs).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(shape))
    sum(o.float().mean() for o in (out if isinstance(out, list) else [out])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())



def test_3d_depthwise_convs_stay_in_float32_under_autocast_on_the_plain_path_too():
    """The plain path (what a GPU runs) keeps D-Net's 3D depthwise convolutions in float32 under autocast, as the
    fast CPU path does; other convolutions follow autocast, and ``half_precision_depthwise`` lifts the rule."""
    from networks.blocks.fast import half_precision_depthwise

    torch.manual_seed(0)
    depthwise = FastConv3d(4, 4, kernel_size=7, padding=9, dilation=3, groups=4)
    pointwise = FastConv3d(4, 4, kernel_size=1)
    x = torch.randn(1, 4, 10, 12, 8)
    reference = depthwise(x)
    with plain_ops(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        assert pointwise(x).dtype == torch.bfloat16
        with half_precision_depthwise():
            assert depthwise(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fast CPU path, as before
        assert depthwise(x).dtype == torch.float32
