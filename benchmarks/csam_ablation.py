# SPDX-License-Identifier: Apache-2.0
"""CSAM ablation: the CSAM bundle trained with and without CSAM (``use_csam``) for the same number of epochs.

Both arms run ``benchmarks/train_budget.py csam_unet_segmentation --epochs N`` (training as a user runs it, then
the evaluate config on the validation split, at the data's own thick-slice resolution) and differ only in
``--use_csam``. One table follows: parameters, seconds per epoch (training incl. validation), Dice and HD95 (mm)
per class of the best checkpoint.

    python benchmarks/csam_ablation.py --epochs 4
    python benchmarks/csam_ablation.py --epochs 4 -- --max_cases 60

Arguments after ``--`` go to both arms as config overrides. Epoch budgets, not minutes, keep the comparison fair
on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import ast
import csv
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "csam_unet_segmentation"


def _parameters(use_csam: bool, overrides: list[str]) -> int:
    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / BUNDLE / "configs" / "inference.json")
    parser["use_csam"] = use_csam
    for key, value in zip(overrides[::2], overrides[1::2]):  # the overrides that change the parameter count
        if key.lstrip("-") in ("channels", "in_channels", "num_classes"):
            parser[key.lstrip("-")] = ast.literal_eval(value)
    return sum(p.numel() for p in parser.get_parsed_content("network_def").parameters())


def _summary(path: Path) -> dict[str, float]:
    with open(path) as f:
        return {row[0]: float(row[1]) for row in list(csv.reader(f))[1:]}


def _arm(use_csam: bool, epochs: int, overrides: list[str], work: Path) -> dict:
    # options before the bundle name: argparse takes the overrides after "--" only when they follow the positional
    args = [sys.executable, str(REPO / "benchmarks" / "train_budget.py"), "--epochs", str(epochs), "--work_dir",
            str(work), BUNDLE, "--", "--use_csam", str(use_csam), *overrides]
    proc = subprocess.run(args, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    print(proc.stdout, end="", flush=True)
    trained = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)
    if any("csam" in key for key in trained) != use_csam:
        sys.exit(f"{work}: the checkpoint does not match use_csam={use_csam}; the override did not take effect")
    seconds = float(re.search(r"([\d.]+) s per epoch", proc.stdout).group(1))
    return {"seconds": seconds, "dice": _summary(work / "eval" / "val_mean_dice_summary.csv"),
            "hd95": _summary(work / "eval" / "val_hd95_mm_summary.csv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, required=True, help="training epochs per arm")
    parser.add_argument("--work_dir", default=None, help="folder for both arms' outputs (default: temporary)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both arms, after --")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="csam_ablation_"))
    rows = {}
    for use_csam in (True, False):
        name = "CSAMUNet" if use_csam else "U-Net (use_csam=false)"
        rows[name] = {"params": _parameters(use_csam, args.overrides),
                      **_arm(use_csam, args.epochs, args.overrides, work / ("csam" if use_csam else "no_csam"))}

    classes = list(next(iter(rows.values()))["dice"])
    header = ["network", "params", "s/epoch"] + [f"Dice {c}" for c in classes] + [f"HD95 {c} (mm)" for c in classes]
    print(f"\nCSAM ablation, {args.epochs} epochs per arm, overrides {args.overrides or 'none'}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in rows.items():
        cells = [name, f"{row['params']:,}", f"{row['seconds']:.1f}"]
        cells += [f"{row['dice'][c]:.3f}" for c in classes] + [f"{row['hd95'][c]:.2f}" for c in classes]
        print("| " + " | ".join(cells) + " |")
    base, csam = rows["U-Net (use_csam=false)"], rows["CSAMUNet"]
    print(f"CSAM overhead: +{csam['params'] - base['params']:,} parameters "
          f"(+{100 * (csam['params'] / base['params'] - 1):.1f} %), "
          f"{100 * (csam['seconds'] / base['seconds'] - 1):+.0f} % time per epoch")


if __name__ == "__main__":
    main()
