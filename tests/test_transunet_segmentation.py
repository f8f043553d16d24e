# SPDX-License-Identifier: Apache-2.0
"""What the generic harness does not see in the TransUNet bundle: the 2D-on-slices data path, slice-by-slice
inference, the paper configuration as overrides, and loading the R50+ViT-B/16 ``.npz`` through ``pretrained_npz``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundletools.generate import TEMPLATES
from tests.utils import BUNDLES, NPZ, make_vit_r50_npz

CONFIGS = BUNDLES / "transunet_segmentation" / "configs"

# R50-ViT-B/16 as in the paper (Synapse: 9 classes, 224 x 224, grey CT repeated to 3 channels)
PAPER = {
    "num_classes": 9,
    "roi_size": [224, 224],
    "input_repeats": 3,
    "network_def#hidden_size": 768,
    "network_def#num_layers": 12,
    "network_def#num_heads": 12,
    "network_def#mlp_dim": 3072,
    "network_def#resnet_block_units": [3, 4, 9],
    "network_def#resnet_width_factor": 1.0,
    "network_def#decoder_channels": [256, 128, 64, 16],
    "network_def#decoder_head_channels": 512,
}


def parsed(files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f"{name}.json") for name in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_paper_configuration_is_a_set_of_overrides():
    net = parsed(["inference"], **PAPER).get_parsed_content("network_def")
    assert sum(p.numel() for p in net.parameters()) == 105_277_081
    assert net.resnet.root_conv.weight.shape[1] == 3


def test_default_network_size():
    net = parsed(["inference"]).get_parsed_content("network_def")
    assert sum(p.numel() for p in net.parameters()) == 5_714_899


@pytest.mark.parametrize("slice_axis, input_repeats", [(2, 1), (0, 3)])
def test_training_samples_are_2d_slices_the_network_takes(synthetic_msd, slice_axis, input_repeats):
    parser = parsed(["train"], dataset_dir=str(synthetic_msd), num_workers=0, cache_rate=0.0,
                    slice_axis=slice_axis, input_repeats=input_repeats)
    samples = parser.get_parsed_content("train#dataset")[0]
    assert len(samples) == parser.get_parsed_content("samples_per_case")
    for sample in samples:
        assert sample["image"].shape == (input_repeats, 48, 64)
        assert sample["label"].shape == (1, 48, 64)
        assert type(sample["image"]) is torch.Tensor  # the augmented patches carry no metadata to the network
    net = parser.get_parsed_content("network_def")
    assert net(torch.stack([s["image"] for s in samples[:2]])).shape == (2, 3, 48, 64)


@pytest.mark.parametrize("config, slice_axis", [("inference", 2), ("inference", 0), ("train", 1)])
def test_volumes_are_segmented_slice_by_slice(config, slice_axis):
    parser = parsed([config], slice_axis=slice_axis)
    inferer = parser.get_parsed_content("inferer" if config == "inference" else "validate#inferer")
    net = parser.get_parsed_content("network_def").eval()
    shape = [48, 64]
    shape.insert(slice_axis, 5)
    volume = torch.randn(1, 1, *shape)
    with torch.no_grad():
        out = inferer(volume, net)
        expected = torch.stack([net(s) for s in volume.unbind(slice_axis + 2)], dim=slice_axis + 2)
    assert out.shape == (1, 3, *shape)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_pretrained_npz_is_loaded_before_training(synthetic_msd, tmp_path):
    npz = tmp_path / "R50+ViT-B_16.npz"
    arrays = make_vit_r50_npz(npz)
    small = {
        "network_def#hidden_size": NPZ["hidden"],
        "network_def#num_layers": NPZ["layers"],
        "network_def#num_heads": NPZ["heads"],
        "network_def#mlp_dim": NPZ["mlp"],
        "network_def#resnet_block_units": list(NPZ["units"]),
        "network_def#resnet_width_factor": NPZ["width"] / 64,
    }
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", logging_file=False,
                              dataset_dir=str(synthetic_msd), bundle_root=str(tmp_path / "bundle"),
                              input_repeats=3, pretrained_npz=str(npz), **small)
    workflow.initialize()
    net = workflow.parser.get_parsed_content("network_def")
    np.testing.assert_array_equal(net.patch_embedding.bias.detach().numpy(), arrays["embedding/bias"])
    np.testing.assert_array_equal(net.transformer.norm.weight.detach().numpy(),
                                  arrays["Transformer/encoder_norm/scale"])


def test_pretrained_npz_is_loaded_under_ddp_and_skipped_by_evaluation():
    train = json.loads((CONFIGS / "train.json").read_text())
    load_line = train["initialize"][-1]
    assert "load_from_npz(@pretrained_npz)" in load_line
    multi = ConfigParser.load_config_files([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    template = [i for i in json.loads((TEMPLATES / "multi_gpu_train.json").read_text())["initialize"]
                if isinstance(i, str)]  # without the extension point
    assert multi["initialize"] == [*template, load_line]
    evaluate = ConfigParser.load_config_files([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    assert evaluate["pretrained_npz"] is None
