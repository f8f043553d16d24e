# SPDX-License-Identifier: Apache-2.0
"""One benchmark for the whole collection: every bundle and the MONAI built-ins, under the same protocol.

For each entry, on CPU:

1. train with the bundle's default configuration for a fixed wall-clock budget (``--minutes``, 20 by default;
   the clock starts when the trainer starts, after the data are cached), validating every epoch as the bundle
   does and keeping the checkpoint with the best validation Dice;
2. score that checkpoint with the bundle's evaluate config on a fixed validation split (the bundle's own: 20 % of
   the cases, seed 0) or, with ``--eval_dataset_dir``, on every labelled case of another MSD-layout folder:
   Dice and HD95 (mm) per class, in each scan's original grid;
3. time inference per case with the bundle's inference config (the batch runner, one process, no loader
   workers: read, preprocess, sliding window, invert, write) over the same scans.

Entries: the five bundles, and the MONAI networks a user would pick instead (DynUNet, SegResNet, UNETR,
SwinUNETR; MONAI's UNet is the ``unet`` bundle itself), trained with the UNet bundle's configuration (data,
transforms, loss, optimiser, patch) with only the network swapped. The 2.5D comparison trains the CSAM bundle
and the UNet bundle on the thick-slice copy (1x1x3 mm) and scores both on its validation split.

Results go to ``--out`` (``docs/benchmark`` by default): ``results.csv``, ``results.md`` (with the machine and
the command), and three plots (``dice_vs_training_time.png``, ``dice_vs_inference_time.png``,
``params_vs_dice.png``). Each entry's outputs stay in ``--work_dir``; an entry whose ``result.json`` exists is
not run again (``--force`` reruns), so an interrupted benchmark resumes where it stopped.

    python benchmarks/collection.py                      # everything, 20 minutes per entry (about 4 h on 2 cores)
    python benchmarks/collection.py --minutes 8 --only unet,dnet,swinunetr
    python benchmarks/collection.py --eval_dataset_dir /data/MyHippocampusMSD --work_dir /tmp/other

Arguments after ``--`` are passed to every run as config overrides (e.g. ``-- --num_workers 4``).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_budget import config_list, epoch_log, per_class, run_bundle  # noqa: E402

ISO, THICK = "Task04_Hippocampus", "Task04_Hippocampus_thick3mm"

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
    bundle: str
    data: str  # ISO or THICK
    overrides: dict = field(default_factory=dict)  # config entries replaced (built-ins: the network)


ENTRIES = [
    Entry("unet", "UNet (bundle)", "unet_segmentation", ISO),
    Entry("transunet", "TransUNet", "transunet_segmentation", ISO),
    Entry("dnet", "D-Net", "dnet_segmentation", ISO),
    Entry("ukan", "U-KAN", "ukan_segmentation", ISO),
    Entry("dynunet", "DynUNet (MONAI)", "unet_segmentation", ISO, {"network_def": DYNUNET}),
    Entry("segresnet", "SegResNet (MONAI)", "unet_segmentation", ISO, {"network_def": SEGRESNET}),
    Entry("unetr", "UNETR (MONAI)", "unet_segmentation", ISO, {"network_def": UNETR}),
    # SwinUNETR needs patches divisible by 32: 64^3, the smallest that holds a whole hippocampus crop
    Entry("swinunetr", "SwinUNETR (MONAI)", "unet_segmentation", ISO,
          {"network_def": SWINUNETR, "roi_size": [64, 64, 64]}),
    Entry("csam_thick", "CSAM U-Net (2.5D), thick", "csam_unet_segmentation", THICK),
    Entry("unet_thick", "UNet (bundle), thick", "unet_segmentation", THICK),
]

RUN_FIELDS = ["key", "network", "bundle", "training_data", "scored_on", "cases_scored", "budget_min", "params",
              "epochs", "train_s", "s_per_epoch"]
TIME_FIELDS = ["infer_s_per_case", "infer_s_per_case_max", "status"]


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


def run_entry(entry: Entry, args: argparse.Namespace, work: Path) -> dict:
    configs = REPO / "bundles" / entry.bundle / "configs"
    inputs = _inputs(entry, args)
    data_dir = inputs["dataset_dir"]
    config = bundle_config(entry, data_dir, args.overrides)
    if work.exists():
        shutil.rmtree(work)  # a half-finished entry starts again (the bundles would otherwise resume training)
    work.mkdir(parents=True)
    override = work / "override.json"
    override.write_text(json.dumps(entry.overrides, indent=1), encoding="utf-8")
    common = ["--bundle_root", str(work), "--dataset_dir", data_dir, *args.overrides]

    # the cases scored: the bundle's validation split, or every labelled case of --eval_dataset_dir
    from bundletools import scoring_split

    if args.eval_dataset_dir:
        scored = scoring_split(args.eval_dataset_dir, config.get_parsed_content("num_classes"),
                               config.get_parsed_content("in_channels"))
    else:  # exactly the split the training run validates on (same expression, same overrides)
        scored = {"training": [], "validation": config.get_parsed_content("datalist")["validation"]}
    scoring = work / "scoring.json"
    scoring.write_text(json.dumps({"datalist": scored}, indent=1), encoding="utf-8")
    to_segment = work / "to_segment.json"
    to_segment.write_text(json.dumps({"datalist": [{"image": d["image"]} for d in scored["validation"]]}, indent=1),
                          encoding="utf-8")

    result = {"key": entry.key, "network": entry.name, "bundle": entry.bundle, "training_data": Path(data_dir).name,
              "inputs": inputs,
              "scored_on": (Path(args.eval_dataset_dir).name + " (all cases)") if args.eval_dataset_dir
              else Path(data_dir).name + " (validation split)", "cases_scored": len(scored["validation"]),
              "budget_min": args.minutes, "params": count_parameters(config),
              "overrides": entry.overrides}

    t0 = time.perf_counter()
    log = run_bundle(["run", "training", "--config_file", config_list(configs / "train.json", override),
                       "--epochs", "100000", "--time_budget_s", str(args.minutes * 60), *common], work / "train.log")
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


def _inputs(entry: Entry, args: argparse.Namespace) -> dict:
    """What a kept result must have been run with: budget, data, scored folder, overrides."""
    return {"minutes": args.minutes, "overrides": args.overrides, "eval_dataset_dir": args.eval_dataset_dir,
            "dataset_dir": str(args.thick_dataset_dir if entry.data == THICK else args.dataset_dir)}


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
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "os": platform.platform()}


def _fmt(value, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def write_tables(results: list[dict], out: Path, info: dict, command: str) -> None:
    classes = [c for r in results for c in r.get("dice", {}) if c != "mean"]
    classes = list(dict.fromkeys(classes))
    fields = [*RUN_FIELDS, "dice_mean", *[f"dice_{c}" for c in classes], "hd95_mean_mm",
              *[f"hd95_{c}_mm" for c in classes], *TIME_FIELDS]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            row = dict(r) | {f"dice_{c}": r.get("dice", {}).get(c) for c in classes} \
                | {f"hd95_{c}_mm": r.get("hd95_mm", {}).get(c) for c in classes}
            writer.writerow(row)

    head = ["Network", "Trained on", "Params", "Epochs in budget", "s / epoch",
            *[f"Dice {c}" for c in classes], "Dice mean", *[f"HD95 {c} (mm)" for c in classes], "HD95 mean (mm)",
            "Inference s / case (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["network"], r["training_data"], f"{r['params'] / 1e6:.2f} M", str(r["epochs"]),
                 _fmt(r["s_per_epoch"], 1), *[_fmt(r.get("dice", {}).get(c), 3) for c in classes],
                 _fmt(r.get("dice_mean"), 3), *[_fmt(r.get("hd95_mm", {}).get(c), 2) for c in classes],
                 _fmt(r.get("hd95_mean_mm"), 2), _fmt(r.get("infer_s_per_case"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['network']}: {r['status']}" for r in results if r["status"] != "ok"]
    scored = sorted({f"{r['scored_on']}, {r['cases_scored']} cases" for r in results})
    budgets = sorted({r["budget_min"] for r in results})
    text = [
        "# Collection benchmark results",
        "",
        f"Written by `benchmarks/collection.py` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        f"Training budget: {', '.join(f'{b:g}' for b in budgets)} minutes of wall-clock time per network, on "
        f"{'the GPU' if info['gpu'] != 'none' else 'CPU'}.",
        f"Scored on: {'; '.join(scored)}. Dice and HD95 of the best checkpoint in each scan's original grid, "
        "mean over cases; inference time per case from reading the scan to the written mask.",
        "",
        *lines,
        "",
        *notes,
        *([""] if notes else []),
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

    scored = [r for r in results if r.get("dice_mean") is not None]
    budget = max(r["budget_min"] for r in results)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    floor = 0.5  # the curves differ above it; an epoch scoring lower is drawn on the floor as a triangle
    for r in results:
        if r["curve"]:
            minutes = [p["elapsed_s"] / 60 for p in r["curve"]]
            dice = [p["val_dice"] for p in r["curve"]]
            line, = ax.plot(minutes, [max(d, floor) for d in dice], marker="o", markersize=3, label=r["network"],
                            linestyle="--" if r["training_data"] == THICK else "-")
            low = [(m, floor) for m, d in zip(minutes, dice) if d < floor]
            if low:
                ax.plot(*zip(*low), marker="v", markersize=7, linestyle="none", color=line.get_color())
    ax.axvline(budget, color="grey", linewidth=0.8)
    ax.set(xlabel="training time (min, wall clock, incl. validation)",
           ylabel="validation mean Dice (bundle's training grid)",
           title=f"Dice against training time ({budget:g} min budget; \u25bc: below {floor})", ylim=(floor - 0.01, 0.9))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    paths.append(_save(fig, out / "dice_vs_training_time.png"))

    for name, x_key, xlabel, log_x in [  # log x: the points span one to two orders of magnitude
        ("dice_vs_inference_time.png", "infer_s_per_case", "inference time per case (s, median)", True),
        ("params_vs_dice.png", "params", "parameters", True),
    ]:
        fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
        for r in scored:
            ax.scatter(r[x_key], r["dice_mean"], marker="s" if r["training_data"] == THICK else "o")
            ax.annotate(r["network"], (r[x_key], r["dice_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        if log_x:
            ax.set_xscale("log")
        if x_key == "infer_s_per_case" and scored:  # plain seconds on the log axis
            lo, hi = min(r[x_key] for r in scored), max(r[x_key] for r in scored)
            ax.set_xticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if lo / 2 <= t <= hi * 2])
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel=xlabel, ylabel="mean Dice (best checkpoint, original grid)",
               title=f"{'Parameters' if x_key == 'params' else 'Inference time'} and Dice ({budget:g} min budget)")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / name))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget per network")
    parser.add_argument("--only", default=None, help=f"comma-separated entries ({', '.join(e.key for e in ENTRIES)})")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / ISO),
                        help="MSD folder to train the 3D entries on")
    parser.add_argument("--thick_dataset_dir", default=str(REPO.parent / "shared" / "data" / THICK),
                        help="MSD folder with thick slices for the 2.5D comparison")
    parser.add_argument("--eval_dataset_dir", default=None,
                        help="score on every labelled case of this MSD folder instead of the validation split")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "collection_benchmark"),
                        help="where each entry trains (kept; finished entries are not rerun)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark"), help="folder for the tables and plots")
    parser.add_argument("--force", action="store_true", help="rerun entries that already have a result")
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    keys = [e.key for e in ENTRIES]
    args.entries = ENTRIES if not args.only else [ENTRIES[keys.index(k)] for k in _checked(args.only, keys, parser)]
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    try:
        _override_pairs(args.overrides)
    except ValueError as e:
        parser.error(str(e))
    needed = {"dataset_dir": any(e.data == ISO for e in args.entries),
              "thick_dataset_dir": any(e.data == THICK for e in args.entries), "eval_dataset_dir": True}
    for name, used in needed.items():
        value = getattr(args, name)
        if used and value and not (Path(value) / "dataset.json").is_file():
            parser.error(f"--{name} {value}: no dataset.json there (an MSD-layout folder is needed)")
    return args


def _checked(only: str, keys: list[str], parser: argparse.ArgumentParser) -> list[str]:
    wanted = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        parser.error(f"unknown entries {unknown}; choose from {keys}")
    return wanted


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    work_dir, out = Path(args.work_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = []
    for entry in args.entries:
        done = work_dir / entry.key / "result.json"
        if done.is_file() and not args.force:
            result = json.loads(done.read_text(encoding="utf-8"))
            if result.get("inputs") == _inputs(entry, args):
                print(f"{entry.key}: kept the result in {done}", flush=True)
                results.append(result)
                continue
        print(f"{entry.key}: training {entry.name} ({entry.bundle}) for {args.minutes:g} min ...", flush=True)
        result = run_entry(entry, args, work_dir / entry.key)
        done.write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"{entry.key}: {result['epochs']} epochs, Dice {_fmt(result.get('dice_mean'), 3)}, HD95 "
              f"{_fmt(result.get('hd95_mean_mm'), 2)} mm, {_fmt(result.get('infer_s_per_case'), 2)} s per case "
              f"({result['status']})", flush=True)
        results.append(result)
    command = "python benchmarks/collection.py " + " ".join(argv)
    write_tables(results, out, info, command.strip())
    plots = write_plots(results, out)
    print((out / "results.md").read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in [out / "results.csv", out / "results.md", *plots]))


if __name__ == "__main__":
    main()
