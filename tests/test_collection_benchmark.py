# SPDX-License-Identifier: Apache-2.0
"""Smoke test of the collection benchmark (`python -m benchmarks.collection`) on a tiny budget and synthetic data.

The real run (minutes per network on the Task04 data) is not a test; this one checks that the protocol still
runs end to end for a bundle and a MONAI built-in and writes what docs/benchmark.md shows.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

import pytest
from PIL import Image

from bundletools import training_split
from bundletools.demo import make_synthetic_dataset
from benchmarks.scoring import score_segmentations
from tests.utils import REPO, nnunet_python, subprocess_env

PLOTS = ["dice_vs_training_time.png", "dice_vs_inference_time.png", "params_vs_dice.png"]


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.collection", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", cwd=REPO, env=subprocess_env(), timeout=timeout)


def _rows(out: Path) -> dict[tuple[str, str, str], dict]:
    """results.csv by (entry, budget, seed)."""
    with open(out / "results.csv", encoding="utf-8") as f:
        return {(row["key"], row["budget"], row["seed"]): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def other_msd(tmp_path_factory) -> Path:
    """A second labelled MSD folder (3 cases, another seed) to score on instead of the validation split."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("other") / "other", num_cases=3, shape=(32, 40, 32), seed=1)


@pytest.fixture(scope="module")
def other_thick_msd(tmp_path_factory) -> Path:
    """A third one (2 cases) to score the thick-slice entries on."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("thick") / "other_thick", num_cases=2, shape=(32, 40, 32),
                                  seed=2)


@pytest.mark.slow
def test_bundle_and_builtin_under_one_protocol(tmp_path, synthetic_msd, other_msd, other_thick_msd):
    """A MONAI built-in and a thick-slice entry for one epoch each, scored on their own held-out folders."""
    from monai.networks.nets import UNet, SegResNet

    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--epochs", "1", "--only", "segresnet,unet_thick", "--dataset_dir", str(synthetic_msd),
            "--thick_dataset_dir", str(synthetic_msd), "--eval_dataset_dir", str(other_msd),
            "--thick_eval_dataset_dir", str(other_thick_msd), "--work_dir", str(work), "--out", str(out), "--",
            "--num_workers", "0"]
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = _rows(out)
    assert list(rows) == [("segresnet", "1 epoch", "0"), ("unet_thick", "1 epoch", "0")]
    unet = UNet(3, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    segresnet = SegResNet(3, init_filters=16, in_channels=1, out_channels=3, blocks_down=(1, 2, 2, 4),
                          blocks_up=(1, 1, 1))
    for key, net, scored in (("segresnet", segresnet, other_msd), ("unet_thick", unet, other_thick_msd)):
        row = rows[(key, "1 epoch", "0")]
        assert row["status"] == "ok", row
        assert int(row["params"]) == sum(p.numel() for p in net.parameters())
        # the thick-slice entry is scored on its own folder, the 3D one on --eval_dataset_dir
        cases = sorted(p.name.replace(".nii.gz", "") for p in (scored / "imagesTr").glob("*.nii.gz"))
        assert row["scored_on"] == f"{scored.name} (all cases)" and int(row["cases_scored"]) == len(cases)
        assert row["budget_epochs"] == "1" and row["budget_min"] == "" and row["epochs"] == "1"
        assert row["device"] == "cpu"
        assert float(row["s_per_epoch"]) > 0
        assert 0.0 <= float(row["dice_mean"]) <= 1.0
        assert 0.0 <= float(row["dice_anterior"]) <= 1.0 and 0.0 <= float(row["dice_posterior"]) <= 1.0
        assert float(row["infer_s_per_case"]) > 0
        # the inference pass segmented exactly the scored cases
        segs = sorted(p.name for p in (work / key / "1epochs" / "seed0" / "segmentations").glob("*_seg.nii.gz"))
        assert segs == [f"{c}_seg.nii.gz" for c in cases]
        # those segmentation files, scored as the nnU-Net entry's are, give what evaluate.json gave the model
        run = work / key / "1epochs" / "seed0"
        pairs = [(run / "segmentations" / f"{c}_seg.nii.gz", scored / "labelsTr" / f"{c}.nii.gz") for c in cases]
        dice, hd95 = score_segmentations(pairs, tmp_path / f"rescored_{key}", 3, ["anterior", "posterior"])
        for name in ("anterior", "posterior", "mean"):
            # a 1-epoch model may miss a label in every case: both then give NaN for its HD95
            assert dice[name] == pytest.approx(float(row["dice_mean" if name == "mean" else f"dice_{name}"]), abs=2e-4)
            assert hd95[name] == pytest.approx(float(row[f"hd95_{name}_mm"]), abs=2e-4, nan_ok=True)

    table = (out / "results.md").read_text(encoding="utf-8")
    assert "## Equal epochs: 1 epoch per network" in table and "## Equal time" not in table
    assert "| SegResNet (MONAI) | demo | 1 epoch | 0 |" in table
    assert "| UNet (bundle), thick | demo | 1 epoch | 0 |" in table
    assert ("Scored on: other (all cases), 3 cases (SegResNet (MONAI)); other_thick (all cases), 2 cases (UNet "
            "(bundle), thick).") in table
    assert "Machine: " in table and "Command: `python -m benchmarks.collection --epochs 1" in table
    for name in PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 400

    # a second run with the same arguments keeps the finished runs instead of training again
    again = _run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "segresnet, 1 epoch, seed 0: kept the result" in again.stdout
    assert "unet_thick, 1 epoch, seed 0: kept the result" in again.stdout
    assert _rows(out) == rows


@pytest.mark.slow
def test_seeds_train_apart_on_one_split_and_budgets_stay_apart(tmp_path, synthetic_msd):
    """Two training seeds of one entry: two runs on the same validation split, one row with mean ± std; then an
    equal-time budget next to the equal-epoch one (a run that finishes no epoch is reported, not fatal)."""
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--only", "unet", "--dataset_dir", str(synthetic_msd), "--work_dir", str(work), "--out", str(out),
              "--", "--num_workers", "0", "--val_fraction", "0.5"]
    proc = _run(["--epochs", "1", "--seeds", "0,1", *common])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = _rows(out)
    assert list(rows) == [("unet", "1 epoch", "0"), ("unet", "1 epoch", "1")]
    assert all(row["status"] == "ok" and row["epochs"] == "1" for row in rows.values()), rows
    runs = [work / "unet" / "1epochs" / f"seed{s}" for s in (0, 1)]
    # the training seed changes the training (other weights), not the validation split, which is the bundle's
    # default split (split_seed 0) whatever the seed
    scored = [json.loads((run / "scoring.json").read_text(encoding="utf-8"))["datalist"]["validation"] for run in runs]
    assert scored[0] == scored[1] == training_split(synthetic_msd, 3, val_fraction=0.5, seed=0)["validation"]
    assert len(scored[0]) == 3
    segs = [sorted(p.name for p in (run / "segmentations").glob("*_seg.nii.gz")) for run in runs]
    assert segs[0] == segs[1] and len(segs[0]) == 3
    assert (runs[0] / "models" / "model.pt").read_bytes() != (runs[1] / "models" / "model.pt").read_bytes()

    dice = [float(row["dice_mean"]) for row in rows.values()]
    hd95 = [float(row["hd95_mean_mm"]) for row in rows.values()]
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| UNet (bundle) | demo | 1 epoch | 0, 1 |" in table
    assert (f"| {mean(dice):.3f} ± {stdev(dice):.3f} ({min(dice):.3f}–{max(dice):.3f}) |" in table)
    assert (f"| {mean(hd95):.2f} ± {stdev(hd95):.2f} ({min(hd95):.2f}–{max(hd95):.2f}) |" in table)
    assert "mean ± standard deviation over the seeds" in table

    # both budgets in one run: the seed-0 epoch run is kept (its inputs are the same with or without --seeds), the
    # equal-time run gets its own section and row, and finishes no epoch in 6 ms
    proc = _run(["--minutes", "0.0001", "--epochs", "1", *common])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "unet, 1 epoch, seed 0: kept the result" in proc.stdout
    # results.csv keeps the seed-1 run of the first invocation, and adds the new run
    assert list(_rows(out)) == [("unet", "1 epoch", "0"), ("unet", "1 epoch", "1"), ("unet", "0.0001 min", "0")]
    rows = _rows(out)
    timed = rows[("unet", "0.0001 min", "0")]
    assert timed["status"] == "no epoch finished within the budget"
    assert timed["budget_min"] == "0.0001" and timed["budget_epochs"] == "" and timed["epochs"] == "0"
    assert timed["dice_mean"] == ""
    table = (out / "results.md").read_text(encoding="utf-8")
    timed_at, epochs_at = table.index("## Equal time: 0.0001 min"), table.index("## Equal epochs: 1 epoch")
    assert timed_at < table.index("| UNet (bundle) | demo | 0.0001 min | 0 |") < epochs_at
    assert timed_at < table.index("- UNet (bundle): no epoch finished within the budget") < epochs_at
    assert epochs_at < table.index("| UNet (bundle) | demo | 1 epoch | 0 |")
    assert f"| {dice[0]:.3f} |" in table.split("## Equal epochs")[1]
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


def test_bad_budgets_seeds_and_thick_folders_are_named(tmp_path, synthetic_msd):
    data = ["--dataset_dir", str(synthetic_msd), "--thick_dataset_dir", str(synthetic_msd)]
    missing = tmp_path / "missing"
    proc = _run(["--only", "unet_thick", *data, "--thick_eval_dataset_dir", str(missing)])
    assert proc.returncode == 2 and f"--thick_eval_dataset_dir {missing}: no dataset.json there" in proc.stderr
    # the 3D entries' scored folder is checked on its own
    proc = _run(["--only", "unet,csam_thick", *data, "--eval_dataset_dir", str(missing), "--thick_eval_dataset_dir",
                 str(synthetic_msd)])
    assert proc.returncode == 2 and f"--eval_dataset_dir {missing}: no dataset.json there" in proc.stderr
    proc = _run(["--epochs", "0", *data])
    assert proc.returncode == 2 and "--epochs must be positive" in proc.stderr
    proc = _run(["--epochs", "1.5", *data])
    assert proc.returncode == 2 and "--epochs: invalid int value: '1.5'" in proc.stderr
    proc = _run(["--minutes", "-1", "--epochs", "3", *data])
    assert proc.returncode == 2 and "--minutes must be positive" in proc.stderr
    proc = _run(["--seeds", "0,x", *data])
    assert proc.returncode == 2 and "--seeds 0,x: expected comma-separated whole numbers" in proc.stderr
    proc = _run(["--seeds", "1,1", *data])
    assert proc.returncode == 2 and "--seeds 1,1: expected distinct comma-separated whole numbers" in proc.stderr
    proc = _run(["--seed_entries", "unet", *data])
    assert proc.returncode == 2 and "--seed_entries needs --seeds" in proc.stderr
    proc = _run(["--seeds", "0,1", "--seed_entries", "unet,nosuchnet", *data])
    assert proc.returncode == 2 and "--seed_entries: unknown entries ['nosuchnet']" in proc.stderr
    proc = _run(["--only", "unet,dnet", "--seeds", "0,1", "--seed_entries", "ukan,unet,dnet", *data])
    assert proc.returncode == 2 and "--seed_entries ['ukan']: not among the entries run (--only)" in proc.stderr
    proc = _run(["--epochs", "3", *data, "--", "--epochs", "5"])
    assert proc.returncode == 2 and "--epochs after --: the benchmark sets the budget; use --minutes or --epochs" \
        in proc.stderr
    proc = _run([*data, "--", "--time_budget_s=60"])
    assert proc.returncode == 2 and "--time_budget_s after --: the benchmark sets the budget" in proc.stderr
    proc = _run(["--only", "unet", "--seeds", "0,1", *data, "--", "--seed", "3"])
    assert proc.returncode == 2 and "--seeds sets the training seed of each run; drop --seed after --" in proc.stderr


def _collection():
    import benchmarks.collection

    return benchmarks.collection


def test_scored_cases_are_the_split_the_run_validates_on(synthetic_msd):
    """Overrides such as --val_fraction and --split_seed reach the scored split too, so scoring never sees training
    cases; the training seed (--seed) does not move the split."""
    collection = _collection()
    entry = next(e for e in collection.ENTRIES if e.key == "segresnet")
    expected = training_split(synthetic_msd, 3, val_fraction=0.5, seed=3)
    assert expected != training_split(synthetic_msd, 3, val_fraction=0.5, seed=0)  # the split seed matters here
    for seed in (0, 3, 5):
        config = collection.bundle_config(entry, str(synthetic_msd),
                                          ["--val_fraction", "0.5", "--split_seed=3", f"--seed={seed}"])
        assert config.get_parsed_content("datalist") == expected
    assert config.get_parsed_content("network_def").__class__.__name__ == "SegResNet"


def test_seeds_are_refused_when_the_split_follows_the_training_seed(synthetic_msd):
    """A train config whose split moves with the seed (here by an override) would score each seed on other cases."""
    collection = _collection()
    args = collection.parse_args(["--only", "unet", "--dataset_dir", str(synthetic_msd), "--seeds", "0,1", "--",
                                  "--val_fraction", "0.5"])
    entry = args.entries[0]
    collection.check_split_fixed(entry, [0, 1], args)  # the bundle's own config: one split for every seed
    args.overrides += ["--split_seed", "@seed"]
    with pytest.raises(SystemExit, match="unet .unet_segmentation. validates on other cases with each training seed"):
        collection.check_split_fixed(entry, [0, 1], args)


def test_results_csv_keeps_one_row_per_run(tmp_path):
    """A run done again replaces its row where it stood; runs of other invocations (another entry, budget, seed or
    device) keep theirs, so the CPU and GPU rows and the nnU-Net rows end up in one file."""
    collection = _collection()

    def run(key: str, seed: int, device: str, dice: float) -> dict:
        return {"key": key, "network": key, "bundle": "b", "training_data": "d", "scored_on": "s", "cases_scored": 3,
                "budget": "7 min", "budget_min": 7.0, "budget_epochs": None, "seed": seed, "device": device,
                "params": 1, "epochs": 2, "train_s": 1.0, "s_per_epoch": 0.5, "dice_mean": dice,
                "dice": {"anterior": dice, "posterior": dice, "mean": dice}, "hd95_mm": {}, "status": "ok"}

    path = tmp_path / "results.csv"
    collection.write_csv([run("unet", 0, "cpu", 0.8), run("nnunet", 0, "cpu", 0.7)], path, ["anterior", "posterior"])
    collection.write_csv([run("unet", 0, "NVIDIA H200", 0.9), run("unet", 0, "cpu", 0.85), run("unet", 1, "cpu", 0.84)],
                         path, ["anterior", "posterior"])
    with open(path, encoding="utf-8") as f:
        rows = [(r["key"], r["seed"], r["device"], r["dice_mean"]) for r in csv.DictReader(f)]
    assert rows == [("unet", "0", "cpu", "0.85"), ("nnunet", "0", "cpu", "0.7"), ("unet", "0", "NVIDIA H200", "0.9"),
                    ("unet", "1", "cpu", "0.84")]


def test_nnunet_entries_need_their_venv(tmp_path, synthetic_msd):
    proc = _run(["--only", "unet,nnunet", "--dataset_dir", str(synthetic_msd), "--nnunet_python",
                 str(tmp_path / "none" / "python")])
    assert proc.returncode == 2, proc.stderr
    assert (f"nnunet: nnU-Net's venv is missing (--nnunet_python {tmp_path / 'none' / 'python'}); make it with "
            "`bash scripts/setup_nnunet.sh`, or leave these entries out with --only") in proc.stderr


def test_segmentation_files_are_scored_as_evaluate_scores(tmp_path):
    """Dice and HD95 in mm per class, from files on the label's grid; a file on another grid is refused."""
    import nibabel as nib
    import numpy as np

    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    label = np.zeros((12, 12, 6), np.uint8)
    label[2:6, 2:6, 1:3], label[6:10, 6:10, 3:5] = 1, 2
    pred = label.copy()
    pred[6:10, 6:10, 3:5] = 0
    pred[6:10, 6:10, 2:4] = 2  # posterior one slice (3 mm) too low: half of its voxels overlap
    for name, array, a in (("label", label, affine), ("pred", pred, affine), ("moved", pred, np.diag([1, 1, 2, 1]))):
        nib.save(nib.Nifti1Image(array, a), tmp_path / f"{name}.nii.gz")
    dice, hd95 = score_segmentations([(tmp_path / "pred.nii.gz", tmp_path / "label.nii.gz")], tmp_path / "eval", 3,
                                     ["anterior", "posterior"])
    assert dice == pytest.approx({"anterior": 1.0, "posterior": 0.5, "mean": 0.75})
    assert hd95 == pytest.approx({"anterior": 0.0, "posterior": 3.0, "mean": 1.5})
    assert (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()[0] == "filename,anterior,posterior,mean"
    with pytest.raises(ValueError, match="differ from its label's"):
        score_segmentations([(tmp_path / "moved.nii.gz", tmp_path / "label.nii.gz")], tmp_path / "eval2", 3,
                            ["anterior", "posterior"])


@pytest.mark.slow
def test_nnunet_entry_runs_nnunet_on_the_same_cases(tmp_path, synthetic_msd):
    """nnU-Net v2 in its venv, with epochs of 4 + 2 iterations so that one finishes in the budget: trained on the
    bundles' training cases only, its final checkpoint's predictions scored on their validation split."""
    python = nnunet_python()
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run(["--minutes", "0.5", "--only", "nnunet", "--dataset_dir", str(synthetic_msd), "--nnunet_python",
                 str(python), "--nnunet_iterations_per_epoch", "4", "2", "--work_dir", str(work), "--out", str(out),
                 "--", "--num_workers", "0"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    row = _rows(out)[("nnunet", "0.5 min", "0")]
    assert row["status"] == "ok" and row["device"] == "cpu" and row["bundle"].startswith("nnunetv2 "), row
    assert int(row["epochs"]) >= 1 and int(row["params"]) > 0 and float(row["infer_s_per_case"]) > 0
    assert 0.0 <= float(row["dice_mean"]) <= 1.0
    split = training_split(synthetic_msd, 3, seed=0)
    # nnU-Net saw the training cases only; the scored cases are the validation split, each segmented
    raw = work / "nnunet" / "nnunet_data" / "raw" / "Dataset004_demo"
    seen = sorted(p.name.removesuffix("_0000.nii.gz") for p in (raw / "imagesTr").glob("*.nii.gz"))
    assert seen == sorted(Path(c["image"]).name.removesuffix(".nii.gz") for c in split["training"])
    segs = sorted(p.name for p in (work / "nnunet" / "0.5min" / "seed0" / "segmentations").glob("*_seg.nii.gz"))
    assert segs == sorted(Path(c["image"]).name.replace(".nii.gz", "_seg.nii.gz") for c in split["validation"])
    assert int(row["cases_scored"]) == len(split["validation"])
    assert "| nnU-Net v2 (3d_fullres) | demo | 0.5 min | 0 |" in (out / "results.md").read_text(encoding="utf-8")
