# SPDX-License-Identifier: Apache-2.0
"""TransUNet (networks.TransUNet): shapes, the R50-ViT-B/16 configuration, its blocks (ResNetV2, ViT), and loading
Google's R50+ViT-B_16.npz (a synthetic file with the release's names and layouts, tests.utils.make_vit_r50_npz)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from monai.networks import eval_mode, train_mode

from networks import create_network
from networks.blocks.resnetv2 import ResNetV2, StdConv2d
from networks.blocks.vit import GridPositionEmbedding, MultiHeadSelfAttention
from networks.nets.transunet import TransUNet
from networks.nets.transunet_weights import load_vit_r50_npz
from tests.utils import NPZ, make_vit_r50_npz, npz_model

PAPER_PARAMETERS = 105_277_081  # R50-ViT-B/16, 9 classes, official code

TINY = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "mlp_dim": 128,
    "resnet_block_units": (1, 1, 1),
    "resnet_width_factor": 0.5,
    "decoder_channels": (32, 16, 16, 8),
    "decoder_head_channels": 64,
}

SHAPE_CASES = [
    # in_channels, out_channels, img_size, n_skip, input (H, W)
    (1, 3, 64, 3, (64, 64)),
    (1, 3, 64, 3, (64, 96)),
    (3, 2, 64, 3, (96, 64)),
    (1, 4, (64, 96), 2, (128, 80)),
    (2, 3, 32, 1, (48, 48)),
    (1, 3, 64, 0, (32, 64)),
]


def tiny(in_channels: int = 1, out_channels: int = 3, img_size=64, **kwargs) -> TransUNet:
    torch.manual_seed(0)
    return TransUNet(in_channels, out_channels, img_size, **{**TINY, **kwargs})

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/networks/conftest.py


class TestTransUNet:
    @pytest.mark.parametrize("in_channels, out_channels, img_size, n_skip, size", SHAPE_CASES)
    def test_output_shape(self, in_channels, out_channels, img_size, n_skip, size):
        net = tiny(in_channels, out_channels, img_size, n_skip=n_skip)
        with eval_mode(net):
            out = net(torch.randn(2, in_channels, *size))
        assert out.shape == (2, out_channels, *size)

    @pytest.mark.parametrize("shape", [(1, 1, 60, 64), (1, 1, 64, 72), (1, 64, 64)])
    def test_input_not_divisible_by_16_raises(self, shape):
        net = tiny()
        with eval_mode(net), pytest.raises(ValueError, match="divisible by 16"):
            net(torch.randn(*shape))

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"img_size": 100},
            {"num_heads": 5},
            {"n_skip": 4},
            {"decoder_channels": (32, 16, 8)},
            {"resnet_block_units": (1, 1)},
            {"dropout": 1.5},
            {"dropout_rate": -0.1},
        ],
    )
    def test_invalid_arguments_raise(self, kwargs):
        with pytest.raises(ValueError):
            TransUNet(1, 2, **{**TINY, **kwargs})

    def test_paper_parameter_count(self):
        net = create_network("transunet_r50_vit_b16")
        count = sum(p.numel() for p in net.parameters())
        assert abs(count - PAPER_PARAMETERS) <= 0.01 * PAPER_PARAMETERS
        assert sum(p.numel() for p in net.transformer.parameters()) == 85_056_000

    def test_gradients_reach_all_parameters(self):
        net = tiny(dropout=0.1)
        with train_mode(net):
            net(torch.randn(2, 1, 64, 96)).square().mean().backward()
        missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []

    def test_dropout_argument(self):
        net = tiny(dropout=0.5, dropout_rate=0.2, attention_dropout_rate=0.1)
        assert net.dropout.p == 0.5
        x = torch.randn(1, 1, 64, 64)
        with train_mode(net):
            assert not torch.allclose(net(x), net(x))
        with eval_mode(net):
            assert torch.equal(net(x), net(x))

    def test_torchscript_matches_eager(self):
        net = tiny(n_skip=2)
        x = torch.randn(1, 1, 64, 96)  # non-square and not img_size: exercises the embedding resize
        with eval_mode(net):
            expected = net(x)
            scripted = torch.jit.script(net)
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            buffer.seek(0)
            torch.testing.assert_close(scripted(x), expected)
            torch.testing.assert_close(torch.jit.load(buffer)(x), expected)


class TestTransUNetBlocks:
    def test_resnetv2_feature_strides_2d_and_3d(self):
        net = ResNetV2(2, 1, (1, 2, 1), 0.5)
        with eval_mode(net):
            shapes = [tuple(f.shape) for f in net(torch.randn(1, 1, 48, 80))]
        assert shapes == [(1, 32, 24, 40), (1, 128, 12, 20), (1, 256, 6, 10), (1, 512, 3, 5)]
        net = ResNetV2(3, 1, (1, 1), 0.5)
        with eval_mode(net):
            shapes = [tuple(f.shape) for f in net(torch.randn(1, 1, 16, 16, 32))]
        assert shapes == [(1, 32, 8, 8, 16), (1, 128, 4, 4, 8), (1, 256, 2, 2, 4)]

    def test_std_conv_is_invariant_to_filter_affine_rescaling(self):
        conv = StdConv2d(4, 8, 3, padding=1, bias=False, eps=1e-12)
        x = torch.randn(1, 4, 8, 8)
        expected = conv(x)
        with torch.no_grad():
            conv.weight.mul_(3.0).add_(0.5)
        torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)

    def test_position_embedding_resize_keeps_corners(self):
        embed = GridPositionEmbedding((4, 4), hidden_size=8)
        tokens = embed(torch.zeros(1, 8, 6, 10))
        assert tokens.shape == (1, 60, 8)
        table = embed.position_embedding[0].reshape(4, 4, 8)
        resized = tokens[0].reshape(6, 10, 8)
        for (i, j), (k, m) in [((0, 0), (0, 0)), ((0, 3), (0, 9)), ((3, 0), (5, 0)), ((3, 3), (5, 9))]:
            torch.testing.assert_close(resized[k, m], table[i, j])

    def test_attention_dropout_only_in_training(self):
        attn = MultiHeadSelfAttention(16, 4, dropout_rate=0.5, attention_dropout_rate=0.5)
        x = torch.randn(2, 5, 16)
        with eval_mode(attn):
            assert torch.equal(attn(x), attn(x))
        with train_mode(attn):
            assert not torch.allclose(attn(x), attn(x))


# ---- loading the ImageNet-21k R50+ViT-B/16 .npz (synthetic file with the names and layouts of the release) ----
class TestLoadViTR50Npz:
    @pytest.fixture(autouse=True)
    def _npz_path(self, tmp_path):
        self.path = tmp_path / "R50+ViT-B_16.npz"

    @staticmethod
    def assert_loaded(tensor, array):
        torch.testing.assert_close(tensor.detach(), torch.from_numpy(np.ascontiguousarray(array)))

    def test_tensors_land_in_place(self):
        arrays = make_vit_r50_npz(self.path)
        net = npz_model()
        assert net.load_from_npz(self.path) == ["cls", "head/bias", "head/kernel"]

        hwio_to_oihw = (3, 2, 0, 1)
        self.assert_loaded(net.resnet.root_conv.weight, arrays["conv_root/kernel"].transpose(hwio_to_oihw))
        self.assert_loaded(net.resnet.root_norm.weight, arrays["gn_root/scale"])
        unit = net.resnet.stages[0][0]
        self.assert_loaded(unit.conv2.weight, arrays["block1/unit1/conv2/kernel"].transpose(hwio_to_oihw))
        self.assert_loaded(unit.shortcut.conv.weight, arrays["block1/unit1/conv_proj/kernel"].transpose(hwio_to_oihw))
        self.assert_loaded(unit.shortcut.norm.bias, arrays["block1/unit1/gn_proj/bias"])
        self.assert_loaded(net.resnet.stages[0][1].norm3.weight, arrays["block1/unit2/gn3/scale"])
        self.assert_loaded(net.patch_embedding.weight, arrays["embedding/kernel"].transpose(hwio_to_oihw))
        self.assert_loaded(
            net.position_embedding.position_embedding, arrays["Transformer/posembed_input/pos_embedding"][:, 1:]
        )

        hidden = NPZ["hidden"]
        block = net.transformer.blocks[1]
        prefix = "Transformer/encoderblock_1"
        for i, name in enumerate(("query", "key", "value")):
            rows = slice(i * hidden, (i + 1) * hidden)
            kernel = arrays[f"{prefix}/MultiHeadDotProductAttention_1/{name}/kernel"]
            bias = arrays[f"{prefix}/MultiHeadDotProductAttention_1/{name}/bias"]
            self.assert_loaded(block.attn.qkv.weight[rows], kernel.reshape(hidden, hidden).T)
            self.assert_loaded(block.attn.qkv.bias[rows], bias.reshape(hidden))
        self.assert_loaded(block.mlp.linear1.weight, arrays[f"{prefix}/MlpBlock_3/Dense_0/kernel"].T)
        self.assert_loaded(block.norm2.weight, arrays[f"{prefix}/LayerNorm_2/scale"])
        self.assert_loaded(net.transformer.norm.bias, arrays["Transformer/encoder_norm/bias"])

    def test_attention_matches_flax_semantics(self):
        """The loaded attention computes what Flax's MultiHeadDotProductAttention computes from the same arrays."""
        arrays = make_vit_r50_npz(self.path)
        net = npz_model()
        load_vit_r50_npz(net, self.path)
        prefix = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"

        def weight(name):
            return torch.from_numpy(arrays[f"{prefix}/{name}"])

        x = torch.randn(1, 10, NPZ["hidden"])
        q, k, v = (
            torch.einsum("bnd,dhk->bhnk", x, weight(f"{n}/kernel")) + weight(f"{n}/bias")[:, None]
            for n in ("query", "key", "value")
        )
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        expected = torch.einsum("bhnk,hkd->bnd", attention @ v, weight("out/kernel")) + weight("out/bias")
        with eval_mode(net):
            torch.testing.assert_close(net.transformer.blocks[0].attn(x), expected, rtol=1e-4, atol=1e-4)

    def test_position_embedding_is_resized(self):
        arrays = make_vit_r50_npz(self.path)
        net = npz_model(img_size=(64, 128))  # 4 x 8 grid
        net.load_from_npz(self.path)
        source = arrays["Transformer/posembed_input/pos_embedding"][0, 1:].reshape(14, 14, -1)
        loaded = net.position_embedding.position_embedding.detach()[0].reshape(4, 8, -1)
        for (i, j), (k, m) in [((0, 0), (0, 0)), ((0, 13), (0, 7)), ((13, 0), (3, 0)), ((13, 13), (3, 7))]:
            torch.testing.assert_close(loaded[k, m], torch.from_numpy(source[i, j]))

    def test_missing_key_is_named_and_nothing_changes(self):
        key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
        make_vit_r50_npz(self.path, drop=key)
        net = npz_model()
        before = {name: p.detach().clone() for name, p in net.named_parameters()}
        with pytest.raises(KeyError, match=key):
            net.load_from_npz(self.path)
        assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())

    @pytest.mark.parametrize(
        "key, shape",
        [
            ("block2/unit1/conv2/kernel", (3, 3, 64, 32)),
            ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel", (64, 8, 8)),
            ("Transformer/posembed_input/pos_embedding", (1, 200, 64)),
            ("gn_root/bias", (16,)),
        ],
    )
    def test_misshaped_key_is_named(self, key, shape):
        make_vit_r50_npz(self.path, reshape=(key, shape))
        with pytest.raises(ValueError, match=key):
            npz_model().load_from_npz(self.path)

    def test_other_input_channels_are_rejected(self):
        make_vit_r50_npz(self.path)
        with pytest.raises(ValueError, match="conv_root/kernel"):
            npz_model(in_channels=1).load_from_npz(self.path)
