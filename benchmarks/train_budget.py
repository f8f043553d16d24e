# SPDX-License-Identifier: Apache-2.0
"""Train a bundle under a fixed budget, then score its best checkpoint on the validation split.

It runs the bundle exactly as a user does (`python -m monai.bundle run training ...` with ``--time_budget_s`` or
``--epochs``, then the evaluate config) and reports epochs finished, seconds per epoch, and the per-class Dice
and HD95 (mm) of the best model on the bundle's validation split (20 % of the cases, split_seed 0).
:func:`train_and_score` returns them as a :class:`BudgetRun` (``benchmarks.ablation`` trains its arms with it).

    python -m benchmarks.train_budget unet_segmentation --minutes 15
    python -m benchmarks.train_budget dnet_segmentation --minutes 15 -- --channels "[8,16,32,64,128]"

Arguments after ``--`` are passed to both commands as config overrides.
"""

from __future__ import annotations

import argparse
import ast
import csv
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


def override_pairs(overrides: Sequence[str]) -> dict:
    """``["--key", "value", "--other=value"]`` (command-line config overrides) as ``{key: value}``, each value a
    Python literal where it reads as one (``[8,16]``, ``False``, ``1e-3``), else the string."""
    pairs, i = {}, 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--"):
            raise ValueError(f"config override {item!r}: expected --key value")
        key, has_value, value = item[2:].partition("=")
        if not has_value:
            if i + 1 >= len(overrides):
                raise ValueError(f"config override {item}: no value")
            value = overrides[i + 1]
        i += 1 if has_value else 2
        try:
            pairs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pairs[key] = value
    return pairs


@dataclass
class BudgetRun:
    """What a budgeted training and its scoring gave (the best checkpoint is ``work_dir/models/model.pt``)."""

    bundle: str
    overrides: list[str]
    work_dir: Path
    train_s: float  # wall time of the training command, start-up and caching included
    epoch_s: list[float]  # per finished epoch, validation included
    val_dice: list[float]  # validation mean Dice per epoch
    dice: dict[str, float]  # per class and "mean", best checkpoint on the validation split
    hd95: dict[str, float]  # mm, likewise

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_s) / max(1, len(self.epoch_s))


def train_and_score(bundle: str, epochs: int | None = None, minutes: float = 15.0, overrides: Sequence[str] = (),
                    dataset_dir: str | None = None, work_dir: str | Path | None = None) -> BudgetRun:
    """Train ``bundle`` for ``epochs`` (or, without them, ``minutes`` of wall clock) with the config
    ``overrides`` (``["--key", "value", ...]``), then score its best checkpoint with its evaluate config."""
    configs = REPO / "bundles" / bundle / "configs"
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"budget_{bundle}_"))
    common = ["--bundle_root", str(work), *overrides]
    if dataset_dir:
        common += ["--dataset_dir", dataset_dir]
    budget = ["--epochs", str(epochs)] if epochs else ["--epochs", "1000", "--time_budget_s", str(minutes * 60)]
    start = time.perf_counter()
    log = run_bundle(["run", "training", "--config_file", str(configs / "train.json"), *budget, *common])
    train_s = time.perf_counter() - start
    epoch_s, val_dice = epoch_log(log)
    run_bundle(["run", "--config_file", config_list(configs / "train.json", configs / "evaluate.json"), *common])
    return BudgetRun(bundle, list(overrides), work, train_s, epoch_s, val_dice,
                     per_class(work / "eval" / "val_mean_dice_summary.csv"),
                     per_class(work / "eval" / "val_hd95_mm_summary.csv"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder name under bundles/")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    parser.add_argument("--epochs", type=int, default=None,
                        help="budget in epochs instead of minutes (fair on a machine shared with other work)")
    parser.add_argument("--dataset_dir", default=None, help="MSD folder (default: the bundle's default task)")
    parser.add_argument("--work_dir", default=None, help="bundle_root for the run (default: a temporary folder)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    overrides = argv[split + 1 :]  # config overrides, after --

    run = train_and_score(args.bundle, args.epochs, args.minutes, overrides, args.dataset_dir, args.work_dir)
    budget_text = f"{args.epochs} epochs" if args.epochs else f"{args.minutes:g} min"
    print(f"bundle {args.bundle}, budget {budget_text}, overrides {overrides or 'none'}")
    print(f"training wall time {run.train_s:.0f} s (incl. start-up and caching), {len(run.epoch_s)} epochs finished, "
          f"{run.seconds_per_epoch:.1f} s per epoch incl. validation")
    print(f"validation Dice per epoch: {', '.join(f'{v:.3f}' for v in run.val_dice)}")
    print("best model on the validation split: " + ", ".join(
        f"{name} Dice {run.dice[name]:.3f} HD95 {run.hd95[name]:.2f} mm" for name in run.dice))
    print(f"outputs in {run.work_dir}")


if __name__ == "__main__":
    main()
