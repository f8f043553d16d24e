# SPDX-License-Identifier: Apache-2.0
"""CSAM (networks.blocks.CSAM) and the CSAM U-Net (networks.CSAMUNet): any slice count, volumes kept apart, the
stochastic slice attention and Monte-Carlo inference, parameter counts, TorchScript."""

from __future__ import annotations

import math

import pytest
import torch
from monai.utils import set_determinism

from networks import create_network
from networks.blocks.csam import CSAM
from networks.nets.csam_unet import CSAMUNet

TINY = (4, 8, 16)  # widths of a 3-level network: H and W divisible by 4

CSAM_CASES = [
    [{"in_channels": 8}, (8, 6)],
    [{"in_channels": 8, "uncertainty": False}, (8, 6)],
    [{"in_channels": 8, "semantic": False}, (8, 6)],
    [{"in_channels": 8, "positional": False, "slice_attention": False}, (8, 6)],
    [{"in_channels": 8, "slice_attention": False}, (8, 6)],
    [{"in_channels": 1}, (5, 7)],
    [{"in_channels": 3, "spatial_dims": 3, "slice_kernel_size": 5, "rank": 2}, (4, 4, 2)],
]


def _net_args(**overrides) -> dict:
    return {"in_channels": 1, "out_channels": 2, "channels": TINY, **overrides}


NET_CASES = [
    [_net_args(out_channels=3), (2, 1, 8, 12, 5), (2, 3, 8, 12, 5)],
    [_net_args(in_channels=2, out_channels=1), (1, 2, 4, 8, 3), (1, 1, 4, 8, 3)],
    [_net_args(use_csam=False), (2, 1, 8, 8, 4), (2, 2, 8, 8, 4)],
    [_net_args(uncertainty=False), (1, 1, 8, 8, 4), (1, 2, 8, 8, 4)],
    [_net_args(slice_attention=False), (1, 1, 8, 8, 2), (1, 2, 8, 8, 2)],
    [_net_args(channels=(4, 8), semantic=False, positional=False), (1, 1, 2, 6, 3), (1, 2, 2, 6, 3)],
    [_net_args(dropout=0.3, rank=1, slice_kernel_size=1), (1, 1, 8, 4, 3), (1, 2, 8, 4, 3)],
]


@pytest.fixture(autouse=True)
def _seed():
    set_determinism(seed=0)
    yield
    set_determinism(seed=None)


def _count(module: torch.nn.Module, key: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if key in name)


class TestCSAMBlock:
    @pytest.mark.parametrize("args, spatial", CSAM_CASES)
    def test_shape_any_slice_count(self, args, spatial):
        block = CSAM(**args).eval()
        channels = args["in_channels"]
        for slices in (1, 11, 20):
            x = torch.randn(2 * slices, channels, *spatial)
            with torch.no_grad():
                assert block(x, slices).shape == x.shape

    def test_whole_batch_is_one_volume_by_default(self):
        block = CSAM(8).eval()
        x = torch.randn(6, 8, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(block(x), block(x, 6))

    def test_volumes_do_not_mix(self):
        block = CSAM(8).eval()
        x = torch.randn(2 * 7, 8, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(block(x, 7)[:7], block(x[:7], 7))
            # changing volume 1 leaves volume 0 alone
            x2 = x.clone()
            x2[7:] = torch.randn(7, 8, 6, 6) * 10
            torch.testing.assert_close(block(x2, 7)[:7], block(x, 7)[:7])

    def test_sampling_only_when_asked(self):
        block = CSAM(8).eval()
        x = torch.randn(11, 8, 6, 6)
        with torch.no_grad():
            assert torch.equal(block(x, 11), block(x, 11))
            assert not torch.equal(block(x, 11, sample=True), block(x, 11, sample=True))
        assert block.stochastic and not CSAM(8, uncertainty=False).stochastic

    def test_parameters_do_not_depend_on_slices(self):
        # hidden = max(32 // 16, 4) = 4; semantic 32->2->32; positional 2->1 7x7; slice convs with kernel 3
        semantic = 32 * 2 + 2 + 2 * 32 + 32
        positional = 2 * 49 + 1
        slice_att = (64 * 4 * 3 + 4) + (4 * 3 + 1) * 2 + (4 * 5 * 3 + 5)
        assert _count(CSAM(32)) == semantic + positional + slice_att

    @pytest.mark.parametrize(
        "args",
        [
            {"in_channels": 0},
            {"in_channels": 4, "semantic": False, "positional": False, "slice_attention": False},
            {"in_channels": 4, "slice_kernel_size": 2},
            {"in_channels": 4, "rank": 0},
            {"in_channels": 4, "spatial_dims": 4},
        ],
    )
    def test_bad_arguments(self, args):
        with pytest.raises(ValueError):
            CSAM(**args)

    def test_bad_inputs(self):
        block = CSAM(4)
        with pytest.raises(ValueError):
            block(torch.randn(6, 4, 5, 5), 4)
        with pytest.raises(ValueError):
            block(torch.randn(6, 4, 5), 3)


class TestCSAMUNet:
    @pytest.mark.parametrize("args, input_shape, expected_shape", NET_CASES)
    def test_shape(self, args, input_shape, expected_shape):
        net = CSAMUNet(**args).eval()
        with torch.no_grad():
            assert net(torch.randn(input_shape)).shape == expected_shape

    def test_any_slice_count_same_instance(self):
        net = CSAMUNet(1, 3, channels=TINY).eval()
        with torch.no_grad():
            for slices in (1, 11, 20):
                assert net(torch.randn(2, 1, 8, 12, slices)).shape == (2, 3, 8, 12, slices)
            assert net(torch.randn(1, 1, 8, 4, 200)).shape == (1, 3, 8, 4, 200)

    def test_single_channel_single_slice(self):
        net = CSAMUNet(1, 1, channels=(1, 2)).train()
        out = net(torch.randn(1, 1, 4, 4, 1))
        assert out.shape == (1, 1, 4, 4, 1)
        out.sum().backward()
        net.eval()
        with torch.no_grad():
            assert torch.isfinite(net(torch.randn(1, 1, 4, 4, 1))).all()

    def test_volumes_do_not_mix(self):
        net = CSAMUNet(1, 2, channels=TINY).eval()
        x = torch.randn(2, 1, 8, 8, 6)
        with torch.no_grad():
            torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=1e-5, atol=1e-5)

    def test_eval_is_deterministic(self):
        net = CSAMUNet(1, 2, channels=TINY, uncertainty=True).eval()
        x = torch.randn(1, 1, 8, 8, 7)
        with torch.no_grad():
            assert torch.equal(net(x), net(x))

    def test_training_samples_and_trains_slice_attention(self):
        net = CSAMUNet(1, 2, channels=TINY, uncertainty=True).train()
        x = torch.randn(2, 1, 8, 8, 7)
        with torch.no_grad():
            assert not torch.equal(net(x), net(x))
        net(x).square().mean().backward()
        slice_params = {name: p for name, p in net.named_parameters() if "slice" in name}
        # per level: slice_encoder, slice_mean, slice_log_diag, slice_factor (weight and bias each)
        assert len(slice_params) == 8 * len(TINY)
        for name, p in slice_params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        for name, p in net.named_parameters():
            assert p.grad is not None, name

    @pytest.mark.parametrize("out_channels", [3, 1])
    def test_monte_carlo(self, out_channels):
        net = CSAMUNet(1, out_channels, channels=TINY).eval()
        x = torch.randn(2, 1, 8, 8, 5)
        mean, entropy = net.predict_with_uncertainty(x, num_samples=4)
        assert mean.shape == (2, out_channels, 8, 8, 5) and entropy.shape == (2, 1, 8, 8, 5)
        classes = max(out_channels, 2)
        assert (entropy >= 0).all() and (entropy <= math.log(classes) + 1e-5).all()
        if out_channels > 1:
            torch.testing.assert_close(mean.sum(1), torch.ones(2, 8, 8, 5))
        mean_v, variance = net.predict_with_uncertainty(x, num_samples=4, measure="variance")
        assert variance.shape == (2, 1, 8, 8, 5) and (variance >= 0).all() and (variance > 0).any()
        with torch.no_grad():
            logits = net(x)
        single = torch.sigmoid(logits) if out_channels == 1 else torch.softmax(logits, 1)
        assert not torch.equal(mean_v, single)
        # sampling perturbs the prediction, it does not replace it
        assert (mean_v - single).abs().mean() < 0.1

    def test_monte_carlo_errors(self):
        x = torch.randn(1, 1, 4, 4, 2)
        with pytest.raises(ValueError):
            CSAMUNet(1, 2, channels=(2, 4), uncertainty=False).predict_with_uncertainty(x, 2)
        net = CSAMUNet(1, 2, channels=(2, 4))
        with pytest.raises(ValueError):
            net.predict_with_uncertainty(x, 0)
        with pytest.raises(ValueError):
            net.predict_with_uncertainty(x, 2, "mutual_info")

    def test_parameter_counts(self):
        with_csam = CSAMUNet(1, 3, channels=(16, 32, 64, 128))
        without = CSAMUNet(1, 3, channels=(16, 32, 64, 128), use_csam=False)
        assert _count(without, "csam") == 0 and _count(without, "slice") == 0
        assert _count(without) == 535_539
        assert _count(with_csam) == 548_210
        overhead = _count(with_csam) - _count(without)
        assert overhead == sum(_count(level.csam) for level in with_csam.encoder) == 12_671
        assert overhead / _count(with_csam) < 0.03

    def test_paper_configuration(self):
        with torch.device("meta"):  # shapes only: the counts need no weights
            net = create_network("csam_unet_paper")
        assert _count(net) == 141_134_499 and sum(_count(level.csam) for level in net.encoder) == 2_805_984

    def test_host_matches_released_unet(self):
        # the released 5-level, base-64 host U-Net counted without CSAM: 34.72 M - 0.208 M
        assert _count(CSAMUNet(1, 3, channels=(64, 128, 256, 512, 1024), use_csam=False)) == 34_512_323

    @pytest.mark.parametrize(
        "args",
        [
            {"in_channels": 1, "out_channels": 2, "channels": (8,)},
            {"in_channels": 0, "out_channels": 2},
            {"in_channels": 1, "out_channels": 2, "dropout": 1.0},
        ],
    )
    def test_bad_arguments(self, args):
        with pytest.raises(ValueError):
            CSAMUNet(**args)

    def test_bad_inputs(self):
        net = CSAMUNet(1, 2, channels=TINY)
        with pytest.raises(ValueError, match="divisible by 4"):
            net(torch.randn(1, 1, 6, 8, 3))
        with pytest.raises(ValueError):
            net(torch.randn(1, 1, 8, 8))

    @pytest.mark.parametrize("use_csam", [True, False])
    def test_torchscript(self, use_csam):
        net = CSAMUNet(1, 2, channels=TINY, use_csam=use_csam, dropout=0.1).eval()
        scripted = torch.jit.script(net)
        x = torch.randn(2, 1, 8, 8, 3)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), net(x))
        if use_csam:
            mean, uncertainty = scripted.predict_with_uncertainty(x, 2, "entropy")
            assert mean.shape == (2, 2, 8, 8, 3) and uncertainty.shape == (2, 1, 8, 8, 3)

    def test_csam_block_torchscript(self):
        block = CSAM(4).eval()
        scripted = torch.jit.script(block)
        x = torch.randn(6, 4, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x, 3), block(x, 3))
