# SPDX-License-Identifier: Apache-2.0
"""Train a bundle under a fixed wall-clock budget, then score its best checkpoint on the validation split.

It runs the bundle exactly as a user does (`python -m monai.bundle run training ...` with
``--time_budget_s``, then the evaluate config) and prints epochs finished, seconds per epoch, and the
per-class Dice and HD95 (mm) of the best model on the bundle's validation split (20 % of the cases, split_seed 0).

    python benchmarks/train_budget.py unet_segmentation --minutes 15
    python benchmarks/train_budget.py dnet_segmentation --minutes 15 -- --channels "[8,16,32,64,128]"

Arguments after ``--`` are passed to both commands as config overrides.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bundle(args: list[str], log: Path | None = None) -> str:
    """Run ``python -m monai.bundle <args>`` and return its output (also written to ``log``); exit on failure."""
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", cwd=REPO)
    text = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(text, encoding="utf-8")
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): monai.bundle {' '.join(args)}"
                 + (f"\nlog: {log}" if log else "") + f"\n{text[-4000:]}")
    return text


def config_list(*files: Path) -> str:
    """Several config files as one ``--config_file`` value (later files override earlier ones)."""
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def per_class(path: Path) -> dict[str, float]:
    """A metric summary CSV of the evaluate config as ``{class: mean over cases}`` (including ``"mean"``)."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return {row[0]: float(row[1]) for row in rows[1:]}


def epoch_log(log: str) -> tuple[list[float], list[float]]:
    """Seconds per finished epoch (validation included) and validation mean Dice per epoch, from a training log."""
    epoch_times = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in
                   re.findall(r"SupervisedTrainer - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)", log)]
    val = [float(v) for v in re.findall(r"Epoch\[\d+\] Metrics -- val_mean_dice: ([\d.]+)", log)]
    return epoch_times, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder name under bundles/")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    parser.add_argument("--epochs", type=int, default=None,
                        help="budget in epochs instead of minutes (fair on a machine shared with other work)")
    parser.add_argument("--dataset_dir", default=None, help="MSD folder (default: the bundle's default task)")
    parser.add_argument("--work_dir", default=None, help="bundle_root for the run (default: a temporary folder)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]  # config overrides, after --

    configs = REPO / "bundles" / args.bundle / "configs"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=f"budget_{args.bundle}_"))
    common = ["--bundle_root", str(work), *args.overrides]
    if args.dataset_dir:
        common += ["--dataset_dir", args.dataset_dir]
    t0 = time.perf_counter()
    budget = ["--epochs", str(args.epochs)] if args.epochs else ["--epochs", "1000", "--time_budget_s", str(args.minutes * 60)]
    log = run_bundle(["run", "training", "--config_file", str(configs / "train.json"), *budget, *common])
    train_s = time.perf_counter() - t0
    epoch_times, val = epoch_log(log)
    run_bundle(["run", "--config_file", config_list(configs / "train.json", configs / "evaluate.json"), *common])
    dice, hd95 = per_class(work / "eval" / "val_mean_dice_summary.csv"), per_class(work / "eval" / "val_hd95_mm_summary.csv")

    budget_text = f"{args.epochs} epochs" if args.epochs else f"{args.minutes:g} min"
    print(f"bundle {args.bundle}, budget {budget_text}, overrides {args.overrides or 'none'}")
    print(f"training wall time {train_s:.0f} s (incl. start-up and caching), {len(epoch_times)} epochs finished, "
          f"{sum(epoch_times) / max(1, len(epoch_times)):.1f} s per epoch incl. validation")
    print(f"validation Dice per epoch: {', '.join(f'{v:.3f}' for v in val)}")
    print("best model on the validation split: " + ", ".join(
        f"{name} Dice {dice[name]:.3f} HD95 {hd95[name]:.2f} mm" for name in dice))
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
