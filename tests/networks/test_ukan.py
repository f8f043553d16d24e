# SPDX-License-Identifier: Apache-2.0
"""U-KAN (networks.UKAN) and its KAN layers: B-splines against scipy, the official configuration's counts, token
shift, KAN convolutions, parameter groups, TorchScript."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from monai.networks import eval_mode
from torch import nn

from networks import create_network
from networks.blocks.kan import KANConv, KANLinear, b_spline_bases
from networks.nets.ukan import KANBlock, TokenShift, UKAN, ukan_param_groups

scipy_interpolate = pytest.importorskip("scipy.interpolate")

SMALL_DIMS = (16, 24, 32)
OPTION_NAMES = ("use_kan", "token_shift", "use_kan_conv")
OPTION_COMBOS = [dict(zip(OPTION_NAMES, values)) for values in itertools.product((True, False), repeat=3)]
SHAPE_CASES = [
    [{"spatial_dims": 2, "in_channels": 2, "out_channels": 3, **options}, (2, 2, 64, 64), (2, 3, 64, 64)]
    for options in OPTION_COMBOS
] + [
    [{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, **options}, (1, 1, 32, 32, 32), (1, 2, 32, 32, 32)]
    for options in OPTION_COMBOS
]

# Official U-KAN, embed_dims (here channels) (128, 160, 256), in 3 / out 1: 6,356,689 parameters, 3,993,600 of them in
# KANLinear.
PARAM_COUNT_CASES = [
    [{}, 6_356_689, 3_993_600],  # the required 6,356,689 +- 1%: asserted exactly
    [{"token_shift": True}, 6_356_689, 3_993_600],
    [{"use_kan": False}, 2_764_561, 0],
    [{"use_kan_conv": True}, 6_508_753, 4_166_784],
    [{"use_kan_conv": True, "token_shift": True}, 6_508_753, 4_166_784],
]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/networks/conftest.py


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def kan_count(module: nn.Module) -> int:
    return sum(count(m) for m in module.modules() if isinstance(m, (KANLinear, KANConv)))


def reference_bases(x: np.ndarray, knots: np.ndarray, order: int) -> np.ndarray:
    """B_j(x) for one feature by scipy's single basis elements (zero outside each element's support)."""
    basis = scipy_interpolate.BSpline.basis_element
    return np.stack(
        [
            np.nan_to_num(basis(knots[j : j + order + 2], extrapolate=False)(x))
            for j in range(len(knots) - order - 1)
        ],
        axis=-1,
    )


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class TestKANLinear:
    def test_shape_and_leading_dims(self):
        layer = KANLinear(6, 4, grid_size=4, spline_order=2)
        assert layer(torch.randn(3, 5, 6)).shape == (3, 5, 4)
        assert count(layer) == 6 * 4 * (4 + 2 + 2)
        with pytest.raises(ValueError):
            layer(torch.randn(3, 5))

    @pytest.mark.parametrize("grid_size, spline_order", [[5, 3], [3, 2], [7, 1]])
    def test_matches_scipy_reference(self, grid_size, spline_order):
        torch.manual_seed(0)
        layer = KANLinear(3, 2, grid_size=grid_size, spline_order=spline_order).double()
        with torch.no_grad():
            layer.kan_spline_weight.normal_()
        # Inside the grid range, in the extended knots, and beyond all knots.
        x = torch.cat([torch.rand(40, 3) * 5.0 - 2.5, torch.tensor([[-1.0, 0.0, 0.999]])]).double()
        knots = layer.grid.numpy()
        coefficients = layer.scaled_spline_weight().detach().numpy()
        xn = x.numpy()
        expected = silu(xn) @ layer.kan_base_weight.detach().numpy().T
        for i in range(3):
            expected += reference_bases(xn[:, i], knots[i], spline_order) @ coefficients[:, i].T
        with torch.no_grad():
            np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-10)

    def test_bases_are_partition_of_unity_inside_range(self):
        grid = KANLinear(2, 1).grid
        x = torch.rand(100, 2) * 2 - 1
        torch.testing.assert_close(b_spline_bases(x, grid, 3).sum(-1), torch.ones(100, 2))

    def test_update_grid(self):
        torch.manual_seed(0)
        layer = KANLinear(8, 6)
        with torch.no_grad():
            layer.kan_spline_weight.normal_()  # make the spline branch dominate
        x = (torch.randn(3000, 8) * 0.3).clamp(-0.95, 0.95)
        held_out = (torch.randn(500, 8) * 0.3).clamp(x.min(0).values, x.max(0).values)
        old_grid = layer.grid.clone()
        with torch.no_grad():
            before, held_out_before = layer(x), layer(held_out)
        layer.update_grid(x)
        assert not torch.allclose(layer.grid, old_grid)
        assert (layer.grid.diff(dim=1) > 0).all()
        with torch.no_grad():
            after, held_out_after = layer(x), layer(held_out)
        assert (after - before).norm() / before.norm() < 0.05
        assert (held_out_after - held_out_before).norm() / held_out_before.norm() < 0.05

    def test_regularization_loss(self):
        layer = KANLinear(5, 3)
        loss = layer.regularization_loss(regularize_activation=1.0, regularize_entropy=1.0)
        assert loss.ndim == 0 and loss.item() > 0 and loss.requires_grad
        loss.backward()
        assert layer.kan_spline_weight.grad is not None and layer.kan_spline_weight.grad.abs().sum() > 0

    def test_script(self):
        layer = KANLinear(4, 3)
        x = torch.randn(2, 7, 4)
        torch.testing.assert_close(torch.jit.script(layer)(x), layer(x))


class TestKANConv:
    @pytest.mark.parametrize(
        "spatial_dims, conv_args, in_shape, out_shape",
        [
            [2, {"kernel_size": 3, "padding": 1}, (2, 4, 8, 8), (2, 6, 8, 8)],
            [2, {"kernel_size": 3, "stride": 2, "padding": 1}, (2, 4, 8, 8), (2, 6, 4, 4)],
            [3, {"kernel_size": 3, "padding": 1}, (1, 4, 6, 6, 6), (1, 6, 6, 6, 6)],
            [3, {"kernel_size": 1}, (1, 4, 5, 6, 7), (1, 6, 5, 6, 7)],
        ],
    )
    def test_shape_and_grad(self, spatial_dims, conv_args, in_shape, out_shape):
        conv = KANConv(spatial_dims, 4, 6, **conv_args)
        x = torch.randn(in_shape, requires_grad=True)
        y = conv(x)
        assert y.shape == out_shape
        y.square().mean().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        for name, p in conv.named_parameters():
            assert "kan" in name and p.grad is not None and p.grad.abs().sum() > 0, name

    def test_depthwise_param_count(self):
        conv = KANConv(3, 8, 8, kernel_size=3, padding=1, groups=8)
        assert count(conv) == 8 * 27 * (5 + 3 + 1) + 8
        with pytest.raises(ValueError):
            KANConv(2, 6, 4, groups=4)

    def test_equals_patchwise_kan(self):
        """Without padding, each output is a KAN over its receptive field: per-edge SiLU base + spline sum."""
        torch.manual_seed(0)
        conv = KANConv(2, 2, 3, kernel_size=3, groups=1).double()
        with torch.no_grad():
            conv.kan_spline_conv.weight.normal_()
        x = torch.rand(1, 2, 5, 6, dtype=torch.float64) * 3 - 1.5
        with torch.no_grad():
            y = conv(x).numpy()
        xn, knots = x.numpy()[0], conv.grid.numpy()
        base_w = conv.kan_base_conv.weight.detach().numpy()
        spline_w = conv.kan_spline_conv.weight.detach().numpy().reshape(3, 2, 8, 3, 3)
        expected = np.zeros((3, 3, 4)) + conv.kan_base_conv.bias.detach().numpy()[:, None, None]
        for o, c, h, w, dy, dx in itertools.product(range(3), range(2), range(3), range(4), range(3), range(3)):
            value = xn[c, h + dy, w + dx]
            bases = reference_bases(np.array([value]), knots[c], 3)[0]
            expected[o, h, w] += base_w[o, c, dy, dx] * silu(value) + bases @ spline_w[o, c, :, dy, dx]
        np.testing.assert_allclose(y[0], expected, atol=1e-10)

    def test_script(self):
        conv = KANConv(3, 3, 2, kernel_size=3, padding=1)
        x = torch.randn(1, 3, 4, 4, 4)
        torch.testing.assert_close(torch.jit.script(conv)(x), conv(x))


class TestTokenShift:
    @pytest.mark.parametrize("spatial_dims, axis", [[2, 0], [2, 1], [3, 0], [3, 2]])
    def test_matches_reference(self, spatial_dims, axis):
        shift = TokenShift(spatial_dims, axis, shift_size=5)
        x = torch.randn((2, 7) + (6,) * spatial_dims)
        dim = axis + 2
        expected = []
        for offset, group in zip(range(-2, 3), torch.tensor_split(x, 5, dim=1)):
            moved = torch.roll(group, offset, dims=dim)
            index = torch.arange(x.shape[dim])
            valid = ((index - offset >= 0) & (index - offset < x.shape[dim])).to(x.dtype)
            expected.append(moved * valid.view([-1] + [1] * (x.ndim - dim - 1)))
        torch.testing.assert_close(shift(x), torch.cat(expected, dim=1))
        torch.testing.assert_close(torch.jit.script(shift)(x), shift(x))

    def test_invalid(self):
        with pytest.raises(ValueError):
            TokenShift(2, 0, shift_size=4)
        with pytest.raises(ValueError):
            TokenShift(2, 2)


class TestUKAN:
    @pytest.mark.parametrize("args, in_shape, out_shape", SHAPE_CASES)
    def test_shape(self, args, in_shape, out_shape):
        net = UKAN(channels=SMALL_DIMS, **args)
        with eval_mode(net):
            assert net(torch.randn(in_shape)).shape == out_shape

    @pytest.mark.parametrize("options, expected, expected_kan", PARAM_COUNT_CASES)
    def test_param_count(self, options, expected, expected_kan):
        net = create_network("ukan_official", **options)
        assert count(net) == expected
        assert kan_count(net) == expected_kan

    def test_in_channels_honoured(self):
        assert count(UKAN(2, 1, 1)) == 6_356_689 - 2 * 16 * 9

    def test_use_kan_false_uses_linear(self):
        kan_net = UKAN(2, 3, 1, channels=SMALL_DIMS)
        mlp_net = UKAN(2, 3, 1, channels=SMALL_DIMS, use_kan=False)
        kan_fcs = [m.fc for m in kan_net.modules() if hasattr(m, "fc")]
        mlp_fcs = [m.fc for m in mlp_net.modules() if hasattr(m, "fc")]
        assert len(kan_fcs) == len(mlp_fcs) == 12
        assert all(isinstance(fc, KANLinear) for fc in kan_fcs)
        assert all(type(fc) is nn.Linear for fc in mlp_fcs)
        assert [(fc.in_features, fc.out_features) for fc in kan_fcs] == [
            (fc.in_features, fc.out_features) for fc in mlp_fcs
        ]
        assert not any(isinstance(m, (KANLinear, KANConv)) for m in mlp_net.modules())
        assert count(mlp_net) < count(kan_net)
        assert mlp_net.regularization_loss().item() == 0.0

    def test_kan_names_and_param_groups(self):
        net = UKAN(2, 3, 1, channels=SMALL_DIMS, use_kan_conv=True)
        kan_ids = {id(p) for m in net.modules() if isinstance(m, (KANLinear, KANConv)) for p in m.parameters()}
        named_kan_ids = {id(p) for name, p in net.named_parameters() if "kan" in name}
        assert kan_ids == named_kan_ids and kan_ids

        groups = ukan_param_groups(net, lr=1e-4, kan_lr=1e-2, weight_decay=1e-4)
        assert [g["lr"] for g in groups] == [1e-4, 1e-2]
        assert all(g["weight_decay"] == 1e-4 for g in groups)
        assert {id(p) for p in groups[1]["params"]} == kan_ids
        assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
        optimizer = torch.optim.Adam(groups)
        net(torch.randn(2, 3, 32, 32)).mean().backward()
        optimizer.step()

        mlp_groups = ukan_param_groups(UKAN(2, 3, 1, channels=SMALL_DIMS, use_kan=False), 1e-4, 1e-2)
        assert len(mlp_groups) == 1 and mlp_groups[0]["lr"] == 1e-4

    @pytest.mark.parametrize("spatial_dims, in_shape", [[2, (1, 2, 64, 64)], [3, (1, 2, 32, 32, 32)]])
    def test_script_matches_eager(self, spatial_dims, in_shape):
        options = {"token_shift": True, "use_kan_conv": True, "drop_path_rate": 0.1, "dropout": 0.1}
        net = UKAN(spatial_dims, 2, 2, channels=SMALL_DIMS, **options)
        x = torch.randn(in_shape)
        with eval_mode(net):
            scripted = torch.jit.script(net)
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
            torch.testing.assert_close(loaded(x), net(x))

    @pytest.mark.parametrize("spatial_dims, in_shape", [[2, (2, 1, 32, 64)], [3, (2, 1, 32, 32, 32)]])
    def test_gradients_reach_all_parameters(self, spatial_dims, in_shape):
        torch.manual_seed(0)
        net = UKAN(spatial_dims, 1, 2, channels=SMALL_DIMS, token_shift=True, use_kan_conv=True, depths=(1, 2, 1))
        net.train()
        net(torch.randn(in_shape)).square().mean().backward()
        (net.regularization_loss() * 0.0).backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    def test_depths(self):
        net = UKAN(3, 1, 1, channels=SMALL_DIMS, depths=(2, 3, 1))
        stages = (net.encoder4, net.bottleneck, net.decoder_blocks1, net.decoder_blocks2)
        blocks = [sum(isinstance(m, KANBlock) for m in stage.modules()) for stage in stages]
        assert blocks == [3, 1, 3, 2]

    def test_regularization_loss(self):
        net = UKAN(2, 1, 1, channels=SMALL_DIMS)
        loss = net.regularization_loss()
        assert loss.ndim == 0 and loss.item() > 0 and loss.requires_grad

    @pytest.mark.parametrize("in_shape", [(1, 1, 48, 64), (1, 1, 64, 64, 40)])
    def test_size_not_divisible(self, in_shape):
        net = UKAN(len(in_shape) - 2, 1, 1, channels=SMALL_DIMS)
        with pytest.raises(ValueError, match="divisible by 32"):
            net(torch.randn(in_shape))

    @pytest.mark.parametrize(
        "overrides",
        [
            {"spatial_dims": 1},
            {"channels": (12, 24, 32)},
            {"channels": (16, 32)},
            {"depths": (1, 1)},
            {"depths": (1, 0, 1)},
            {"token_shift": True, "shift_size": 4},
            {"dropout": 1.5},
        ],
    )
    def test_invalid_args(self, overrides):
        args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": SMALL_DIMS, **overrides}
        with pytest.raises(ValueError):
            UKAN(**args)
