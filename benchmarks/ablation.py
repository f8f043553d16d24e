# SPDX-License-Identifier: Apache-2.0
"""Ablations: a bundle trained in arms that differ in config keys only, for the same budget, scored the same way.

Each arm is trained and scored by ``benchmarks.train_budget.train_and_score`` (training as a user runs it, then
the evaluate config on the validation split, at the data's own resolution), which returns its figures; one table
follows: parameters, epochs, seconds per epoch (training incl. validation), the validation Dice per epoch, and
the Dice and HD95 (mm) per class of the best checkpoint, then each arm's parameters and time against the first.

    python -m benchmarks.ablation csam --epochs 4                     # the CSAM U-Net with and without CSAM
    python -m benchmarks.ablation csam --epochs 4 -- --max_cases 60
    python -m benchmarks.ablation ukan --epochs 3 -- --num_workers 2  # U-KAN: KAN against MLP, and the KAN rate

Arguments after ``--`` go to every arm as config overrides. Epoch budgets (the default), not minutes, keep the
comparison fair on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.train_budget import REPO, BudgetRun, override_pairs, train_and_score


@dataclass(frozen=True)
class Ablation:
    """A bundle and its arms: arm name -> the config keys that arm sets (the first arm is the reference)."""

    bundle: str
    arms: dict[str, dict]


ABLATIONS = {
    "csam": Ablation("csam_unet_segmentation", {
        "CSAMUNet": {"use_csam": True},
        "U-Net (use_csam=false)": {"use_csam": False},
    }),
    "ukan": Ablation("ukan_segmentation", {
        "KAN, kan_learning_rate 1e-2 (default)": {},
        "MLP (use_kan False), 1e-3": {"use_kan": False},
        "KAN, kan_learning_rate 1e-3 (control)": {"kan_learning_rate": 1e-3},
    }),
}


@dataclass
class ArmResult:
    """One arm: its name, the parameters of its network and what its training and scoring gave."""

    name: str
    parameters: int
    run: BudgetRun


def _as_override(value) -> str:
    """A config value as ``python -m monai.bundle`` reads it from its command line (Python Fire)."""
    return repr(value) if isinstance(value, str) else str(value)


def _network(bundle: str, settings: dict):
    """The bundle's ``network_def`` with ``settings`` applied (top-level keys, as on the command line)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    parser.update(settings)
    return parser.get_parsed_content("network_def")


def run_ablation(name: str, epochs: int | None = None, minutes: float = 0.0, overrides: Sequence[str] = (),
                 work_dir: str | Path | None = None) -> list[ArmResult]:
    """Train and score every arm of the ablation ``name`` with the same budget and ``overrides``."""
    import torch

    if not (epochs or minutes):
        raise ValueError("an ablation needs a budget: epochs or minutes per arm")
    ablation = ABLATIONS[name]
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"ablation_{name}_"))
    results = []
    for index, (arm, settings) in enumerate(ablation.arms.items()):
        arm_overrides = [*overrides, *(item for key, value in settings.items()
                                       for item in (f"--{key}", _as_override(value)))]
        network = _network(ablation.bundle, override_pairs(arm_overrides))
        print(f"{arm}: training in {work / f'arm{index}'} ...", flush=True)
        run = train_and_score(ablation.bundle, epochs, minutes, arm_overrides, work_dir=work / f"arm{index}")
        print(f"{arm}: {len(run.epoch_s)} epochs, {run.seconds_per_epoch:.1f} s per epoch, mean Dice "
              f"{run.dice['mean']:.3f}", flush=True)
        # the override took effect: the trained weights are those of the arm's network, key for key
        network.load_state_dict(torch.load(run.work_dir / "models" / "model.pt", map_location="cpu",
                                           weights_only=True))
        results.append(ArmResult(arm, sum(p.numel() for p in network.parameters()), run))
    return results


def print_table(name: str, results: Sequence[ArmResult], budget: str, overrides: Sequence[str]) -> None:
    classes = list(results[0].run.dice)
    header = (["arm", "params", "epochs", "s/epoch"] + [f"Dice {c}" for c in classes]
              + [f"HD95 {c} (mm)" for c in classes])
    print(f"\n{name} ablation ({ABLATIONS[name].bundle}), {budget} per arm, overrides {list(overrides) or 'none'}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for result in results:
        run = result.run
        cells = [result.name, f"{result.parameters:,}", str(len(run.epoch_s)), f"{run.seconds_per_epoch:.1f}"]
        cells += [f"{run.dice[c]:.3f}" for c in classes] + [f"{run.hd95[c]:.2f}" for c in classes]
        print("| " + " | ".join(cells) + " |")
    for result in results:
        print(f"{result.name}: validation Dice per epoch {', '.join(f'{v:.3f}' for v in result.run.val_dice)}")
    reference = results[0]
    for result in results[1:]:
        params = result.parameters - reference.parameters
        seconds = result.run.seconds_per_epoch / reference.run.seconds_per_epoch - 1
        print(f"{result.name} against {reference.name}: {params:+,} parameters "
              f"({100 * params / reference.parameters:+.1f} %), {100 * seconds:+.0f} % time per epoch")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", choices=sorted(ABLATIONS))
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per arm (default 3)")
    parser.add_argument("--minutes", type=float, default=0,
                        help="a wall-clock budget per arm instead of epochs (unfair on a shared machine)")
    parser.add_argument("--work_dir", default=None, help="folder for every arm's outputs (default: temporary)")
    args = parser.parse_args(argv[:split])
    overrides = argv[split + 1 :]  # config overrides for every arm, after --
    epochs = None if args.minutes else args.epochs
    budget = f"{args.minutes:g} min" if args.minutes else f"{args.epochs} epochs"
    print(f"## {ABLATIONS[args.ablation].bundle} trained on its default task, {budget} per arm", flush=True)
    results = run_ablation(args.ablation, epochs, args.minutes, overrides, args.work_dir)
    print_table(args.ablation, results, budget, overrides)


if __name__ == "__main__":
    main()
