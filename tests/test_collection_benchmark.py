# SPDX-License-Identifier: Apache-2.0
"""Smoke test of the collection benchmark (`benchmarks/collection.py`) on a tiny budget and synthetic data.

The real run (minutes per network on the Task04 data) is not a test; this one checks that the protocol still
runs end to end for a bundle and a MONAI built-in and writes what docs/benchmark.md shows.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bundletools import training_split
from bundletools.demo import make_synthetic_dataset
from tests.conftest import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "collection.py"
PLOTS = ["dice_vs_training_time.png", "dice_vs_inference_time.png", "params_vs_dice.png"]


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=REPO, env=subprocess_env(), timeout=timeout)


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", encoding="utf-8") as f:
        return {row["key"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def other_msd(tmp_path_factory) -> Path:
    """A second labelled MSD folder (3 cases, another seed) to score on instead of the validation split."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("other") / "other", num_cases=3, shape=(32, 40, 32), seed=1)


@pytest.mark.slow
def test_bundle_and_builtin_under_one_protocol(tmp_path, synthetic_msd, other_msd):
    from monai.networks.nets import UNet, SegResNet

    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--minutes", "0.25", "--only", "unet,segresnet", "--dataset_dir", str(synthetic_msd),
            "--eval_dataset_dir", str(other_msd), "--work_dir", str(work), "--out", str(out), "--",
            "--num_workers", "0"]
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = _rows(out)
    assert list(rows) == ["unet", "segresnet"]
    unet = UNet(3, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    segresnet = SegResNet(3, init_filters=16, in_channels=1, out_channels=3, blocks_down=(1, 2, 2, 4),
                          blocks_up=(1, 1, 1))
    for key, net in (("unet", unet), ("segresnet", segresnet)):
        row = rows[key]
        assert row["status"] == "ok", row
        assert int(row["params"]) == sum(p.numel() for p in net.parameters())
        assert row["scored_on"] == "other (all cases)" and int(row["cases_scored"]) == 3
        assert int(row["epochs"]) >= 1 and float(row["s_per_epoch"]) > 0
        assert 0.0 <= float(row["dice_mean"]) <= 1.0
        assert 0.0 <= float(row["dice_anterior"]) <= 1.0 and 0.0 <= float(row["dice_posterior"]) <= 1.0
        assert float(row["infer_s_per_case"]) > 0
        # the inference pass segmented exactly the scored cases
        segs = sorted(p.name for p in (work / key / "segmentations").glob("*_seg.nii.gz"))
        assert segs == [f"synthetic_{i:03d}_seg.nii.gz" for i in range(3)]
    assert float(rows["unet"]["budget_min"]) == 0.25

    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| UNet (bundle) |" in table and "| SegResNet (MONAI) |" in table
    assert "Scored on: other (all cases), 3 cases" in table
    assert "Machine: " in table and "Command: `python benchmarks/collection.py --minutes 0.25" in table
    for name in PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 400

    # a second run with the same arguments keeps the finished entries instead of training again
    again = _run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "unet: kept the result" in again.stdout and "segresnet: kept the result" in again.stdout
    assert _rows(out) == rows


@pytest.mark.slow
def test_network_without_a_finished_epoch_is_reported_not_fatal(tmp_path, synthetic_msd):
    out = tmp_path / "out"
    proc = _run(["--minutes", "0.0001", "--only", "unet", "--dataset_dir", str(synthetic_msd),
                 "--work_dir", str(tmp_path / "work"), "--out", str(out), "--", "--num_workers", "0"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = _rows(out)["unet"]
    assert row["status"] == "no epoch finished within the budget"
    assert row["epochs"] == "0" and row["dice_mean"] == ""
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "- UNet (bundle): no epoch finished within the budget" in table
    assert all((out / name).is_file() for name in PLOTS)


def test_bad_arguments_are_named(tmp_path, synthetic_msd):
    proc = _run(["--only", "unet,nosuchnet"])
    assert proc.returncode == 2 and "unknown entries ['nosuchnet']" in proc.stderr
    # a training folder that exists (the default one under ../shared may not), so that the scored one is named
    proc = _run(["--only", "unet", "--dataset_dir", str(synthetic_msd), "--eval_dataset_dir", str(tmp_path / "missing")])
    assert proc.returncode == 2 and f"--eval_dataset_dir {tmp_path / 'missing'}: no dataset.json there" in proc.stderr
    proc = _run(["--only", "unet", "--dataset_dir", str(tmp_path / "absent")])
    assert proc.returncode == 2 and f"--dataset_dir {tmp_path / 'absent'}: no dataset.json there" in proc.stderr
    proc = _run(["--minutes", "0"])
    assert proc.returncode == 2 and "--minutes must be positive" in proc.stderr
    proc = _run(["--only", "unet", "--", "--num_workers"])
    assert proc.returncode == 2 and "config override --num_workers: no value" in proc.stderr


def test_scored_cases_are_the_split_the_run_validates_on(synthetic_msd):
    """Overrides such as --val_fraction reach the scored split too, so scoring never sees training cases."""
    spec = importlib.util.spec_from_file_location("collection", SCRIPT)
    collection = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("collection", collection)  # dataclasses look their module up there
    spec.loader.exec_module(collection)
    entry = next(e for e in collection.ENTRIES if e.key == "segresnet")
    config = collection.bundle_config(entry, str(synthetic_msd), ["--val_fraction", "0.5", "--seed=3"])
    assert config.get_parsed_content("datalist") == training_split(synthetic_msd, 3, val_fraction=0.5, seed=3)
    assert config.get_parsed_content("network_def").__class__.__name__ == "SegResNet"
