# SPDX-License-Identifier: Apache-2.0
"""
One GPU check, one command: every training, speed and throughput figure of the bundles on a GPU, in one call.

    python -m benchmarks.gpu_check --references .device/official        # on a GPU machine, under 8 minutes
    python -m benchmarks.gpu_check --device cpu --quick                 # the smoke test (tests/test_gpu_check.py)

Each part runs in a child process of its own with a time limit, so a stall (D-Net under bfloat16 once did not
finish a step in 150 s) costs that part only, and GPU memory is returned between parts; the parts run one after
the other, so no two share the GPU while being timed. What is measured, per bundle (every bundle under
``bundles/``), with its ``train.json`` as it is (the settings its device chooses) on its default task (the folder
its ``dataset_dir`` defaults to: ``Task04_Hippocampus``; the thick-slice copy for the CSAM bundle):

- ``epoch_s``: a training epoch, the iteration loop only (from the second epoch on: the first includes cuDNN's
  autotuning), and ``iterations``;
- ``network_s``: the network's own forward, loss, backward and optimizer step over as many iterations, at the same
  precision and memory format, on one of its training batches already on the device; ``epoch_over_network`` is
  the ratio (1.5 or less is the target: the GPU, not the host, sets the pace);
- ``validation_s`` (one validation) and ``epoch_end_s`` (the other epoch-end handlers, the checkpoint mostly);
  ``overhead_share``: what both add to an epoch at the bundle's ``val_interval``;
- ``peak_memory_gb`` of the training and ``precision``; ``amp_over_fp32_step``: the float32 step's time over the
  default precision's (1 or more: mixed precision is at least as fast); for the UNet bundle also
  ``deterministic_epoch_s``, the epoch with ``--deterministic True`` (what exact repeatability costs).

Then: the UNet bundle's whole default run (training with validation, ``default_run_s``) and the Dice of its best
checkpoint on the 42 validation cases in their original grid (``default_run_dice``); the paper networks against
the authors' code (``--references``, a folder with clones named DLK, TransUNet and U-KAN) at their papers' input
sizes: ours at float32 (``vs_official_fp32``) and at the bundles' GPU settings, compiled where the compile time
pays back within one default run (``vs_official_gpu_default``, ``compile_s``); D-Net's step under bfloat16 with its
depthwise convolutions in half precision (``dnet_bf16_depthwise_step_s``, the stall's suspect); and batch
inference with each bundle's ``inference.json`` (``cases_per_min_task04`` over the 42 validation scans,
``large_scan_s`` for a 256x256x200 scan). Prints one JSON line per figure, writes ``gpu.csv``
(``bundle,metric,value,gpu,date``) and ``gpu.md`` (a dated table with the GPU, torch and CUDA) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bundletools.bundles import bundle_names, default_task

REPO = Path(__file__).resolve().parents[1]
# the paper networks against the authors' code, at the input sizes of the issue's measurements; the bundle whose
# default run decides whether compiling pays back
COMPARISONS = {
    "dnet": ("dnet-official", "DLK", [2, 1, 128, 128, 128], "dnet_segmentation"),
    "transunet": ("transunet-r50-vit-b16", "TransUNet", [2, 3, 224, 224], "transunet_segmentation"),
    "ukan": ("ukan-official", "U-KAN", [4, 3, 256, 256], "ukan_segmentation"),
}
# seconds each part may take before it is stopped and reported as such; the whole check stops starting parts when
# its --budget_s (8 minutes by default) would be passed, and gpu.csv and gpu.md are rewritten after every part, so
# a call cut short by the device's 10-minute limit still returns what was measured
LIMITS = {"train": 75, "default_run": 30, "compare": 90, "dnet_bf16_probe": 30, "infer": 45}


# ------------------------------------------------------------------------------------------------ shared helpers
def _dataset(data: Path, bundle: str) -> Path:
    return data / default_task(bundle)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _train_parser(bundle: str, args, work: Path, **overrides):
    """The bundle's ``train.json`` as it is, on the check's data and device, writing into ``work``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / bundle / "configs" / "train.json")
    parser.update({"bundle_root": str(work), "dataset_dir": str(_dataset(Path(args.data), bundle)),
                   "device": f"$torch.device('{args.device}')", **overrides})
    if args.quick:  # the smoke test: 10 cases (2 validated), two iterations per epoch
        parser.update({"max_cases": 10, "train#trainer#epoch_length": 2})
    return parser


def _one_batch(parser, device) -> dict:
    """One training batch as the trainer gets it, made from the dataset directly (a loader's worker processes would
    go on preparing batches beside the timing)."""
    from monai.data import list_data_collate

    dataset = parser.get_parsed_content("train#dataset")
    batch = list_data_collate([dataset[i % len(dataset)] for i in range(parser.get_parsed_content("batch_size"))])
    return {k: batch[k].to(device) for k in ("image", "label")}


def _step_seconds(network, loss, optimizer, batch, amp_dtype, memory_format, iterations: int, device) -> float:
    """Seconds of ``iterations`` training steps (forward, loss, backward, optimizer step) on one batch already on
    the device, under autocast to ``amp_dtype`` (None: float32), after three untimed steps."""
    import torch

    image = batch["image"].to(memory_format=memory_format)
    label = batch["label"]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            value = loss(network(image), label).mean()
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    _sync(device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------- parts
def part_train(bundle: str, args) -> dict:
    """The bundle's training epochs on the device, and its network's own steps over as many iterations."""
    import torch
    from ignite.engine import Events

    with tempfile.TemporaryDirectory() as work:
        # every epoch validated, to time a validation; the overhead share uses the bundle's own interval
        default_interval = _train_parser(bundle, args, Path(work)).get_parsed_content("val_interval")
        parser = _train_parser(bundle, args, Path(work), epochs=args.epochs, val_interval=1)
        for _ in parser.get_parsed_content("initialize"):
            pass
        trainer = parser.get_parsed_content("train#trainer")
        evaluator = parser.get_parsed_content("validate#evaluator")
        loops, walls, validations, marks, steps = [], [], [], {}, []

        def step_done(engine):  # a bundle too slow for the part's limit is stopped, and its epoch estimated
            steps.append((engine.state.epoch, time.perf_counter()))
            if steps[-1][1] - steps[0][1] > args.train_limit_s:
                engine.terminate()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, step_done)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: marks.__setitem__("epoch", time.perf_counter()))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: (
            loops.append(e.state.times[Events.EPOCH_COMPLETED.name]),
            walls.append(time.perf_counter() - marks["epoch"])))
        evaluator.add_event_handler(Events.STARTED, lambda e: marks.__setitem__("val", time.perf_counter()))
        evaluator.add_event_handler(Events.COMPLETED, lambda e: validations.append(time.perf_counter() - marks["val"]))
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        parser.get_parsed_content("run")  # as `python -m monai.bundle run` runs it
        peak = torch.cuda.max_memory_allocated(args.device) / 2**30 if torch.cuda.is_available() else float("nan")
        iterations = trainer.state.epoch_length
        estimated = len(loops) < args.epochs
        if estimated:  # stopped: the median step after the first ten (cuDNN's autotuning) times the iterations
            times = [t for _, t in steps]
            epoch_s = statistics.median([b - a for a, b in zip(times[10:], times[11:])] or [float("nan")]) * iterations
        else:
            epoch_s = statistics.median(loops[1:] if len(loops) > 1 else loops)
        steady = slice(1, None) if len(validations) > 1 else slice(None)
        validation_s = statistics.median(validations[steady]) if validations else float("nan")
        ends = [w - lo - v for w, lo, v in zip(walls, loops, validations)][steady]
        epoch_end_s = statistics.median(ends) if ends else float("nan")

        amp = parser.get_parsed_content("amp")
        amp_dtype = parser.get_parsed_content("amp_dtype") if amp else None
        memory_format = parser.get_parsed_content("memory_format")
        network, loss = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        batch = _one_batch(parser, args.device)
        timed = min(iterations, 20)  # steps timed; network_s is scaled to the epoch's iterations
        network_s = _step_seconds(network, loss, optimizer, batch, amp_dtype, memory_format, timed, args.device)
        fp32_s = _step_seconds(network, loss, optimizer, batch, None, memory_format, timed, args.device)
        network_s *= iterations / timed
        fp32_s *= iterations / timed
    return {
        "iterations": iterations, "default_epochs": _train_parser(bundle, args, Path(".")).get_parsed_content("epochs"),
        "epoch_s": epoch_s, "epoch_s_estimated": float(estimated), "network_s": network_s,
        "epoch_over_network": epoch_s / network_s,
        "validation_s": validation_s, "epoch_end_s": epoch_end_s,
        "overhead_share": (validation_s / default_interval + epoch_end_s) / epoch_s,
        "peak_memory_gb": peak, "precision": str(amp_dtype).replace("torch.", "") if amp else "float32",
        "amp_over_fp32_step": fp32_s / network_s,
    }


def part_deterministic(bundle: str, args) -> dict:
    """What ``--deterministic True`` costs: the training epoch with cuDNN's deterministic kernels and torch's
    deterministic algorithms, against the default's (``epoch_s`` of the training part)."""
    from ignite.engine import Events

    with tempfile.TemporaryDirectory() as work:
        parser = _train_parser(bundle, args, Path(work), epochs=args.epochs, val_interval=10**6, deterministic=True)
        for _ in parser.get_parsed_content("initialize"):
            pass
        trainer = parser.get_parsed_content("train#trainer")
        loops = []
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: loops.append(e.state.times["EPOCH_COMPLETED"]))
        parser.get_parsed_content("run")
    return {"deterministic_epoch_s": statistics.median(loops[1:] or loops)}


def part_default_run(args) -> dict:
    """The UNet bundle's default recipe, training with validation, then its best model scored in the original grid
    of the 42 validation cases (``evaluate.json``)."""
    from monai.bundle import ConfigParser

    bundle = "unet_segmentation"
    with tempfile.TemporaryDirectory() as work:
        overrides = {"epochs": 2} if args.quick else {}
        parser = _train_parser(bundle, args, Path(work), time_budget_s=args.default_run_limit, **overrides)
        start = time.perf_counter()
        for _ in parser.get_parsed_content("initialize"):
            pass
        trainer = parser.get_parsed_content("train#trainer")
        parser.get_parsed_content("run")
        seconds = time.perf_counter() - start
        epochs = trainer.state.epoch
        evaluation = ConfigParser()
        configs = REPO / "bundles" / bundle / "configs"
        evaluation.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
        evaluation.update({"bundle_root": work, "dataset_dir": str(_dataset(Path(args.data), bundle)),
                           "device": f"$torch.device('{args.device}')", "output_dir": work + "/eval"})
        if args.quick:
            evaluation["max_cases"] = 10
        evaluator = evaluation.get_parsed_content("validate#evaluator")
        evaluator.run()
        dice = float(evaluator.state.metrics["val_mean_dice"])
    return {"default_run_s": seconds, "default_run_epochs": epochs, "default_run_dice": dice}


def part_compare(name: str, args) -> dict:
    """Ours against the authors' network: float32 both, and ours at the bundles' GPU settings (compiled too)."""
    from benchmarks import speed

    config, folder, shape, _ = COMPARISONS[name]
    if args.quick:  # the smallest inputs each network takes
        shape = {"dnet": [1, 1, 32, 32, 32], "transunet": [1, 3, 224, 224], "ukan": [1, 3, 64, 64]}[name]
    options = argparse.Namespace(device=args.device, shape=shape, plain=False,
                                 bf16=False, gpu_default=True, compile=not args.quick)
    runners = speed.build_runners(config, options, reference=str(Path(args.references) / folder))
    speed.take_turns(runners, 2 if args.quick else 3)
    fb = {runner.variant: statistics.median(runner.forward_backward) for runner in runners}
    official, ours, gpu_default = fb["official"], fb["ours"], fb["gpu-default"]
    result = {"official_fwd_bwd_s": official, "ours_fp32_fwd_bwd_s": ours, "ours_gpu_default_fwd_bwd_s": gpu_default,
              "vs_official_fp32": official / ours}
    compiled = next((r for r in runners if r.variant == "compile-gpu-default"), None)
    if compiled is not None:
        # it pays back when the compilation costs less than it saves over one default run of the bundle
        saved = (gpu_default - fb["compile-gpu-default"]) * args.default_run_steps
        result.update(compiled_fwd_bwd_s=fb["compile-gpu-default"], compile_s=compiled.setup_s,
                      compile_pays_back=float(saved > compiled.setup_s))
        if saved > compiled.setup_s:
            gpu_default = fb["compile-gpu-default"]
    result["vs_official_gpu_default"] = official / gpu_default
    return result


def part_dnet_bf16_probe(args) -> dict:
    """D-Net's training step under bfloat16 with its depthwise convolutions in half precision, as before the
    float32 rule (``networks.blocks.fast.half_precision_depthwise``): what the rule saves."""
    import torch

    from benchmarks.speed import loss_of
    from networks import create_network
    from networks.blocks.fast import half_precision_depthwise

    shape = [1, 1, 32, 32, 32] if args.quick else [2, 1, 128, 128, 128]
    net = create_network("dnet_official").to(args.device).train()
    x = torch.randn(shape, device=args.device)
    times = {}
    for label, context in (("dnet_bf16_step_s", contextlib.nullcontext),
                           ("dnet_bf16_depthwise_step_s", half_precision_depthwise)):
        with context():
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
                loss_of(net(x)).backward()  # warm-up (autotuning)
                _sync(args.device)
                start = time.perf_counter()
                loss_of(net(x)).backward()
                _sync(args.device)
        times[label] = time.perf_counter() - start
        net.zero_grad(set_to_none=True)
    return times


def part_infer(bundle: str, args) -> dict:
    """Batch inference with the bundle's ``inference.json`` (random weights: the speed does not depend on them)
    over the 42 validation scans and over one 256x256x200 scan."""
    import torch
    from monai.bundle import ConfigParser

    from benchmarks.batch_inference import big_scan, validation_cases

    dataset = _dataset(Path(args.data), bundle)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        scans, large = work / "scans", work / "large"
        scans.mkdir()
        large.mkdir()
        images = sorted(dataset.glob("imagesTr/*.nii.gz"))
        wanted = set(validation_cases(dataset))
        chosen = [p for p in images if f"imagesTr_{p.name.removesuffix('.nii.gz')}" in wanted][: 3 if args.quick else None]
        for path in chosen:
            (scans / path.name).symlink_to(path)
        big_scan(large / "large.nii.gz", (64, 64, 50) if args.quick else (256, 256, 200), (0.9, 0.9, 1.25), images)
        configs = REPO / "bundles" / bundle / "configs"
        parser = ConfigParser()
        parser.read_config(configs / "inference.json")
        torch.manual_seed(0)
        (work / "models").mkdir()
        torch.save(parser.get_parsed_content("network_def").state_dict(), work / "models" / "model.pt")
        result = {}
        for label, folder in (("task04", scans), ("large", large)):
            parser = ConfigParser()
            parser.read_config(configs / "inference.json")
            parser.update({"bundle_root": str(work), "dataset_dir": str(folder), "output_dir": str(work / f"out-{label}"),
                           "device": f"$torch.device('{args.device}')"})
            evaluator = parser.get_parsed_content("evaluator")
            start = time.perf_counter()
            report = evaluator.run()
            seconds = time.perf_counter() - start
            done = sum(case["status"] == "succeeded" for case in report["cases"])
            if done != len(report["cases"]):
                raise RuntimeError(f"{bundle}: {len(report['cases']) - done} case(s) failed: {report['cases']}")
            if label == "task04":
                result.update(cases_per_min_task04=60 * done / seconds, task04_cases=done)
            else:
                result["large_scan_s"] = seconds
    return result


# ---------------------------------------------------------------------------------------------- orchestration
def run_part(part: str, args, limit: float, default_run_steps: int = 0) -> dict:
    """Run one part in a child process; its result, or ``{"error": ...}`` when it failed or ran out of time."""
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--part", part, "--device", args.device,
               "--data", args.data, "--epochs", str(args.epochs), "--default_run_limit", str(args.default_run_limit),
               "--default_run_steps", str(default_run_steps), "--train_limit_s", str(args.train_limit_s)]
    if args.references:
        command += ["--references", args.references]
    if args.quick:
        command.append("--quick")
    start = time.perf_counter()
    try:
        # from the checkout's root, where `-m benchmarks.gpu_check` is found
        proc = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=limit, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return {"error": f"did not finish in {limit:.0f} s", "log": tail.decode() if isinstance(tail, bytes) else tail}
    finally:
        elapsed = time.perf_counter() - start
    if args.log_dir:
        (Path(args.log_dir) / f"{part.replace(':', '-')}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "log": proc.stderr[-2000:], "seconds": elapsed}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict:
    import monai
    import torch

    if torch.device(device).type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"CPU ({os.cpu_count()} cores)"
    return {"gpu": gpu, "date": date.today().isoformat(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "cudnn": str(torch.backends.cudnn.version()), "monai": monai.__version__}


def write_outputs(rows: list[dict], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["bundle", "metric", "value", "gpu", "date"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "gpu": env["gpu"], "date": env["date"]})
    metrics = ["epoch_s", "network_s", "epoch_over_network", "overhead_share", "precision", "amp_over_fp32_step",
               "peak_memory_gb", "cases_per_min_task04", "large_scan_s"]
    values = {(r["bundle"], r["metric"]): r["value"] for r in rows}
    lines = [f"GPU check of {env['date']}: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN "
             f"{env['cudnn']}, MONAI {env['monai']} (`python -m benchmarks.gpu_check`).", "",
             "| bundle | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    bundles = bundle_names()
    for bundle in bundles:
        cells = [_cell(values.get((bundle, m), "")) for m in metrics]
        lines.append(f"| {bundle} | " + " | ".join(cells) + " |")
    lines += ["", "| figure | value |", "|---|---|"]
    shown = {(b, m) for b in bundles for m in metrics}
    for row in rows:
        if (row["bundle"], row["metric"]) not in shown:
            lines.append(f"| {row['bundle']} {row['metric']} | {_cell(row['value'])} |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", default=os.environ.get("MONAI_DATA_DIRECTORY", str(REPO.parent / "shared" / "data")),
                        help="folder holding Task04_Hippocampus and Task04_Hippocampus_thick3mm")
    parser.add_argument("--references", help="folder with the authors' clones DLK, TransUNet and U-KAN")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark"), help="where gpu.csv and gpu.md go")
    parser.add_argument("--log_dir", help="a log per part (its stdout and stderr)")
    parser.add_argument("--bundles", default=None, help="comma-separated (default: every bundle under bundles/)")
    parser.add_argument("--skip", default="",
                        help="parts to leave out: train,deterministic,default_run,compare,probe,infer")
    parser.add_argument("--train_limit_s", type=float, default=45.0,
                        help="a bundle's training stops after this many seconds; its epoch is then estimated")
    parser.add_argument("--budget_s", type=float, default=480.0,
                        help="no part is started once this many seconds have passed (default: 8 minutes)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="training epochs per bundle (the first is a warm-up: cuDNN's autotuner)")
    parser.add_argument("--default_run_limit", type=float, default=120.0,
                        help="seconds after which the UNet default run stops (its Dice is then of fewer epochs)")
    parser.add_argument("--default_run_steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny epochs, inputs and data")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.part:
        kind, _, name = args.part.partition(":")
        functions = {"train": part_train, "infer": part_infer, "compare": part_compare,
                     "deterministic": part_deterministic}
        if kind in functions:
            result = functions[kind](name, args)
        else:
            result = {"default_run": part_default_run, "dnet_bf16_probe": part_dnet_bf16_probe}[kind](args)
        print(json.dumps(result))
        return
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print(json.dumps(env), flush=True)
    skip = set(filter(None, args.skip.split(",")))
    bundles = [b for b in args.bundles.split(",") if b] if args.bundles else bundle_names()
    parts: list[tuple[str, str, float]] = []
    if "train" not in skip:
        parts += [(bundle, f"train:{bundle}", LIMITS["train"]) for bundle in bundles]
    if "deterministic" not in skip:
        parts.append(("unet_segmentation", "deterministic:unet_segmentation", LIMITS["train"]))
    if "default_run" not in skip:
        parts.append(("unet_segmentation", "default_run", LIMITS["default_run"] + args.default_run_limit))
    if "probe" not in skip:
        parts.append(("dnet", "dnet_bf16_probe", LIMITS["dnet_bf16_probe"]))
    if "compare" not in skip and args.references:
        parts += [(name, f"compare:{name}", LIMITS["compare"]) for name in COMPARISONS]
    if "infer" not in skip:
        parts += [(bundle, f"infer:{bundle}", LIMITS["infer"]) for bundle in bundles]
    rows: list[dict] = []
    start = time.perf_counter()
    for owner, part, limit in parts:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            rows.append({"bundle": owner, "metric": f"{part.split(':')[0]}_error",
                         "value": f"not run: the check's budget of {args.budget_s:.0f} s was used up"})
            continue
        # a comparison judges compiling by the steps of its bundle's default run (from the training part)
        bundle = COMPARISONS[owner][3] if part.startswith("compare:") else owner
        got = {r["metric"]: r["value"] for r in rows if r["bundle"] == bundle}
        steps = int(got.get("iterations", 0) * got.get("default_epochs", 0))
        result = run_part(part, args, limit * 10 if args.quick else min(limit, left), steps)
        if "error" in result:
            rows.append({"bundle": owner, "metric": f"{part.split(':')[0]}_error", "value": result["error"]})
            print(json.dumps({"bundle": owner, "part": part, **result}), flush=True)
            continue
        for metric, value in result.items():
            rows.append({"bundle": owner, "metric": metric, "value": value})
            print(json.dumps({"bundle": owner, "metric": metric, "value": value}), flush=True)
        write_outputs(rows, env, Path(args.out))
    write_outputs(rows, env, Path(args.out))
    print(f"wrote {Path(args.out) / 'gpu.csv'} and {Path(args.out) / 'gpu.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
