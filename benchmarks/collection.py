# SPDX-License-Identifier: Apache-2.0
"""One benchmark for the whole collection: every bundle and the MONAI built-ins, under the same protocol.

For each entry, on CPU:

1. train with the bundle's default configuration for a fixed budget: wall-clock minutes (``--minutes``, 20 by
   default; the clock starts when the trainer starts, after the data are cached) for equal-time rows, and/or a
   number of epochs (``--epochs``) for equal-epoch (converged) rows; validating every epoch as the bundle does and
   keeping the checkpoint with the best validation Dice;
2. score that checkpoint with the bundle's evaluate config on a fixed validation split (the bundle's own: 20 % of
   the cases, drawn with ``split_seed`` 0, whatever the training seed) or, with ``--eval_dataset_dir``, on every
   labelled case of another MSD-layout folder (``--thick_eval_dataset_dir`` for the thick-slice entries):
   Dice and HD95 (mm) per class, in each scan's original grid;
3. time inference per case with the bundle's inference config (the batch runner, one process, no loader
   workers: read, preprocess, sliding window, invert, write) over the same scans.

Entries: every bundle under ``bundles/`` (found, not listed: its entry is named by the first word of its name,
with ``_thick`` when its default task is the thick-slice copy), and the MONAI networks a user would pick instead
(DynUNet, SegResNet, UNETR, SwinUNETR; MONAI's UNet is the ``unet`` bundle itself), trained with the UNet
bundle's configuration (data, transforms, loss, optimiser, patch) with only the network swapped. The 2.5D
comparison trains the CSAM bundle and the UNet bundle on the thick-slice copy (1x1x3 mm) and scores both on its
validation split.

``--seeds 0,1,2`` trains each entry of ``--seed_entries`` (all entries without it) once per training seed, a
separate run each; the validation split stays the same. The table gives mean ± standard deviation and the range
over the seeds; the CSV keeps one row per run.

Results go to ``--out`` (``docs/benchmark`` by default): ``results.csv`` (one row per run), ``results.md`` (one
section per budget, with the machine and the command), and three plots (``dice_vs_training_time.png``,
``dice_vs_inference_time.png``, ``params_vs_dice.png``). Each run's outputs stay in
``--work_dir/<entry>/<budget>/seed<seed>``; a run whose ``result.json`` exists for the same budget, seed, data and
overrides is not run again (``--force`` reruns), so an interrupted benchmark resumes where it stopped.

    python -m benchmarks.collection                      # everything, 20 minutes per entry (about 4 h on 2 cores)
    python -m benchmarks.collection --minutes 8 --only unet,dnet,swinunetr
    python -m benchmarks.collection --minutes 30 --epochs 50 --seeds 0,1,2 --seed_entries unet,ukan
    python -m benchmarks.collection --eval_dataset_dir /data/MyHippocampusMSD --work_dir /tmp/other

Arguments after ``--`` are passed to every run as config overrides (e.g. ``-- --num_workers 4``).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, median, stdev

from benchmarks.train_budget import config_list, epoch_log, per_class, run_bundle
from bundletools.bundles import default_task, short_names

REPO = Path(__file__).resolve().parents[1]

ISO, THICK = "Task04_Hippocampus", "Task04_Hippocampus_thick3mm"
NNUNET_DIR = REPO / "benchmarks" / "nnunet"  # the nnU-Net side, run in nnU-Net's venv; also its nnUNet_extTrainer
NNUNET_VENV_PYTHON = REPO / ".venv-nnunet" / "bin" / "python"  # bash scripts/setup_nnunet.sh
NNUNET_DATASET_ID = 4  # each entry has its own nnU-Net folders, so the id only names the dataset there

# MONAI built-ins, configured as their MONAI tutorials/docs configure them for a 3D patch of 48^3 at 1 mm.
DYNUNET = {"_target_": "DynUNet", "spatial_dims": 3, "in_channels": "@in_channels", "out_channels": "@num_classes",
           "kernel_size": [3, 3, 3, 3, 3], "strides": [1, 2, 2, 2, 2], "upsample_kernel_size": [2, 2, 2, 2],
           "norm_name": "instance", "res_block": True}
SEGRESNET = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": "@in_channels",
             "out_channels": "@num_classes", "init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
UNETR = {"_target_": "UNETR", "spatial_dims": 3, "in_channels": "@in_channels", "out_channels": "@num_classes",
         "img_size": "@roi_size"}
SWINUNETR = {"_target_": "SwinUNETR", "spatial_dims": 3, "in_channels": "@in_channels",
             "out_channels": "@num_classes"}


@dataclass(frozen=True)
class Entry:
    key: str
    name: str
    bundle: str  # the bundle trained; for nnU-Net, the bundle whose split (training and scored cases) it takes
    data: str  # ISO or THICK
    overrides: dict = field(default_factory=dict)  # config entries replaced (built-ins: the network)
    runner: str = "bundle"  # "bundle", or "nnunet": nnU-Net v2 in its own venv (benchmarks/nnunet/nnunet_entry.py)


# the names the tables and plots have always shown; another bundle shows under its folder's name
BUNDLE_NAMES = {"unet": "UNet (bundle)", "transunet": "TransUNet", "dnet": "D-Net", "ukan": "U-KAN",
                "csam_thick": "CSAM U-Net (2.5D), thick"}


def bundle_entries(data: str) -> list[Entry]:
    """Every bundle whose default task is ``data`` (ISO, or THICK for the rest), with its defaults."""
    entries = []
    for bundle, short in short_names().items():
        task = THICK if default_task(bundle) == THICK else ISO
        if task == data:
            key = short if task == ISO else f"{short}_thick"
            entries.append(Entry(key, BUNDLE_NAMES.get(key, bundle), bundle, task))
    return entries


ENTRIES = [
    *bundle_entries(ISO),
    Entry("dynunet", "DynUNet (MONAI)", "unet_segmentation", ISO, {"network_def": DYNUNET}),
    Entry("segresnet", "SegResNet (MONAI)", "unet_segmentation", ISO, {"network_def": SEGRESNET}),
    Entry("unetr", "UNETR (MONAI)", "unet_segmentation", ISO, {"network_def": UNETR}),
    # SwinUNETR needs patches divisible by 32: 64^3, the smallest that holds a whole hippocampus crop
    Entry("swinunetr", "SwinUNETR (MONAI)", "unet_segmentation", ISO,
          {"network_def": SWINUNETR, "roi_size": [64, 64, 64]}),
    *bundle_entries(THICK),
    Entry("unet_thick", "UNet (bundle), thick", "unet_segmentation", THICK),
    Entry("nnunet", "nnU-Net v2 (3d_fullres)", "unet_segmentation", ISO, runner="nnunet"),
    Entry("nnunet_thick", "nnU-Net v2 (3d_fullres), thick", "unet_segmentation", THICK, runner="nnunet"),
]

THICK_KEYS = {e.key for e in ENTRIES if e.data == THICK}  # drawn dashed / square in the plots

RUN_FIELDS = ["key", "network", "bundle", "training_data", "scored_on", "cases_scored", "budget", "budget_min",
              "budget_epochs", "seed", "device", "params", "epochs", "train_s", "s_per_epoch"]
TIME_FIELDS = ["infer_s_per_case", "infer_s_per_case_max", "status"]


@dataclass(frozen=True)
class Budget:
    """A training budget: wall-clock minutes (equal-time rows) or epochs (equal-epoch rows)."""

    kind: str  # "minutes" or "epochs"
    value: float

    @property
    def label(self) -> str:
        """As the tables show it: ``7 min``, ``50 epochs``."""
        if self.kind == "minutes":
            return f"{self.value:g} min"
        return f"{self.value:g} epoch{'' if self.value == 1 else 's'}"

    @property
    def folder(self) -> str:
        """The runs' folder under ``--work_dir/<entry>``."""
        return f"{self.value:g}min" if self.kind == "minutes" else f"{self.value:g}epochs"

    def trainer_args(self) -> list[str]:
        if self.kind == "minutes":  # as many epochs as the clock allows
            return ["--epochs", "100000", "--time_budget_s", str(self.value * 60)]
        return ["--epochs", str(int(self.value))]


def _override_pairs(overrides: list[str]) -> dict:
    """``["--key", "value", "--other=value"]`` (the extra command-line overrides) as ``{id: value}``."""
    pairs, i = {}, 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--"):
            raise ValueError(f"config override {item!r}: expected --key value")
        if "=" in item:
            key, value = item[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ValueError(f"config override {item}: no value")
            key, value = item[2:], overrides[i + 1]
            i += 2
        try:
            pairs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pairs[key] = value
    return pairs


def bundle_config(entry: Entry, data_dir: str, overrides: list[str]):
    """The entry's train config as the runs see it (entry and command-line overrides applied), data checks off."""
    from monai.bundle import ConfigParser

    config = json.loads((REPO / "bundles" / entry.bundle / "configs" / "train.json").read_text(encoding="utf-8"))
    parser = ConfigParser(config | entry.overrides)
    for key, value in (_override_pairs(overrides) | {"dataset_dir": data_dir, "check_data": False}).items():
        parser[key] = value
    return parser


def count_parameters(parser) -> int:
    network = parser.get_parsed_content("network_def")  # resolves only what the network refers to
    return sum(p.numel() for p in network.parameters())


def training_device(config) -> str:
    """What a run with this config trains on, as results.csv records it: ``cpu`` or the GPU's name."""
    import torch

    device = torch.device(config.get_parsed_content("device"))
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def run_entry(entry: Entry, budget: Budget, seed: int, args: argparse.Namespace, work: Path) -> dict:
    """Train one entry under one budget with one training seed in ``work``, score it and time its inference."""
    inputs = _inputs(entry, budget, seed, args)
    data_dir, eval_dir = inputs["dataset_dir"], inputs["eval_dataset_dir"]
    overrides = [*args.overrides, "--seed", str(seed)]
    config = bundle_config(entry, data_dir, overrides)
    if work.exists():
        shutil.rmtree(work)  # a half-finished run starts again (the bundles would otherwise resume training)
    work.mkdir(parents=True)

    # the cases scored: the bundle's validation split, or every labelled case of the entry's eval folder
    from bundletools import scoring_split

    if eval_dir:
        scored = scoring_split(eval_dir, config.get_parsed_content("num_classes"),
                               config.get_parsed_content("in_channels"))
    else:  # exactly the split the training run validates on (same expression, same overrides)
        scored = {"training": [], "validation": config.get_parsed_content("datalist")["validation"]}
    result = {"key": entry.key, "network": entry.name, "bundle": entry.bundle, "training_data": Path(data_dir).name,
              "inputs": inputs,
              "scored_on": (Path(eval_dir).name + " (all cases)") if eval_dir
              else Path(data_dir).name + " (validation split)", "cases_scored": len(scored["validation"]),
              "budget": budget.label, "budget_min": budget.value if budget.kind == "minutes" else None,
              "budget_epochs": budget.value if budget.kind == "epochs" else None, "seed": seed,
              "device": training_device(config), "overrides": entry.overrides}
    if entry.runner == "nnunet":
        return run_nnunet(entry, budget, seed, args, work, config, scored, result)

    configs = REPO / "bundles" / entry.bundle / "configs"
    override = work / "override.json"
    override.write_text(json.dumps(entry.overrides, indent=1), encoding="utf-8")
    common = ["--bundle_root", str(work), "--dataset_dir", data_dir, *overrides]
    scoring = work / "scoring.json"
    scoring.write_text(json.dumps({"datalist": scored}, indent=1), encoding="utf-8")
    to_segment = work / "to_segment.json"
    to_segment.write_text(json.dumps({"datalist": [{"image": d["image"]} for d in scored["validation"]]}, indent=1),
                          encoding="utf-8")
    result["params"] = count_parameters(config)

    t0 = time.perf_counter()
    log = run_bundle(["run", "training", "--config_file", config_list(configs / "train.json", override),
                      *budget.trainer_args(), *common], work / "train.log")
    result["train_s"] = round(time.perf_counter() - t0, 1)
    epoch_s, val_dice = epoch_log(log)
    result["epochs"] = len(epoch_s)
    result["s_per_epoch"] = round(sum(epoch_s) / len(epoch_s), 1) if epoch_s else None
    elapsed = [round(sum(epoch_s[: i + 1]), 1) for i in range(len(epoch_s))]
    result["curve"] = [{"epoch": i + 1, "elapsed_s": t, "val_dice": d} for i, (t, d) in
                       enumerate(zip(elapsed, val_dice))]
    if not (work / "models" / "model.pt").is_file():
        result["status"] = "no epoch finished within the budget"
        return result

    run_bundle(["run", "--config_file", config_list(configs / "train.json", configs / "evaluate.json", override,
                                                    scoring), *common], work / "evaluate.log")
    dice = per_class(work / "eval" / "val_mean_dice_summary.csv")
    hd95 = per_class(work / "eval" / "val_hd95_mm_summary.csv")
    result["dice"], result["hd95_mm"] = dice, hd95
    result["dice_mean"], result["hd95_mean_mm"] = dice.get("mean"), hd95.get("mean")

    run_bundle(["run", "--config_file", config_list(configs / "inference.json", override, to_segment),
                *common, "--output_dir", str(work / "segmentations"), "--num_workers", "0"], work / "inference.log")
    report = json.loads((work / "segmentations" / "report.json").read_text(encoding="utf-8"))
    seconds = [c["seconds"] for c in report["cases"] if c["status"] == "succeeded"]
    if len(seconds) != len(scored["validation"]):
        raise RuntimeError(f"inference segmented {len(seconds)} of {len(scored['validation'])} cases; "
                           f"see {work / 'segmentations' / 'report.json'}")
    result["infer_s_per_case"] = round(median(seconds), 3)
    result["infer_s_per_case_max"] = round(max(seconds), 3)
    result["status"] = "ok"
    return result


def run_nnunet(entry: Entry, budget: Budget, seed: int, args: argparse.Namespace, work: Path, config,
               scored: dict, result: dict) -> dict:
    """nnU-Net v2 on the bundle's training cases under the same budget, in its own venv (``--nnunet_python``),
    scored on the same cases with the same metrics (``benchmarks/scoring.py``).

    Its steps are nnU-Net's own (``benchmarks/nnunet/nnunet_entry.py``): MSD conversion, fingerprint, plan and
    ``3d_fullres`` preprocessing of the training cases (once per entry and case list, before the clock starts, as
    the bundles read and cache their data before theirs), its trainer stopped at the budget (or its poly schedule
    fitted to ``--epochs``, each epoch being nnU-Net's 250 iterations), its predictor on the scored images.
    """
    from benchmarks.scoring import score_segmentations

    data = work.parents[1] / "nnunet_data"  # shared by the entry's budgets and seeds
    name = re.sub(r"[^A-Za-z0-9]", "", result["training_data"])  # nnU-Net's MSD converter splits names at "_"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "nnUNet_raw": str(data / "raw"),
           "nnUNet_preprocessed": str(data / "preprocessed"), "nnUNet_results": str(work / "results"),
           "nnUNet_extTrainer": str(NNUNET_DIR)}
    cases = work / "cases.json"
    cases.write_text(json.dumps({"training": config.get_parsed_content("datalist")["training"],
                                 "validation": scored["validation"]}, indent=1), encoding="utf-8")
    device = "cuda" if result["device"] != "cpu" else "cpu"
    budget_args = ["--budget_s", str(budget.value * 60)] if budget.kind == "minutes" \
        else ["--epochs", str(int(budget.value))]
    if args.nnunet_iterations_per_epoch:
        budget_args += ["--iterations_per_epoch", *map(str, args.nnunet_iterations_per_epoch)]

    def step(*step_args: str) -> None:
        log = work / f"nnunet_{step_args[0]}.log"
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.run([args.nnunet_python, str(NNUNET_DIR / "nnunet_entry.py"), *step_args],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
        if proc.returncode != 0:
            sys.exit(f"nnU-Net {step_args[0]} failed (exit {proc.returncode}); log: {log}\n"
                     + log.read_text(encoding="utf-8", errors="replace")[-4000:])

    step("prepare", "--cases", str(cases), "--msd_dir", result["inputs"]["dataset_dir"], "--dataset_id",
         str(NNUNET_DATASET_ID), "--name", name)
    t0 = time.perf_counter()
    step("train", "--dataset_id", str(NNUNET_DATASET_ID), "--device", device, "--seed", str(seed), *budget_args,
         "--result", str(work / "nnunet_train.json"))
    result["train_s"] = round(time.perf_counter() - t0, 1)
    trained = json.loads((work / "nnunet_train.json").read_text(encoding="utf-8"))
    result.update(bundle=f"nnunetv2 {trained['nnunet_version']}", params=trained["params"],
                  epochs=trained["epochs"], nnunet_plan={k: trained[k] for k in ("patch_size", "batch_size")})
    result["s_per_epoch"] = round(mean(trained["epoch_s"]), 1) if trained["epoch_s"] else None
    # nnU-Net validates on patches of its own training cases (fold "all"), so its curve has times but no Dice
    result["curve"] = [{"epoch": i + 1, "elapsed_s": t, "val_dice": None} for i, t in enumerate(trained["elapsed_s"])]
    if not trained["checkpoint"]:
        result["status"] = "no epoch finished within the budget"
        return result

    step("predict", "--dataset_id", str(NNUNET_DATASET_ID), "--device", device, "--cases", str(cases),
         "--out_dir", str(work / "segmentations"), "--result", str(work / "nnunet_predict.json"))
    seconds = json.loads((work / "nnunet_predict.json").read_text(encoding="utf-8"))["seconds"]
    pairs = [(work / "segmentations" / f"{case_name(c['image'])}_seg.nii.gz", c["label"]) for c in scored["validation"]]
    label_names = config.get_parsed_content("label_names")
    dice, hd95 = score_segmentations(pairs, work / "eval", len(label_names), label_names[1:])
    result["dice"], result["hd95_mm"] = dice, hd95
    result["dice_mean"], result["hd95_mean_mm"] = dice.get("mean"), hd95.get("mean")
    result["infer_s_per_case"] = round(median(seconds.values()), 3)
    result["infer_s_per_case_max"] = round(max(seconds.values()), 3)
    result["status"] = "ok"
    return result


def case_name(image: str) -> str:
    """A case's name as nnU-Net's runner writes it: the image file name without ``.nii.gz``/``.nii``."""
    name = Path(image).name
    return name.removesuffix(".gz").removesuffix(".nii")


def _data_dir(entry: Entry, args: argparse.Namespace) -> str:
    return str(args.thick_dataset_dir if entry.data == THICK else args.dataset_dir)


def _eval_dir(entry: Entry, args: argparse.Namespace) -> str | None:
    """The folder the entry is scored on (all its cases), or None for the validation split."""
    if entry.data == THICK and args.thick_eval_dataset_dir:
        return args.thick_eval_dataset_dir
    return args.eval_dataset_dir


def _inputs(entry: Entry, budget: Budget, seed: int, args: argparse.Namespace) -> dict:
    """What a kept result must have been run with: budget, training seed, data, scored folder, overrides."""
    inputs = {"budget": {budget.kind: budget.value}, "seed": seed, "overrides": args.overrides,
              "eval_dataset_dir": _eval_dir(entry, args), "dataset_dir": _data_dir(entry, args)}
    if entry.runner == "nnunet" and args.nnunet_iterations_per_epoch:
        inputs["nnunet_iterations_per_epoch"] = args.nnunet_iterations_per_epoch
    return inputs


def entry_seeds(entry: Entry, args: argparse.Namespace) -> list[int]:
    """The training seeds of an entry: ``--seeds`` for the entries of ``--seed_entries``, else the bundle's seed
    (its config's ``seed``, after the overrides)."""
    if args.seeds and entry.key in args.seed_keys:
        return args.seeds
    return [int(bundle_config(entry, _data_dir(entry, args), args.overrides).get_parsed_content("seed"))]


def check_split_fixed(entry: Entry, seeds: list[int], args: argparse.Namespace) -> None:
    """Exit when the entry's validation split moves with the training seed: its seeds would be validated (and,
    without an eval folder, scored) on different cases."""
    splits = [bundle_config(entry, _data_dir(entry, args), [*args.overrides, "--seed", str(s)])
              .get_parsed_content("datalist")["validation"] for s in seeds]
    if any(split != splits[0] for split in splits[1:]):
        sys.exit(f"--seeds: {entry.key} ({entry.bundle}) validates on other cases with each training seed; its "
                 "train config must draw the split with split_seed, not seed")


def machine() -> dict:
    import monai
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
                      if line.startswith("MemTotal"))
        memory = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        memory = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory": memory,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "os": platform.platform()}


def _fmt(value, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _spread(values: list, digits: int, full: bool = False) -> str:
    """One value as is; several (one per seed) as ``mean ± std`` (sample standard deviation), with the range in
    brackets when ``full``; ``–`` without any."""
    values = [v for v in values if v is not None]
    if len(values) <= 1:
        return _fmt(values[0] if values else None, digits)
    text = f"{mean(values):,.{digits}f} ± {stdev(values):,.{digits}f}"
    return text + f" ({min(values):,.{digits}f}–{max(values):,.{digits}f})" if full else text


def _mean(values: list, digits: int) -> str:
    """The mean over seeds, for the times (their spread is the machine's, not the network's)."""
    values = [v for v in values if v is not None]
    return _fmt(mean(values) if values else None, digits)


def _groups(results: list[dict]) -> list[tuple[str, list[list[dict]]]]:
    """The runs by budget (in run order), then by entry: one table row per entry and budget, its seeds together."""
    by_budget: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        by_budget.setdefault(r["budget"], {}).setdefault(r["key"], []).append(r)
    return [(budget, list(rows.values())) for budget, rows in by_budget.items()]


def _train_min(r: dict) -> float | None:
    """Minutes of training (epochs with their validation, as the budget counts them)."""
    return r["curve"][-1]["elapsed_s"] / 60 if r.get("curve") else None


def _run_key(row: dict) -> tuple[str, str, str, str]:
    """What makes a run: entry, budget, training seed and device."""
    return row["key"], row["budget"], str(row["seed"]), row["device"]


def write_csv(results: list[dict], path: Path, classes: list[str]) -> None:
    """``results.csv`` keeps one row per run, of this invocation and of earlier ones: a run done again (same
    entry, budget, seed and device) replaces its row where it stood, a new one is added at the end, and the rows
    of runs not done this time (other entries, budgets, seeds, another machine's device) stay."""
    fields = [*RUN_FIELDS, "dice_mean", *[f"dice_{c}" for c in classes], "hd95_mean_mm",
              *[f"hd95_{c}_mm" for c in classes], *TIME_FIELDS]
    rows: dict[tuple, dict] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields += [c for c in reader.fieldnames or [] if c not in fields]
            rows = {_run_key(row): row for row in reader}
    for r in results:
        row = dict(r) | {f"dice_{c}": r.get("dice", {}).get(c) for c in classes} \
            | {f"hd95_{c}_mm": r.get("hd95_mm", {}).get(c) for c in classes}
        rows[_run_key(row)] = row
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows.values())


def write_tables(results: list[dict], out: Path, info: dict, command: str) -> None:
    classes = [c for r in results for c in r.get("dice", {}) if c != "mean"]
    classes = list(dict.fromkeys(classes))
    write_csv(results, out / "results.csv", classes)

    head = ["Network", "Trained on", "Budget", "Seeds", "Params", "Epochs", "Training min", "s / epoch",
            *[f"Dice {c}" for c in classes], "Dice mean", *[f"HD95 {c} (mm)" for c in classes], "HD95 mean (mm)",
            "Inference s / case (median)"]
    groups = _groups(results)
    sections = []
    for budget, rows in groups:
        kind = "minutes" if rows[0][0]["budget_min"] is not None else "epochs"
        lines = [f"## Equal time: {budget} of training per network" if kind == "minutes"
                 else f"## Equal epochs: {budget} per network", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes = []
        for runs in rows:
            r = runs[0]
            epochs = sorted({x["epochs"] for x in runs})
            ok = [x for x in runs if x["status"] == "ok"]
            cells = [r["network"], r["training_data"], budget, ", ".join(str(x["seed"]) for x in runs),
                     f"{r['params'] / 1e6:.2f} M", f"{epochs[0]}" + (f"–{epochs[-1]}" if len(epochs) > 1 else ""),
                     _mean([_train_min(x) for x in runs], 1), _mean([x["s_per_epoch"] for x in runs], 1),
                     *[_spread([x["dice"].get(c) for x in ok], 3) for c in classes],
                     _spread([x["dice_mean"] for x in ok], 3, full=True),
                     *[_spread([x["hd95_mm"].get(c) for x in ok], 2) for c in classes],
                     _spread([x["hd95_mean_mm"] for x in ok], 2, full=True),
                     _mean([x["infer_s_per_case"] for x in ok], 2)]
            lines.append("| " + " | ".join(cells) + " |")
            notes += [f"- {x['network']}" + (f", seed {x['seed']}" if len(runs) > 1 else "") + f": {x['status']}"
                      for x in runs if x["status"] != "ok"]
        sections += [*lines, "", *notes, *([""] if notes else [])]

    scored: dict[str, list[str]] = {}
    for r in results:
        scored.setdefault(f"{r['scored_on']}, {r['cases_scored']} cases", []).append(r["network"])
    scored_text = "; ".join(s + ("" if len(scored) == 1 else f" ({', '.join(dict.fromkeys(names))})")
                            for s, names in scored.items())
    minutes = [b for b, rows in groups if rows[0][0]["budget_min"] is not None]
    epochs = [b for b, rows in groups if rows[0][0]["budget_epochs"] is not None]
    budgets = ([f"equal time ({', '.join(minutes)} of wall-clock training per network, validation included, on "
                f"{'the GPU' if info['gpu'] != 'none' else 'CPU'})"] if minutes else []) \
        + ([f"equal epochs ({', '.join(epochs)} per network)"] if epochs else [])
    seeded = any(len(runs) > 1 for _, rows in groups for runs in rows)
    text = [
        "# Collection benchmark results",
        "",
        f"Written by `benchmarks/collection.py` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        f"Training budget: {' and '.join(budgets)}; one section per budget.",
        f"Scored on: {scored_text}. Dice and HD95 of the best checkpoint in each scan's original grid, mean over "
        "cases; inference time per case from reading the scan to the written mask.",
        *(["Rows with several seeds (one training run each, on the same validation split) give mean ± standard "
           "deviation over the seeds, and the range in brackets for the means; results.csv has one row per run."]
          if seeded else []),
        "",
        *sections,
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), {info['memory']} "
        f"RAM, GPU: {info['gpu']}; Python {info['python']}, torch {info['torch']}, MONAI {info['monai']}; "
        f"{info['os']}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    (out / "results.md").write_text("\n".join(text), encoding="utf-8")


def write_plots(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = [(budget, runs) for budget, rows in _groups(results) for runs in rows]
    several = len({budget for budget, _ in groups}) > 1
    colours = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"].colors
    budgets = ", ".join(dict.fromkeys(budget for budget, _ in groups))
    paths = []

    def name(budget: str, runs: list[dict]) -> str:
        return runs[0]["network"] + (f", {budget}" if several else "")

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    floor = 0.5  # the curves differ above it; an epoch scoring lower is drawn on the floor as a triangle
    # nnU-Net's curve has no Dice: it validates on patches of its own training cases
    curves = {id(r) for r in results if r["curve"] and all(p["val_dice"] is not None for p in r["curve"])}
    top = max([0.9, *[p["val_dice"] + 0.02 for r in results if id(r) in curves for p in r["curve"]]])
    for i, (budget, runs) in enumerate(groups):
        for j, r in enumerate(runs):  # each seed, in the entry's colour, named once
            if id(r) in curves:
                minutes = [p["elapsed_s"] / 60 for p in r["curve"]]
                dice = [p["val_dice"] for p in r["curve"]]
                ax.plot(minutes, [max(d, floor) for d in dice], marker="o" if r["budget_min"] is not None else "s",
                        markersize=3, label=None if j else name(budget, runs), color=colours[i % len(colours)],
                        linestyle="--" if r["key"] in THICK_KEYS else "-")
                low = [(m, floor) for m, d in zip(minutes, dice) if d < floor]
                if low:
                    ax.plot(*zip(*low), marker="v", markersize=7, linestyle="none", color=colours[i % len(colours)])
    for minutes in {r["budget_min"] for r in results if r["budget_min"] is not None}:
        ax.axvline(minutes, color="grey", linewidth=0.8)
    ax.set(xlabel="training time (min, wall clock, incl. validation)",
           ylabel="validation mean Dice (bundle's training grid)",
           title=f"Dice against training time ({budgets}; \u25bc: below {floor})", ylim=(floor - 0.01, min(top, 1.0)))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    paths.append(_save(fig, out / "dice_vs_training_time.png"))

    for file, x_key, xlabel, log_x in [  # log x: the points span one to two orders of magnitude
        ("dice_vs_inference_time.png", "infer_s_per_case", "inference time per case (s, median)", True),
        ("params_vs_dice.png", "params", "parameters", True),
    ]:
        fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
        xs = []
        for i, (budget, runs) in enumerate(groups):
            ok = [r for r in runs if r.get("dice_mean") is not None]
            if not ok:
                continue
            x, y = mean(r[x_key] for r in ok), mean(r["dice_mean"] for r in ok)
            xs.append(x)
            ax.errorbar(x, y, yerr=stdev(r["dice_mean"] for r in ok) if len(ok) > 1 else None, capsize=3,
                        marker="s" if runs[0]["key"] in THICK_KEYS else "o", color=colours[i % len(colours)],
                        fillstyle="full" if runs[0]["budget_min"] is not None else "none")
            ax.annotate(name(budget, runs), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if log_x:
            ax.set_xscale("log")
        if x_key == "infer_s_per_case" and xs:  # plain seconds on the log axis
            lo, hi = min(xs), max(xs)
            ax.set_xticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if lo / 2 <= t <= hi * 2])
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel=xlabel, ylabel="mean Dice (best checkpoint, original grid; bars: std over seeds)",
               title=f"{'Parameters' if x_key == 'params' else 'Inference time'} and Dice ({budgets})")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / file))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock training budget per network, for equal-time rows (20 when neither --minutes "
                             "nor --epochs is given)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training budget in epochs per network, for equal-epoch rows (with --minutes: both)")
    parser.add_argument("--only", default=None, help=f"comma-separated entries ({', '.join(e.key for e in ENTRIES)})")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated training seeds (e.g. 0,1,2): each entry of --seed_entries trains once "
                             "per seed, on the same validation split; the others train once, with the bundle's seed")
    parser.add_argument("--seed_entries", default=None,
                        help="comma-separated entries to train with every seed of --seeds (default: all entries run)")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / ISO),
                        help="MSD folder to train the 3D entries on")
    parser.add_argument("--thick_dataset_dir", default=str(REPO.parent / "shared" / "data" / THICK),
                        help="MSD folder with thick slices for the 2.5D comparison")
    parser.add_argument("--eval_dataset_dir", default=None,
                        help="score on every labelled case of this MSD folder instead of the validation split (the "
                             "thick-slice entries too, unless --thick_eval_dataset_dir is given)")
    parser.add_argument("--thick_eval_dataset_dir", default=None,
                        help="score the thick-slice entries (csam_thick, unet_thick) on every labelled case of this "
                             "MSD folder instead of their validation split")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "collection_benchmark"),
                        help="where each entry trains (kept; finished runs are not rerun)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark"), help="folder for the tables and plots")
    parser.add_argument("--force", action="store_true", help="rerun entries that already have a result")
    parser.add_argument("--nnunet_python", default=str(NNUNET_VENV_PYTHON),
                        help="the python of nnU-Net's venv, which runs the nnU-Net entries' steps (default: the one "
                             "`bash scripts/setup_nnunet.sh` makes)")
    parser.add_argument("--nnunet_iterations_per_epoch", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                        help="shorter nnU-Net epochs than its 250 training and 50 validation iterations, for smoke "
                             "tests on tiny budgets; the benchmark's rows keep nnU-Net's")
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    keys = [e.key for e in ENTRIES]
    args.entries = ENTRIES if not args.only else [ENTRIES[keys.index(k)]
                                                  for k in _checked(args.only, keys, parser, "--only")]
    if args.minutes is None and args.epochs is None:
        args.minutes = 20.0
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.epochs is not None and args.epochs <= 0:
        parser.error("--epochs must be positive")
    args.budgets = ([Budget("minutes", args.minutes)] if args.minutes is not None else []) \
        + ([Budget("epochs", args.epochs)] if args.epochs is not None else [])
    try:
        pairs = _override_pairs(args.overrides)
    except ValueError as e:
        parser.error(str(e))
    budget_keys = [k for k in ("epochs", "time_budget_s") if k in pairs]
    if budget_keys:
        parser.error(f"--{budget_keys[0]} after --: the benchmark sets the budget; use --minutes or --epochs")
    args.seeds, args.seed_keys = _seeds(args.seeds, parser), set()
    if args.seed_entries is not None and not args.seeds:
        parser.error("--seed_entries needs --seeds")
    if args.seeds:
        if "seed" in pairs:
            parser.error("--seeds sets the training seed of each run; drop --seed after --")
        run = [e.key for e in args.entries]
        args.seed_keys = set(run if args.seed_entries is None else _checked(args.seed_entries, keys, parser,
                                                                            "--seed_entries"))
        not_run = [k for k in keys if k in args.seed_keys and k not in run]
        if not_run:
            parser.error(f"--seed_entries {not_run}: not among the entries run (--only)")
    needed = {"dataset_dir": any(e.data == ISO for e in args.entries),
              "thick_dataset_dir": any(e.data == THICK for e in args.entries), "eval_dataset_dir": True,
              "thick_eval_dataset_dir": True}
    for name, used in needed.items():
        value = getattr(args, name)
        if used and value and not (Path(value) / "dataset.json").is_file():
            parser.error(f"--{name} {value}: no dataset.json there (an MSD-layout folder is needed)")
    nnunet = [e.key for e in args.entries if e.runner == "nnunet"]
    if nnunet and not os.access(args.nnunet_python, os.X_OK):
        parser.error(f"{', '.join(nnunet)}: nnU-Net's venv is missing (--nnunet_python {args.nnunet_python}); make it "
                     "with `bash scripts/setup_nnunet.sh`, or leave these entries out with --only")
    return args


def _seeds(text: str | None, parser: argparse.ArgumentParser) -> list[int]:
    if text is None:
        return []
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {text}: expected comma-separated whole numbers, e.g. 0,1,2")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {text}: expected distinct comma-separated whole numbers, e.g. 0,1,2")
    return seeds


def _checked(only: str, keys: list[str], parser: argparse.ArgumentParser, option: str) -> list[str]:
    wanted = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        parser.error(f"{option}: unknown entries {unknown}; choose from {keys}")
    if not wanted:
        parser.error(f"{option}: no entries given; choose from {keys}")
    return wanted


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    work_dir, out = Path(args.work_dir), Path(args.out)
    seeds = {entry.key: entry_seeds(entry, args) for entry in args.entries}
    for entry in args.entries:
        if len(seeds[entry.key]) > 1:
            check_split_fixed(entry, seeds[entry.key], args)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = []
    for budget in args.budgets:  # the equal-time runs, then the equal-epoch runs
        for entry in args.entries:
            for seed in seeds[entry.key]:
                run = f"{entry.key}, {budget.label}, seed {seed}"
                done = work_dir / entry.key / budget.folder / f"seed{seed}" / "result.json"
                if done.is_file() and not args.force:
                    result = json.loads(done.read_text(encoding="utf-8"))
                    # a result from before the device was recorded is run again rather than guessed
                    if result.get("inputs") == _inputs(entry, budget, seed, args) and "device" in result:
                        print(f"{run}: kept the result in {done}", flush=True)
                        results.append(result)
                        continue
                how = entry.bundle if entry.runner == "bundle" else f"nnU-Net v2 with {args.nnunet_python}"
                print(f"{run}: training {entry.name} ({how}) ...", flush=True)
                result = run_entry(entry, budget, seed, args, done.parent)
                done.write_text(json.dumps(result, indent=1), encoding="utf-8")
                print(f"{run}: {result['epochs']} epochs, Dice {_fmt(result.get('dice_mean'), 3)}, HD95 "
                      f"{_fmt(result.get('hd95_mean_mm'), 2)} mm, {_fmt(result.get('infer_s_per_case'), 2)} s per "
                      f"case ({result['status']})", flush=True)
                results.append(result)
    command = "python -m benchmarks.collection " + " ".join(argv)
    write_tables(results, out, info, command.strip())
    plots = write_plots(results, out)
    print((out / "results.md").read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in [out / "results.csv", out / "results.md", *plots]))


if __name__ == "__main__":
    main()
