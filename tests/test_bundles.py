# SPDX-License-Identifier: Apache-2.0
"""Every bundle end to end, run the way users run it: `python -m monai.bundle ...` in a fresh process.

Each command runs from a temporary working directory, with ``bundle_root`` pointed at a temporary folder, so
the tests also prove that nothing depends on the current directory or on PYTHONPATH. Every bundle under
``bundles/`` gets every check (``tests.utils.ALL_BUNDLES``); ``QUICK`` holds the overrides that keep a bundle's
runs short on 2 CPU cores where its defaults do not.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bundletools.demo import make_synthetic_dataset
from tests.utils import (ALL_BUNDLES, BUNDLES, config_list, run_bundle, shared_data, shared_schema,
                         subprocess_env)

FAST = ["--num_workers", "0"]
pytestmark = pytest.mark.slow

# overrides of training and inference for bundles whose defaults are slow here (CSAM: whole 48x48 slabs)
QUICK = {"csam_unet_segmentation": ["--roi_size", "[32,32,8]"]}


@pytest.fixture(scope="module", params=ALL_BUNDLES)
def bundle(request) -> str:
    return request.param


def train_args(bundle: str, dataset: Path, root: Path, epochs: int, run_id: str = "training", *extra) -> list:
    return ["run", run_id, "--config_file", config_list(bundle, "train"), "--dataset_dir", dataset,
            "--bundle_root", root, "--epochs", epochs, *FAST, *QUICK.get(bundle, []), *extra]


def infer_args(bundle: str, scans: Path, out: Path, root: Path, *extra) -> list:
    return ["run", "--config_file", config_list(bundle, "inference"), "--dataset_dir", scans, "--output_dir", out,
            "--bundle_root", root, *FAST, *QUICK.get(bundle, []), *extra]


@pytest.fixture(scope="module")
def trained(bundle, tmp_path_factory, synthetic_msd):
    """The bundle trained for 2 epochs on synthetic data: (bundle_root, training output)."""
    root = tmp_path_factory.mktemp(f"{bundle}_trained")
    proc = run_bundle(train_args(bundle, synthetic_msd, root, 2), cwd=tmp_path_factory.mktemp("cwd"))
    return root, proc.output


def bundle_network(bundle: str, **overrides) -> torch.nn.Module:
    """The bundle's ``network_def``, built from its inference config as MONAI Label builds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("network_def")


def assert_same_geometry(image_path: Path, seg_path: Path) -> None:
    """Same voxel grid in nibabel's (RAS affine) and in SimpleITK's (LPS origin/direction) reading."""
    image, seg = nib.load(str(image_path)), nib.load(str(seg_path))
    assert seg.get_data_dtype() == np.uint8
    assert seg.shape == image.shape[:3]
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    ref, out = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(seg_path))
    assert out.GetSize()[:3] == ref.GetSize()[:3]
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing()[:3], atol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin()[:3], atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), np.array(ref.GetDirection()).reshape(ref.GetDimension(), -1)[:3, :3].ravel(), atol=1e-5)


def test_training_writes_best_model_per_epoch_logs_and_tensorboard(bundle, trained):
    root, output = trained
    state_dict = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    bundle_network(bundle).load_state_dict(state_dict)  # strict: every key and shape fits network_def
    assert all(t.device.type == "cpu" for t in state_dict.values())
    for epoch in (1, 2):
        # progress inside the epoch (no terminal here: MONAI's iteration lines), then the epoch's metrics
        assert re.search(rf"Epoch: {epoch}/2, Iter: 1/\d+ -- train_loss: \d", output)
        assert re.search(rf"Epoch\[{epoch}\] Metrics -- train_loss: \d", output)
        assert re.search(rf"Epoch\[{epoch}\] Metrics -- val_mean_dice: \d", output)
    assert list((root / "eval").glob("events.out.tfevents.*")), "no TensorBoard logs under output_dir"
    assert torch.load(root / "models" / "training_state.pt", weights_only=True)["epoch"] == 2


def test_killed_training_resumes_from_last_finished_epoch(bundle, tmp_path, synthetic_msd):
    root = tmp_path / "bundle"
    args = train_args(bundle, synthetic_msd, root, 4)
    state = root / "models" / "training_state.pt"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= finished < 4
    # a kill while a checkpoint is written leaves at most a hidden temporary file; the next start removes it
    (root / "models" / ".training_state.pt.tmp99999").write_bytes(b"half a checkpoint")

    # the same command again (here with the `run` id MONAI Label uses) continues instead of starting over
    rerun = run_bundle(args[:1] + ["run"] + args[2:], cwd=tmp_path)
    assert f"epoch {finished} was the last finished, continuing" in rerun.output
    trainer_epochs = [int(e) for e in re.findall(r"Epoch\[(\d+)\] Metrics -- train_loss", rerun.output)]
    assert trainer_epochs == list(range(finished + 1, 5))
    assert torch.load(state, weights_only=True)["epoch"] == 4
    assert not list((root / "models").glob(".*tmp*")), "temporary files of the killed run were left behind"

    again = run_bundle(args, cwd=tmp_path)
    assert "finished epochs of 4: nothing to do" in again.output


def test_evaluate_writes_per_case_dice_and_hd95_in_mm(bundle, trained, synthetic_msd, tmp_path):
    root, _ = trained
    run_bundle(["run", "--config_file", config_list(bundle, "train", "evaluate"), "--dataset_dir", synthetic_msd,
                "--bundle_root", root, *FAST, *QUICK.get(bundle, [])], cwd=tmp_path)
    for metric in ("val_mean_dice", "val_hd95_mm"):
        with open(root / "eval" / f"{metric}_raw.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "anterior", "posterior", "mean"]
        assert len(rows) == 2 and rows[1][0].endswith(".nii.gz")  # one validation case of six
        values = np.array([float(v) for v in rows[1][1:]])
        if metric == "val_mean_dice":
            assert np.all((values >= 0) & (values <= 1))
        else:  # mm; NaN or inf only where a class is absent from the prediction
            assert np.all(values[np.isfinite(values)] >= 0)
        assert (root / "eval" / f"{metric}_summary.csv").is_file()
    with open(root / "eval" / "metrics.csv") as f:
        summary = dict(csv.reader(f))
    assert set(summary) == {"val_mean_dice", "val_hd95_mm"}
    assert 0.0 <= float(summary["val_mean_dice"]) <= 1.0


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_inference_keeps_exact_geometry_for_ras_lps_and_oblique_inputs(bundle, trained, tmp_path):
    root, _ = trained
    rng = np.random.default_rng(0)
    scans = tmp_path / "scans"
    scans.mkdir()
    volume = rng.normal(size=(30, 36, 14)).astype(np.float32)
    ras = np.diag([0.9, 0.9, 2.5, 1.0])
    ras[:3, 3] = [-10.0, 20.0, 5.0]
    lps = np.diag([-0.8, -0.8, 3.0, 1.0])
    lps[:3, 3] = [40.0, 30.0, -20.0]
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([1.1, 0.7, 2.0])
    oblique[:3, 3] = [3.0, -4.0, 7.0]
    inputs = [_write(scans / "ras_case.nii.gz", volume, ras), _write(scans / "lps_case.nii", volume, lps),
              _write(scans / "oblique.nii.gz", volume[:, :, :9], oblique)]
    out = tmp_path / "out"
    run_bundle(infer_args(bundle, scans, out, root), cwd=tmp_path)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["lps_case_seg.nii.gz", "oblique_seg.nii.gz",
                                                             "ras_case_seg.nii.gz"]
    for path in inputs:
        seg = out / f"{path.name.split('.')[0]}_seg.nii.gz"
        assert_same_geometry(path, seg)
        assert set(np.unique(np.asarray(nib.load(str(seg)).dataobj))) <= {0, 1, 2}


def test_inference_over_msd_folder_segments_every_image(bundle, trained, synthetic_msd, tmp_path):
    root, _ = trained
    out = tmp_path / "out"
    run_bundle(infer_args(bundle, synthetic_msd, out, root), cwd=tmp_path)
    cases = sorted(p.name.replace(".nii.gz", "") for p in (synthetic_msd / "imagesTr").iterdir())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}_seg.nii.gz" for c in cases]
    dice = []
    for case in cases:
        seg = np.asarray(nib.load(str(out / f"{case}_seg.nii.gz")).dataobj)
        label = np.asarray(nib.load(str(synthetic_msd / "labelsTr" / f"{case}.nii.gz")).dataobj)
        assert_same_geometry(synthetic_msd / "imagesTr" / f"{case}.nii.gz", out / f"{case}_seg.nii.gz")
        dice.append(2 * np.sum((seg > 0) & (label > 0)) / max(1, np.sum(seg > 0) + np.sum(label > 0)))
    # two epochs on six synthetic cases: the foreground is already found better than by chance
    assert np.mean(dice) > 0.05


@pytest.mark.realdata
def test_inference_on_real_anisotropic_nrrd_and_lps_nifti(bundle, trained, tmp_path):
    root, _ = trained
    smoke = shared_data("smoke_volumes")
    scans = tmp_path / "scans"
    scans.mkdir()
    picked = [smoke / "pyradiomics_nrrd" / n for n in ("brain1_image.nrrd", "breast1_image.nrrd",
                                                        "prostate_phantom_subvolume.nrrd")]
    picked.append(smoke / "totalsegmentator" / "example_mr_sm.nii.gz")
    for path in picked:
        os.symlink(path, scans / path.name)
    out = tmp_path / "out"
    run_bundle(infer_args(bundle, scans, out, root, "--sw_overlap", "0.25"), cwd=tmp_path)
    for path in picked:
        seg = out / f"{path.name.split('.')[0]}_seg.nii.gz"
        ref, got = sitk.ReadImage(str(path)), sitk.ReadImage(str(seg))
        assert got.GetSize() == ref.GetSize()
        np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-5)
        assert got.GetPixelID() == sitk.sitkUInt8


def test_bad_input_image_fails_with_a_clear_error(bundle, trained, tmp_path):
    root, _ = trained
    scans = tmp_path / "scans"
    scans.mkdir()
    _write(scans / "two_channels.nii.gz", np.zeros((20, 20, 20, 2), np.float32), np.eye(4))
    proc = run_bundle(infer_args(bundle, scans, tmp_path / "out", root), cwd=tmp_path, check=False)
    assert proc.returncode == 2  # the batch finished, a case failed (tests/test_batch_inference.py has the rest)
    assert "two_channels.nii.gz: has 2 channel(s), the model expects 1" in proc.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(c["case"], c["status"]) for c in report["cases"]] == [("two_channels", "failed")]


def test_ddp_with_two_gloo_processes(bundle, tmp_path, synthetic_msd):
    root = tmp_path / "bundle"
    proc = run_bundle(["run", "training", "--config_file", config_list(bundle, "train", "multi_gpu_train"),
                       "--dataset_dir", synthetic_msd, "--bundle_root", root, "--epochs", "2",
                       "--val_fraction", "0.34", *FAST, *QUICK.get(bundle, [])],  # one case per rank
                      cwd=tmp_path, torchrun=2)
    state = torch.load(root / "models" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2
    assert not any(k.startswith("module.") for k in state["model"]), "DDP wrapper leaked into the checkpoint"
    torch.load(root / "models" / "model.pt", weights_only=True)
    # rank 1 is quiet: the per-epoch lines appear once, from rank 0
    assert len(re.findall(r"Epoch\[2\] Metrics -- train_loss", proc.output)) == 1


def test_metadata_net_in_out_and_torchscript_export(bundle, trained, tmp_path):
    root, _ = trained
    configs = BUNDLES / bundle / "configs"
    schema = tmp_path / "schema.json"
    shutil.copy(shared_schema("meta_schema_20240725.json"), schema)  # verify_metadata downloads it if missing
    run_bundle(["verify_metadata", "--meta_file", configs / "metadata.json", "--filepath", schema], cwd=tmp_path)
    proc = run_bundle(["verify_net_in_out", "network_def", "--meta_file", configs / "metadata.json", "--config_file",
                       configs / "inference.json", "--device", "cpu", "--n", "3"], cwd=tmp_path)
    assert "data shape of network is verified with no error" in proc.output
    exported = tmp_path / "model.ts"
    run_bundle(["ckpt_export", "network_def", "--filepath", exported, "--ckpt_file", root / "models" / "model.pt",
                "--meta_file", configs / "metadata.json", "--config_file", configs / "inference.json"], cwd=tmp_path)
    net = bundle_network(bundle)
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    net.eval()
    scripted = torch.jit.load(str(exported))
    meta = json.loads((configs / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    inference = json.loads((configs / "inference.json").read_text())
    x = torch.randn(1, meta["num_channels"], *inference["roi_size"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-5)


def test_bad_training_data_fails_before_training(bundle, tmp_path):
    data = make_synthetic_dataset(tmp_path / "bad", num_cases=4, shape=(24, 24, 24))
    label_path = data / "labelsTr" / "synthetic_002.nii.gz"
    label = nib.load(str(label_path))
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(values, label.affine), str(label_path))
    proc = run_bundle(train_args(bundle, data, tmp_path / "bundle", 1), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "case synthetic_002: label" in proc.output and "value(s) [9] outside the declared labels" in proc.output
    assert "Epoch[1]" not in proc.output

    missing = run_bundle(train_args(bundle, tmp_path / "nowhere", tmp_path / "bundle", 1), cwd=tmp_path,
                         check=False)
    assert missing.returncode != 0
    assert f"dataset_dir '{tmp_path / 'nowhere'}' does not exist" in missing.output


@pytest.mark.realdata
def test_real_hippocampus_short_training_and_inference(bundle, tmp_path):
    hippo = shared_data("Task04_Hippocampus")
    root = tmp_path / "bundle"
    proc = run_bundle(train_args(bundle, hippo, root, 2, "training", "--max_cases", "12"), cwd=tmp_path)
    dice = [float(v) for v in re.findall(r"Epoch\[\d+\] Metrics -- val_mean_dice: ([0-9.]+)", proc.output)]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice)
    scans = tmp_path / "scans"
    scans.mkdir()
    picked = [*sorted((hippo / "imagesTs").iterdir())[:1], *sorted((hippo / "imagesTr").iterdir())[:2]]
    for path in picked:
        os.symlink(path, scans / path.name)
    out = tmp_path / "out"
    run_bundle(infer_args(bundle, scans, out, root), cwd=tmp_path)
    for path in picked:
        assert_same_geometry(path, out / path.name.replace(".nii.gz", "_seg.nii.gz"))


@pytest.mark.realdata
def test_brats_two_channel_five_label_override(bundle, tmp_path):
    brats = shared_data("BraTS2015_deepmedic_subset")
    root = tmp_path / "bundle"
    overrides = ["--in_channels", "2", "--num_classes", "5", "--pixdim", "[2.0,2.0,2.0]",
                 "--label_names", "['background','necrosis','edema','non-enhancing','enhancing']"]
    proc = run_bundle(train_args(bundle, brats, root, 1, "training", *overrides), cwd=tmp_path)
    assert re.search(r"Epoch\[1\] Metrics -- val_mean_dice: \d", proc.output)
    state_dict = torch.load(root / "models" / "model.pt", weights_only=True)
    net = bundle_network(bundle, in_channels=2, num_classes=5)
    net.load_state_dict(state_dict)  # the checkpoint is of the 2-channel, 5-class network
    net.eval()
    roi = json.loads((BUNDLES / bundle / "configs" / "inference.json").read_text())["roi_size"]
    with torch.no_grad():
        assert net(torch.zeros(1, 2, *roi)).shape[1] == 5

    scans = tmp_path / "scans"
    scans.mkdir()
    case = sorted((brats / "imagesTr").iterdir())[0]
    os.symlink(case, scans / case.name)
    out = tmp_path / "out"
    run_bundle(infer_args(bundle, scans, out, root, *overrides[:6]), cwd=tmp_path)
    seg = out / case.name.replace(".nii.gz", "_seg.nii.gz")
    assert_same_geometry(case, seg)
    assert set(np.unique(np.asarray(nib.load(str(seg)).dataobj))) <= set(range(5))
