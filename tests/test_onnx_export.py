# SPDX-License-Identifier: Apache-2.0
"""ONNX export of every bundle with MONAI's ``python -m monai.bundle onnx_export``, as the cards give it, and the
exported model run with onnxruntime: on a real volume, through the bundle's own preprocessing and sliding-window
inferer, its output equals the checkpoint's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from tests.utils import ALL_BUNDLES, BUNDLES, run_bundle, shared_data

pytestmark = pytest.mark.slow



def onnx_export_args(bundle: str, ckpt, filepath) -> list:
    """The card's command: a batch axis that varies (sliding windows come in batches of ``sw_batch_size``), and for
    the 2.5D CSAM bundle a slice axis that varies too (it takes whole slabs)."""
    configs = BUNDLES / bundle / "configs"
    inference = json.loads((configs / "inference.json").read_text())
    metadata = json.loads((configs / "metadata.json").read_text())
    channels = metadata["network_data_format"]["inputs"]["image"]["num_channels"]
    roi = list(inference["roi_size"])
    dynamic = {0: "batch"}
    if bundle == "csam_unet_segmentation":
        dynamic[len(roi) + 1] = "slices"
    axes = {"image": dynamic, "pred": dynamic}
    return ["onnx_export", "network_def", "--filepath", filepath, "--ckpt_file", ckpt,
            "--meta_file", configs / "metadata.json", "--config_file", configs / "inference.json",
            "--use_trace", "True", "--input_shape", str([1, channels, *roi]).replace(" ", ""),
            "--converter_kwargs", str({"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": axes})]


@pytest.mark.realdata
@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_onnx_model_gives_the_checkpoints_output_on_a_real_volume(bundle, tmp_path):
    import onnxruntime

    task = "Task04_Hippocampus_thick3mm" if bundle == "csam_unet_segmentation" else "Task04_Hippocampus"
    image = sorted((shared_data(task) / "imagesTr").glob("*.nii.gz"))[0]
    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
    parser.update({"bundle_root": str(tmp_path), "device": "$torch.device('cpu')"})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    ckpt, exported = tmp_path / "model.pt", tmp_path / "model.onnx"
    torch.save(net.state_dict(), ckpt)
    run_bundle(onnx_export_args(bundle, ckpt, exported), cwd=tmp_path)

    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])

    def onnx_network(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": batch.cpu().numpy()})[0])

    x = parser.get_parsed_content("preprocessing")({"image": str(image)})["image"].as_tensor()[None]
    inferer = parser.get_parsed_content("inferer")
    net.eval()
    with torch.no_grad():
        expected = inferer(x, net)
        got = inferer(x, onnx_network)
    assert got.shape == expected.shape == (1, 3, *x.shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    # the labels a user gets: the same voxel for voxel (up to ties of float rounding)
    agree = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agree > 0.9999, f"labels agree on {agree:.6f} of the voxels"
    assert np.isfinite(got.numpy()).all()
