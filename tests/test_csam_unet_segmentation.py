# SPDX-License-Identifier: Apache-2.0
"""The CSAM bundle beyond the generic harness: slice-axis handling, whole-slab windows, Monte-Carlo uncertainty.

Unit tests of ``transforms.SliceAxisLastd``, ``transforms.SplitUncertaintyd`` and
``networks.wrappers.MonteCarloUncertainty``; the bundle's own preprocessing and inferer (every slice in one
window); and, end to end with ``python -m monai.bundle``, inference on thick-slice scans whose thick axis is not
the last array axis, with and without the uncertainty map, and a short run on the thick-slice hippocampus data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, DivisiblePadd, Invertd, Orientationd, Spacingd

from bundletools.demo import make_synthetic_dataset
from networks import CSAMUNet
from networks.wrappers import MonteCarloUncertainty
from tests.utils import BUNDLES, config_list, run_bundle, shared_data
from transforms import SliceAxisLast, SliceAxisLastd, SplitUncertaintyd, slice_last_order

BUNDLE = "csam_unet_segmentation"
CONFIGS = BUNDLES / BUNDLE / "configs"
FAST = ["--num_workers", "0", "--roi_size", "[32,32,8]"]


def _thick_affine(thick_axis: int, oblique: bool = False) -> np.ndarray:
    spacing = np.array([0.9, 1.1, 1.0])
    spacing[thick_axis] = 3.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    if oblique:
        angle = np.deg2rad(15)
        rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
        affine[:3, :3] = rotation @ affine[:3, :3]
    affine[:3, 3] = [-12.0, 7.5, 30.0]
    return affine


@pytest.mark.parametrize(
    "spacing, order",
    [
        ((1.0, 1.0, 3.0), [0, 1, 2]),
        ((3.0, 1.0, 1.0), [1, 2, 0]),
        ((1.0, 3.0, 1.0), [0, 2, 1]),
        ((1.0, 1.0, 1.0), [0, 1, 2]),  # isotropic: left alone
        ((1.0000001, 1.0, 0.9999999), [0, 1, 2]),  # rounding noise is not a thick axis
        ((3.0, 3.0, 1.0), [0, 2, 1]),  # a tie keeps the later axis
    ],
)
def test_slice_last_order(spacing, order):
    assert slice_last_order(spacing) == order


@pytest.mark.parametrize("oblique", [False, True])
def test_thick_axis_0_becomes_last_with_consistent_affine_and_exact_inverse(oblique):
    affine = _thick_affine(0, oblique)
    data = torch.arange(1 * 12 * 20 * 24, dtype=torch.float32).reshape(1, 12, 20, 24)
    image = MetaTensor(data.clone(), affine=torch.as_tensor(affine))
    transform = SliceAxisLastd("image")
    out = transform({"image": image})
    moved = out["image"]
    assert moved.shape == (1, 20, 24, 12)
    torch.testing.assert_close(moved.as_tensor(), data.permute(0, 2, 3, 1))
    # every voxel keeps its world position: the new affine's columns are the old ones, reordered
    np.testing.assert_allclose(moved.affine.numpy(), affine[:, [1, 2, 0, 3]])
    idx_old, idx_new = np.array([5, 7, 9, 1.0]), np.array([7, 9, 5, 1.0])
    np.testing.assert_allclose(moved.affine.numpy() @ idx_new, affine @ idx_old)
    assert moved.applied_operations[-1]["extra_info"]["order"] == [1, 2, 0]

    back = transform.inverse(out)
    assert torch.equal(back["image"].as_tensor(), data)
    np.testing.assert_array_equal(back["image"].affine.numpy(), affine)
    assert back["image"].applied_operations == []


def test_plain_tensors_and_isotropic_volumes_pass_unchanged():
    data = torch.randn(1, 6, 7, 8)
    assert torch.equal(SliceAxisLast()(data), data)
    iso = MetaTensor(data.clone(), affine=torch.eye(4))
    assert SliceAxisLast()(iso).shape == data.shape


def test_invertd_restores_the_input_grid_through_the_bundle_geometry_chain():
    """Orientation, slice axis, spacing (native slice spacing kept) and in-plane padding, then Invertd."""
    affine = _thick_affine(0)
    affine[:3, :3] = affine[:3, :3] @ np.diag([-1.0, 1.0, -1.0])  # not RAS on disk
    image = MetaTensor(torch.rand(1, 10, 21, 26), affine=torch.as_tensor(affine))
    pre = Compose(
        [
            Orientationd("image", axcodes="RAS"),
            SliceAxisLastd("image"),
            Spacingd("image", pixdim=[1.0, 1.0, 0.0]),
            DivisiblePadd("image", k=[8, 8, 1]),
        ]
    )
    data = pre({"image": image})
    processed = data["image"]
    assert processed.shape[-1] == 10 and processed.shape[1] % 8 == 0 and processed.shape[2] % 8 == 0
    np.testing.assert_allclose(np.linalg.norm(processed.affine.numpy()[:3, 2]), 3.0)  # slice spacing kept
    data["pred"] = MetaTensor(torch.rand(3, *processed.shape[1:]), affine=processed.affine)
    out = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
    assert out["pred"].shape == (3, 10, 21, 26)
    np.testing.assert_allclose(out["pred"].affine.numpy(), affine, atol=1e-6)


def test_split_uncertainty_moves_the_last_channel_with_the_metadata():
    affine = torch.as_tensor(_thick_affine(2))
    pred = MetaTensor(torch.rand(4, 5, 6, 7), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    out = SplitUncertaintyd("pred", names="uncertainty")({"pred": pred})
    assert out["pred"].shape == (3, 5, 6, 7) and out["uncertainty"].shape == (1, 5, 6, 7)
    torch.testing.assert_close(out["uncertainty"].as_tensor(), pred[-1:].as_tensor())
    assert out["uncertainty"].meta["filename_or_obj"] == "case.nii.gz"
    torch.testing.assert_close(out["uncertainty"].affine, affine)
    with pytest.raises(ValueError, match="at least 2 channels"):
        SplitUncertaintyd("pred", names="u")({"pred": torch.rand(1, 2, 2, 2)})


@pytest.mark.parametrize("measure", ["entropy", "variance"])
def test_monte_carlo_wrapper_returns_probabilities_and_nonnegative_uncertainty(measure):
    torch.manual_seed(0)
    net = CSAMUNet(1, 3, channels=(8, 16))
    wrapper = MonteCarloUncertainty(net, num_samples=3, measure=measure).eval()
    out = wrapper(torch.randn(2, 1, 16, 16, 5))
    assert out.shape == (2, 4, 16, 16, 5)
    torch.testing.assert_close(out[:, :3].sum(1), torch.ones(2, 16, 16, 5))
    assert torch.all(out[:, 3] >= 0) and torch.any(out[:, 3] > 0)
    assert not net.training  # eval mode reaches the wrapped network


def test_monte_carlo_wrapper_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        MonteCarloUncertainty(CSAMUNet(1, 2, channels=(8, 16)), num_samples=0)
    with pytest.raises(ValueError, match="measure"):
        MonteCarloUncertainty(CSAMUNet(1, 2, channels=(8, 16)), measure="std")
    with pytest.raises(TypeError, match="predict_with_uncertainty"):
        MonteCarloUncertainty(torch.nn.Conv3d(1, 2, 1))


def _parser(config: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(CONFIGS / f"{config}.json")
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_windows_and_training_crops_cover_every_slice(tmp_path):
    """Slice attention sees only the slices of its window, so windows and crops take the whole slice axis."""
    assert _parser("inference").get_parsed_content("inferer").roi_size[-1] == -1
    assert _parser("train").get_parsed_content("validate#inferer").roi_size[-1] == -1
    # a scan whose 3 mm axis is array axis 0: 13 slices after the axis move, all in the training crop
    data = make_synthetic_dataset(tmp_path / "data", num_cases=1, shape=(26, 40, 36))
    for name in ("imagesTr", "labelsTr"):
        path = data / name / "synthetic_000.nii.gz"
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::2], _thick_affine(0)), str(path))
    item = {"image": str(data / "imagesTr/synthetic_000.nii.gz"), "label": str(data / "labelsTr/synthetic_000.nii.gz")}
    crops = _parser("train").get_parsed_content("train#preprocessing")(item)
    assert all(tuple(c["image"].shape) == (1, 48, 48, 13) for c in crops)
    assert all(tuple(c["label"].shape) == (1, 48, 48, 13) for c in crops)


def _write_untrained_checkpoint(root: Path) -> None:
    (root / "models").mkdir(parents=True)
    (root / "configs").mkdir()
    torch.manual_seed(0)
    net = _parser("inference").get_parsed_content("network_def")
    torch.save(net.state_dict(), root / "models" / "model.pt")


@pytest.mark.slow
def test_inference_writes_uncertainty_maps_with_the_input_geometry(tmp_path):
    root = tmp_path / "bundle"
    _write_untrained_checkpoint(root)
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    inputs = {
        "sagittal_thick": (rng.normal(size=(9, 30, 28)), _thick_affine(0)),
        "coronal_oblique": (rng.normal(size=(26, 8, 30)), _thick_affine(1, oblique=True)),
        "axial_lps": (rng.normal(size=(28, 30, 7)), np.diag([-1.0, -1.0, 3.0, 1.0]) @ _thick_affine(2)),
    }
    for name, (volume, affine) in inputs.items():
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(scans / f"{name}.nii.gz"))

    outputs = {}
    for mc_samples in (0, 3):
        out = tmp_path / f"out_mc{mc_samples}"
        run_bundle(["run", "--config_file", config_list(BUNDLE, "inference"), "--dataset_dir", scans,
                    "--output_dir", out, "--bundle_root", root, *FAST, "--mc_samples", mc_samples], cwd=tmp_path)
        outputs[mc_samples] = out
    assert sorted(p.name for p in outputs[0].glob("*.nii.gz")) == sorted(f"{n}_seg.nii.gz" for n in inputs)
    assert sorted(p.name for p in outputs[3].glob("*.nii.gz")) == sorted(
        [f"{n}_seg.nii.gz" for n in inputs] + [f"{n}_uncertainty.nii.gz" for n in inputs])
    # the batch runner's report lists both outputs of every case
    report = json.loads((outputs[3] / "report.json").read_text(encoding="utf-8"))
    assert sorted(c["case"] for c in report["cases"] if c["status"] == "succeeded") == sorted(inputs)
    assert all(len(c["outputs"]) == 2 for c in report["cases"])
    for name, (volume, affine) in inputs.items():
        for out in outputs.values():
            seg = nib.load(str(out / f"{name}_seg.nii.gz"))
            assert seg.shape == volume.shape and seg.get_data_dtype() == np.uint8
            np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
        uncertainty = nib.load(str(outputs[3] / f"{name}_uncertainty.nii.gz"))
        assert uncertainty.shape == volume.shape and uncertainty.get_data_dtype() == np.float32
        np.testing.assert_allclose(uncertainty.affine, affine, atol=1e-4)
        values = np.asarray(uncertainty.dataobj)
        assert np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= np.log(3) + 1e-4  # entropy


@pytest.mark.slow
def test_eval_inference_is_deterministic(tmp_path):
    root = tmp_path / "bundle"
    _write_untrained_checkpoint(root)
    scans = tmp_path / "scans"
    scans.mkdir()
    volume = np.random.default_rng(1).normal(size=(30, 28, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, _thick_affine(2)), str(scans / "case.nii.gz"))
    segs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        run_bundle(["run", "--config_file", config_list(BUNDLE, "inference"), "--dataset_dir", scans,
                    "--output_dir", out, "--bundle_root", root, *FAST], cwd=tmp_path)
        segs.append(np.asarray(nib.load(str(out / "case_seg.nii.gz")).dataobj))
    np.testing.assert_array_equal(segs[0], segs[1])


@pytest.mark.slow
@pytest.mark.realdata
def test_thick_slice_hippocampus_training_evaluation_and_inference(tmp_path):
    thick = shared_data("Task04_Hippocampus_thick3mm")
    root = tmp_path / "bundle"
    common = ["--dataset_dir", thick, "--bundle_root", root, "--num_workers", "0", "--max_cases", "10"]
    proc = run_bundle(["run", "training", "--config_file", config_list(BUNDLE, "train"), "--epochs", "1",
                       *common], cwd=tmp_path)
    assert re.search(r"Epoch\[1\] Metrics -- val_mean_dice: \d", proc.output)
    run_bundle(["run", "--config_file", config_list(BUNDLE, "train", "evaluate"), *common], cwd=tmp_path)
    rows = (root / "eval" / "val_hd95_mm_raw.csv").read_text().splitlines()
    assert rows[0] == "filename,anterior,posterior,mean" and len(rows) == 3  # 2 validation cases of 10

    # the same scan stored with its 3 mm axis first: the segmentation follows it back to that layout
    case = sorted((thick / "imagesTr").iterdir())[0]
    img = nib.load(str(case))
    scans = tmp_path / "scans"
    scans.mkdir()
    moved = np.moveaxis(np.asarray(img.dataobj), 2, 0)
    moved_affine = img.affine[:, [2, 0, 1, 3]]
    nib.save(nib.Nifti1Image(moved, moved_affine), str(scans / "moved.nii.gz"))
    (scans / case.name).symlink_to(case)
    out = tmp_path / "out"
    run_bundle(["run", "--config_file", config_list(BUNDLE, "inference"), "--dataset_dir", scans, "--output_dir",
                out, "--bundle_root", root, "--num_workers", "0"], cwd=tmp_path)
    original = nib.load(str(out / case.name.replace(".nii.gz", "_seg.nii.gz")))
    permuted = nib.load(str(out / "moved_seg.nii.gz"))
    assert original.shape == img.shape and permuted.shape == moved.shape
    np.testing.assert_allclose(original.affine, img.affine, atol=1e-4)
    np.testing.assert_allclose(permuted.affine, moved_affine, atol=1e-4)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(permuted.dataobj), 0, 2), np.asarray(original.dataobj))
