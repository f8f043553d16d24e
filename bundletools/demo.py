# SPDX-License-Identifier: Apache-2.0
"""Synthetic demo data and the quick-start run: no download, no GPU.

``python -m bundletools.demo`` writes a small synthetic MSD-layout dataset to ``data/demo/`` (clearly named as
synthetic), trains the UNet bundle on it, evaluates it on the held-out validation cases, segments a few new
synthetic scans with QC pictures, and ends with a table of per-label Dice and HD95 and the seconds per case.
The volumes imitate the default task's layout (one channel, labels 0 background, 1 anterior, 2 posterior, 32x40x32
voxels at 1 mm) but hold geometric shapes, not anatomy.

The bundles' defaults are set for MSD Task04 (48^3 patches at 1e-3, tens of epochs); the demo overrides them for
its small synthetic task (``DEMO_OVERRIDES``, each bundle's demo recipe): patches that the 32x40x32 volumes fill,
two per case in batches of 2, learning rate 3e-3, 8 to 10 epochs, no DataLoader workers (on 2 cores the worker
processes cost more than they save on volumes this small). Each bundle's demo ends at a mean validation Dice of at
least 0.85 (``tests/test_demo.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from .bundles import bundle_dir

__all__ = ["make_synthetic_dataset", "run_demo", "main", "DEMO_OVERRIDES", "KNOWN_WARNINGS"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SHAPE = (32, 40, 32)

# the demo's training recipe, with two patches per case in batches of 2 and no loader workers
_SMALL_TASK = ["--batch_size", "2", "--samples_per_case", "2", "--learning_rate", "0.003"]

# bundle -> (default epochs, overrides of every command, overrides of training only); other bundles run with
# their own defaults and 4 epochs. The bundles' Task04 patches (32x64x32 for D-Net and U-KAN) are more than a third
# zero padding on these volumes; the demo's fit them, each a multiple of its network's size_divisor. With their
# Task04 recipe (1e-3, one patch per case) for 4 epochs, the UNet itself reached a mean Dice of 0.28 and D-Net 0.02.
DEMO_OVERRIDES: dict[str, tuple[int, list[str], list[str]]] = {
    "unet_segmentation": (8, ["--roi_size", "[32,32,32]", "--num_workers", "0"], _SMALL_TASK),
    "dnet_segmentation": (10, ["--roi_size", "[32,32,32]", "--num_workers", "0"], _SMALL_TASK),
    "ukan_segmentation": (8, ["--roi_size", "[32,32,32]", "--num_workers", "0"], _SMALL_TASK),
    # the slabs: whole 32x40 slices (the in-plane size_divisor is 8), every slice of the volume
    "csam_unet_segmentation": (10, ["--roi_size", "[32,40,12]", "--num_workers", "0"], _SMALL_TASK),
    "transunet_segmentation": (10, ["--roi_size", "[32,48]", "--num_workers", "0"], _SMALL_TASK),
}

# Warnings of third-party code that a demo user can do nothing about, ignored by the start of their message in
# the demo's commands only (PYTHONWARNINGS: action:message:category, where the message is matched from its
# start and may hold no ':' or ',', so MONAI's "<module> <function>:<argument>: ..." messages are matched up to
# the function's name).
KNOWN_WARNINGS = [
    # torch, inside MONAI 1.5's sliding-window inference (it indexes a tensor with a list)
    ("Using a non-tuple sequence for multidimensional indexing is deprecated", "UserWarning"),
    # MONAI 1.5 announces that Orientationd's default `labels` will change (the bundles want RAS either way)
    ("monai.transforms.spatial.dictionary Orientationd.__init__", "FutureWarning"),
    # MONAI 1.6 with pydicom installed: its GPU DICOM decoder (nvImageCodec) is missing (the bundles read with ITK)
    ("NvImgCodecPydicomReader", "UserWarning"),
    # MONAI 1.5's own Hausdorff distance passes an argument it deprecated
    ("monai.metrics.utils get_mask_edges", "FutureWarning"),
]


def _synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int],
                    noise: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """An elongated two-part blob (label 1 'anterior' head, label 2 'posterior' tail) in a noisy background."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-3, 3, size=3)
    radii = np.array([rng.uniform(4, 6), rng.uniform(11, 15), rng.uniform(4, 6)], dtype=np.float32)
    offset = (grid - centre[:, None, None, None]) / radii[:, None, None, None]
    inside = (offset**2).sum(0) <= 1.0
    label = np.zeros(shape, dtype=np.uint8)
    label[inside & (offset[1] >= 0)] = 1
    label[inside & (offset[1] < 0)] = 2
    image = rng.normal(100.0, noise, size=shape).astype(np.float32)
    image[label == 1] += 60.0
    image[label == 2] += 35.0
    image *= rng.uniform(0.5, 2.0)  # per-volume intensity scale, as in real MRI
    return image, label


def make_synthetic_dataset(
    out_dir: str | Path, num_cases: int = 16, shape: tuple[int, int, int] = DEMO_SHAPE, seed: int = 0,
    num_test: int = 0, noise: float = 10.0,
) -> Path:
    """Write ``num_cases`` synthetic image/label pairs and a ``dataset.json`` in MSD layout to ``out_dir``.

    ``num_test`` more images (``synthetic_test_*``) go to ``imagesTs/``, their labels to ``labelsTs/`` (not part
    of the MSD layout; only for checking their segmentations). ``noise`` is the standard deviation of the
    background noise, in the units of the background's mean of 100.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    training, test = [], []
    for i in range(num_cases + num_test):
        image, label = _synthetic_case(rng, shape, noise)
        is_test = i >= num_cases
        name = f"synthetic_test_{i - num_cases:03d}.nii.gz" if is_test else f"synthetic_{i:03d}.nii.gz"
        images, labels = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        (out / images).mkdir(parents=True, exist_ok=True)
        (out / labels).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), out / images / name)
        nib.save(nib.Nifti1Image(label, affine), out / labels / name)
        if is_test:
            test.append(f"./imagesTs/{name}")
        else:
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    spec = {
        "name": "SYNTHETIC demo data",
        "description": "Synthetic shapes made by bundletools.demo for the quick start; not medical images.",
        "tensorImageSize": "3D",
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", "1": "anterior", "2": "posterior"},
        "numTraining": num_cases,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    (out / "dataset.json").write_text(json.dumps(spec, indent=2))
    return out


def warning_filters() -> str:
    """``PYTHONWARNINGS`` for the demo's commands: the user's own filters, then :data:`KNOWN_WARNINGS` ignored."""
    ours = [f"ignore:{message}:{category}" for message, category in KNOWN_WARNINGS]
    return ",".join([*filter(None, [os.environ.get("PYTHONWARNINGS", "")]), *ours])


def _run(args: list[str], env: dict[str, str]) -> str:
    """Run a command, passing its output through as it comes (progress bars included); returns the output."""
    print("+", " ".join(args), flush=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    chunks = []
    while chunk := proc.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
    if proc.wait() != 0:
        raise SystemExit(f"demo: command failed with status {proc.returncode}: {' '.join(args)}")
    return b"".join(chunks).decode("utf-8", errors="replace")


def _seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return 3600 * int(h) + 60 * int(m) + float(s)


def _label_means(path: Path) -> tuple[dict[str, float], int]:
    """(per-label mean, number of cases) over the cases of a ``<metric>_raw.csv`` (columns: filename, labels...,
    mean); NaN cases (a label absent from the prediction) are left out, and an infinite distance makes the mean
    infinite."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, values = rows[0][1:], np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64)
    means = {}
    for j, name in enumerate(header):
        column = values[:, j]
        column = column[~np.isnan(column)]
        means[name] = float(column.mean()) if column.size else math.nan
    return means, len(values)


def _table(dice: dict[str, float], hd95: dict[str, float]) -> str:
    width = max(len(name) for name in dice)
    lines = [f"  {'label':<{width}}    Dice   HD95 (mm)"]
    for name in dice:
        lines.append(f"  {name:<{width}}   {dice[name]:5.3f}   {hd95.get(name, math.nan):9.2f}")
    return "\n".join(lines)


def _show(path: str | Path) -> str:
    """``path`` relative to the current directory when it lies under it (``demo.sh`` runs from the repository)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_demo(bundle: str = "unet_segmentation", data_dir: str | Path = REPO_ROOT / "data" / "demo",
             work_dir: str | Path = REPO_ROOT / "runs" / "demo", epochs: int | None = None, num_cases: int = 16,
             num_test: int = 4, shape: tuple[int, int, int] = DEMO_SHAPE) -> dict:
    """Make the data, train, evaluate, segment the test scans with QC pictures, print the summary; returns it.

    Returns a dict with ``dice`` and ``hd95`` (per label and ``mean``, on the validation cases),
    ``seconds_per_case`` (inference), ``epochs``, ``epoch_seconds`` (mean training seconds per epoch), ``qc``
    (the QC pictures), ``seconds`` (the whole demo) and ``work`` (the output folder).
    """
    start = time.perf_counter()
    default_epochs, common_overrides, train_overrides = DEMO_OVERRIDES.get(bundle, (4, ["--num_workers", "0"], []))
    epochs = default_epochs if epochs is None else int(epochs)
    data_dir = make_synthetic_dataset(data_dir, num_cases=num_cases, num_test=num_test, shape=shape)
    print(f"Synthetic demo dataset ({num_cases} training cases, {num_test} new scans; shapes, not anatomy): "
          f"{_show(data_dir)}", flush=True)
    configs = bundle_dir(bundle) / "configs"
    work = Path(work_dir) / bundle
    common = ["--dataset_dir", str(data_dir), "--bundle_root", str(configs.parent), *common_overrides]
    dirs = ["--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval")]
    env = {**os.environ, "PYTHONWARNINGS": warning_filters()}
    monai_bundle = [sys.executable, "-m", "monai.bundle", "run"]

    # a fresh model each time: the checkpoint handler would otherwise resume (or skip) a finished earlier run
    for name in ("model.pt", "training_state.pt"):
        (work / "models" / name).unlink(missing_ok=True)
    log = _run(monai_bundle + ["training", "--config_file", str(configs / "train.json"), "--epochs", str(epochs)]
               + common + train_overrides + dirs, env)
    epoch_times = [_seconds(t) for t in re.findall(r"SupervisedTrainer - INFO - Epoch\[\d+\] Complete\. Time taken: "
                                                   r"(\d+:\d+:[\d.]+)", log)]
    _run(monai_bundle + ["--config_file", f"['{configs / 'train.json'}','{configs / 'evaluate.json'}']"]
         + common + dirs, env)
    segmentations = work / "segmentations"
    # --overwrite: a repeated demo trained a new model; batch inference would keep the old outputs
    _run([sys.executable, "-m", "bundletools.infer", bundle, str(data_dir / "imagesTs"), str(segmentations),
          "--overwrite", "True", "--qc", "True", "--ckpt_dir", str(work / "models"),
          "--bundle_root", str(configs.parent), *common_overrides], env)

    dice, num_val = _label_means(work / "eval" / "val_mean_dice_raw.csv")
    hd95, _ = _label_means(work / "eval" / "val_hd95_mm_raw.csv")
    report = json.loads((segmentations / "report.json").read_text())
    done = [c for c in report["cases"] if c["status"] == "succeeded"]
    seconds_per_case = sum(c["seconds"] for c in done) / max(1, len(done))
    qc = sorted(str(c["qc"]) for c in done if c.get("qc"))
    total = time.perf_counter() - start
    epoch_s = sum(epoch_times) / len(epoch_times) if epoch_times else math.nan

    print(f"\nDemo finished in {total:.0f} s ({len(epoch_times)} training epochs, {epoch_s:.1f} s per epoch).")
    print(f"\nValidation Dice and HD95 on {num_val} held-out synthetic case{'s' * (num_val != 1)} (best model):")
    print(_table(dice, hd95))
    print(f"\nSegmented {len(done)} new synthetic scan{'s' * (len(done) != 1)} in {seconds_per_case:.2f} s per case "
          "(read, preprocess, infer, write, QC picture).")
    print("\nWhere to look:")
    print(f"  QC pictures:    {_show(segmentations)}/*_qc.png (sagittal, coronal and axial slices through the "
          "labels; anterior red, posterior green)")
    print(f"  segmentations:  {_show(segmentations)}/ (<case>_seg.nii.gz; report.json, report.csv)")
    print(f"  metrics:        {_show(work / 'eval')}/ (metrics.csv; per case: val_mean_dice_raw.csv, "
          "val_hd95_mm_raw.csv)")
    print(f"  model:          {_show(work / 'models' / 'model.pt')}")
    print(f"  TensorBoard:    tensorboard --logdir {_show(work / 'eval')}")
    return {"dice": dice, "hd95": hd95, "seconds_per_case": seconds_per_case, "epochs": len(epoch_times),
            "epoch_seconds": epoch_s, "qc": qc, "seconds": total, "work": str(work)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="unet_segmentation", help="bundle under bundles/ to run")
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data" / "demo"), help="where the data goes")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "runs" / "demo"), help="where the outputs go")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the bundle's demo recipe, "
                             + ", ".join(f"{b.split('_')[0]} {e}" for b, (e, _, _) in DEMO_OVERRIDES.items()) + ")")
    parser.add_argument("--num_cases", type=int, default=16, help="synthetic training cases (20%% validate)")
    parser.add_argument("--num_test", type=int, default=4, help="new synthetic scans to segment, with QC pictures")
    args = parser.parse_args(argv)
    return run_demo(args.bundle, args.data_dir, args.work_dir, args.epochs, args.num_cases, args.num_test)


if __name__ == "__main__":
    main()
