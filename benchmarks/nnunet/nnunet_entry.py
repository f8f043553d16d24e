# SPDX-License-Identifier: Apache-2.0
"""nnU-Net v2 as an entry of the collection benchmark: nnU-Net's own conversion, plan, trainer and predictor.

This file runs in nnU-Net's venv (``bash scripts/setup_nnunet.sh``: ``.venv-nnunet``), not in the project's:
``benchmarks/collection.py`` calls it with that venv's python (``--nnunet_python``), one step per call, with
``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` set, and ``nnUNet_extTrainer`` pointing at this folder
so that nnU-Net's predictor finds :class:`nnUNetTrainerTimeBudget` by its name, as it finds its own trainers.

    python nnunet_entry.py prepare --cases cases.json --msd_dir DIR --dataset_id 4 --name Hippocampus
    python nnunet_entry.py train --dataset_id 4 --budget_s 1800 --device cpu --seed 0 --result train.json
    python nnunet_entry.py predict --dataset_id 4 --cases cases.json --out_dir segs --device cpu --result predict.json

- ``prepare``: an MSD-layout folder holding only the ``training`` cases of ``cases.json`` (the bundles' training
  split), converted with nnU-Net's ``convert_msd_dataset``, then nnU-Net's fingerprint (with its integrity check),
  experiment plan and ``3d_fullres`` preprocessing. The validation cases never reach nnU-Net's raw folder, so
  they take no part in its plan (spacing, patch size, intensity statistics). Done once per case list.
- ``train``: nnU-Net's ``3d_fullres`` plan and trainer, on every prepared case (fold ``all``), stopped at
  ``--budget_s`` of wall-clock time; the checkpoint kept is the last finished epoch's.
- ``predict``: nnU-Net's predictor (its defaults: tile step 0.5, Gaussian weighting, mirroring along the axes it
  trained with) on each ``validation`` image of ``cases.json``, written as ``<case>_seg.nii.gz`` in the image's own
  grid, timed per case (read, preprocess, predict, resample back, write).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

__all__ = ["BudgetUsedUp", "nnUNetTrainerTimeBudget", "main"]

CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
FOLD = "all"


class BudgetUsedUp(Exception):
    """Raised after the iteration that crosses the training's time budget."""


class nnUNetTrainerTimeBudget(nnUNetTrainer):
    """nnU-Net's trainer, its recipe unchanged, stopped at a wall-clock budget like the bundles' ``TimeBudget``.

    The clock starts when training starts (after nnU-Net has started its data augmentation workers and unpacked
    the preprocessed data, as the bundles' clock starts after their data are cached) and covers nnU-Net's own
    per-epoch validation iterations; the iteration that crosses ``time_budget_s`` ends the run and its unfinished
    epoch is dropped. ``checkpoint_final.pth``, the file nnU-Net's predictor loads, is written after every finished
    epoch, so it holds the last finished epoch's weights (nnU-Net's choice too: it predicts with its final
    checkpoint, not the best one on its validation patches).

    ``time_budget_s`` None (as when nnU-Net builds the class by name) trains as ``nnUNetTrainer`` does, except for
    that checkpoint. ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` stay nnU-Net's (250 and 50)
    unless the caller sets them (only the smoke test does).
    """

    time_budget_s: float | None = None

    def on_train_start(self) -> None:
        super().on_train_start()
        self._clock_start = time.perf_counter()

    def _stop_when_over_budget(self) -> None:
        if self.time_budget_s is not None and time.perf_counter() - self._clock_start > self.time_budget_s:
            raise BudgetUsedUp

    def train_step(self, batch: dict) -> dict:
        output = super().train_step(batch)
        self._stop_when_over_budget()
        return output

    def validation_step(self, batch: dict) -> dict:
        output = super().validation_step(batch)
        self._stop_when_over_budget()
        return output

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        # on_epoch_end advanced current_epoch, and save_checkpoint records current_epoch + 1 as the epoch to resume
        # at; nnU-Net's on_train_end steps back the same way before writing its final checkpoint
        self.current_epoch -= 1
        self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_final.pth"))
        self.current_epoch += 1

    def run_training(self) -> None:
        try:
            super().run_training()
        except BudgetUsedUp:
            # what nnU-Net's on_train_end does, except writing the unfinished epoch's weights as the final checkpoint
            for loader in (self.dataloader_train, self.dataloader_val):
                if hasattr(loader, "_finish"):
                    loader._finish()
            self.print_to_log_file(f"Time budget of {self.time_budget_s:.0f} s used up in epoch {self.current_epoch}: "
                                   "stopped; the final checkpoint is the last finished epoch's.")


def _dataset_name(dataset_id: int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    return convert_id_to_dataset_name(dataset_id)


def _case_name(image: str) -> str:
    """The image file name without ``.nii.gz``/``.nii`` (``benchmarks/collection.py`` finds the outputs by it)."""
    return Path(image).name.removesuffix(".gz").removesuffix(".nii")


def prepare(args: argparse.Namespace) -> None:
    from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    training = json.loads(Path(args.cases).read_text(encoding="utf-8"))["training"]
    cases = sorted(_case_name(c["image"]) for c in training)
    marker = Path(nnUNet_preprocessed) / f"Dataset{args.dataset_id:03d}_{args.name}" / "benchmark_cases.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == cases:
        print(f"nnU-Net data of {len(cases)} cases already prepared: {marker.parent}", flush=True)
        return
    for folder in (Path(nnUNet_raw), Path(nnUNet_preprocessed)):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    # nnU-Net's MSD converter takes a whole MSD folder named Task<NN>_<Name>: give it one with the training cases only
    msd = Path(nnUNet_raw).parent / "msd" / f"Task{args.dataset_id:02d}_{args.name}"
    shutil.rmtree(msd, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (msd / sub).mkdir(parents=True)
    for case in training:
        for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
            (msd / sub / Path(case[key]).name).symlink_to(Path(case[key]).resolve())
    spec = json.loads((Path(args.msd_dir) / "dataset.json").read_text(encoding="utf-8"))
    spec.update(numTraining=len(training), numTest=0, test=[],
                training=[{"image": f"./imagesTr/{Path(c['image']).name}", "label": f"./labelsTr/{Path(c['label']).name}"}
                          for c in training])
    (msd / "dataset.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")

    processes = args.processes or os.cpu_count() or 1
    convert_msd_dataset(str(msd), overwrite_target_id=args.dataset_id, num_processes=processes)
    extract_fingerprints([args.dataset_id], num_processes=processes, check_dataset_integrity=True)
    plan_experiments([args.dataset_id])
    preprocess([args.dataset_id], configurations=(CONFIGURATION,), num_processes=(processes,))
    marker.write_text(json.dumps(cases), encoding="utf-8")


def _device(name: str) -> torch.device:
    if name == "cpu":
        # as nnUNetv2_train and nnUNetv2_predict do on a CPU
        torch.set_num_threads(os.cpu_count() or 1)
    return torch.device(name)


def train(args: argparse.Namespace) -> None:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.run.run_training import get_trainer_from_args

    device = _device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    shutil.rmtree(Path(nnUNet_results), ignore_errors=True)  # a new training, never a continued one
    trainer = get_trainer_from_args(str(args.dataset_id), CONFIGURATION, FOLD, nnUNetTrainerTimeBudget.__name__,
                                    PLANS, device=device)
    trainer.time_budget_s = args.budget_s
    if args.epochs:  # nnU-Net's poly schedule runs over num_epochs, so this fits it to the budget
        trainer.num_epochs = args.epochs
    if args.iterations_per_epoch:
        trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = args.iterations_per_epoch
    if device.type == "cuda":  # as nnUNetv2_train does
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    trainer.run_training()
    starts = trainer.logger.get_value("epoch_start_timestamps", None)
    ends = trainer.logger.get_value("epoch_end_timestamps", None)
    finished = len(ends)
    result = {
        "epochs": finished,
        "epoch_s": [round(e - s, 2) for s, e in zip(starts, ends)],
        "elapsed_s": [round(e - starts[0], 2) for e in ends],
        "train_s": round(time.perf_counter() - start, 1),
        "params": sum(p.numel() for p in trainer.network.parameters()),
        "patch_size": list(trainer.configuration_manager.patch_size),
        "batch_size": trainer.batch_size,
        "iterations_per_epoch": [trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch],
        "checkpoint": str(Path(trainer.output_folder) / "checkpoint_final.pth") if finished else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "nnunet_version": version("nnunetv2"),
    }
    Path(args.result).write_text(json.dumps(result, indent=1), encoding="utf-8")


def predict(args: argparse.Namespace) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_results

    device = _device(args.device)
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
    model = Path(nnUNet_results) / _dataset_name(args.dataset_id) / \
        f"{nnUNetTrainerTimeBudget.__name__}__{PLANS}__{CONFIGURATION}"
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(FOLD,), checkpoint_name="checkpoint_final.pth")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for case in json.loads(Path(args.cases).read_text(encoding="utf-8"))["validation"]:
        name = _case_name(case["image"])
        start = time.perf_counter()
        predictor.predict_from_files_sequential([[case["image"]]], [str(out / f"{name}_seg")], save_probabilities=False,
                                                overwrite=True)
        seconds[name] = round(time.perf_counter() - start, 3)
    Path(args.result).write_text(json.dumps({"seconds": seconds}, indent=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("prepare", help="convert the training cases, plan and preprocess")
    step.add_argument("--cases", required=True, help="JSON with 'training' (and 'validation'): image/label paths")
    step.add_argument("--msd_dir", required=True, help="the MSD folder the cases come from (for its dataset.json)")
    step.add_argument("--dataset_id", type=int, required=True)
    step.add_argument("--name", required=True, help="dataset name, without underscores")
    step.add_argument("--processes", type=int, default=None, help="worker processes (default: one per core)")
    step = steps.add_parser("train", help="train the 3d_fullres plan within a time budget")
    step.add_argument("--dataset_id", type=int, required=True)
    budget = step.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget_s", type=float, help="wall-clock budget in seconds (nnU-Net's 1000 epochs otherwise)")
    budget.add_argument("--epochs", type=int, help="epochs of nnU-Net's iterations per epoch instead")
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    step.add_argument("--seed", type=int, default=0)
    step.add_argument("--iterations_per_epoch", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                      help="instead of nnU-Net's 250 and 50 (smoke tests only)")
    step.add_argument("--result", required=True, help="JSON file for the epochs, times and parameters")
    step = steps.add_parser("predict", help="segment the validation images with the trained model")
    step.add_argument("--dataset_id", type=int, required=True)
    step.add_argument("--cases", required=True)
    step.add_argument("--out_dir", required=True)
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    step.add_argument("--result", required=True, help="JSON file for the seconds per case")
    args = parser.parse_args(argv)
    {"prepare": prepare, "train": train, "predict": predict}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
