# SPDX-License-Identifier: Apache-2.0
"""Throughput of batch inference end to end: today's runner against this one, per bundle, in one run.

For each bundle, the same scans are segmented with the same weights by several pipelines, each in a fresh process
(``python -m monai.bundle``'s workflow built from the bundle's ``inference.json``), rounds interleaved (today,
new, today, new, ...) so that a busy machine slows them alike:

- ``today``: the runner and configs of a baseline commit (``--baseline``, by default the last commit before the
  faster runner), extracted with ``git archive`` and run from there (its ``bundletools``, ``transforms`` and
  ``networks``);
- ``new``: this checkout's runner with the bundle's defaults (``parallel_cases``, one writer thread, ...);
- ``new-ort``: the same with ``--runtime onnxruntime`` (needs the ``onnx`` extra; the export, cached under the
  output folder, is done in an untimed warm-up run and its time printed);
- ``model-zoo``: the MONAI model-zoo pattern (the spleen bundle's ``SupervisedEvaluator`` + ``SaveImaged``) with
  this checkout's network, preprocessing and inferer.

Each process times its whole run (load, preprocess, infer, invert, write of every case, weight loading included)
after building the workflow; process start and imports are not counted. Every pipeline first runs untimed on
one scan (warm-up: page cache, ONNX export). Scans: the real images of the bundle's default task (``imagesTr`` +
``imagesTs`` of the folder its ``dataset_dir`` defaults to: Task04_Hippocampus, the thick-slice copy for the CSAM
bundle) and a CT-sized scan (``--big_shape``, default 256x256x200 at 0.9 x 0.9 x 1.25 mm: a mosaic of real Task04
crops). Every bundle under ``bundles/`` unless ``--bundles`` names some. Prints, per bundle
and scan set: seconds (median over rounds), cases per minute, the ratio to ``today``; on the 42-case validation
split (the bundles' ``training_split``, seed 0) the mean Dice (classes 1..N-1) of each pipeline and its
difference to ``today``; how many outputs equal today's voxel for voxel; and the CPU seconds each run used (its
process and its DataLoader workers; on a shared machine a steadier measure of the work than the wall time).

    python -m benchmarks.batch_inference --weights /work/wts          # <weights>/<bundle>/models/model.pt
    python -m benchmarks.batch_inference --bundles unet_segmentation --max_cases 20 --rounds 3
    python -m benchmarks.batch_inference --pipelines today,new,new-ort --big_scans 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "02abab6"  # main before the faster runner (issue 16)
PIPELINES = ("today", "new", "new-ort", "model-zoo")


def zoo_config(parser) -> None:
    """Turn the bundle's inference config into the model-zoo (spleen bundle) pattern, keeping its network,
    preprocessing, inferer and postprocessing, plus a SaveImaged as the zoo writes its outputs."""
    parser["datalist"] = "$[{'image': f} for f in sorted(glob.glob(@dataset_dir + '/*.nii.gz'))]"
    parser["dataloader"] = {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                            "num_workers": "@num_workers"}
    parser["postprocessing#transforms"] = parser["postprocessing#transforms"] + [
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
         "print_log": False}]
    parser["handlers"] = [
        {"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
         "map_location": "@device"},
        {"_target_": "StatsHandler", "iteration_log": False}]
    parser["evaluator"] = {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                           "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                           "val_handlers": "@handlers", "amp": "@amp"}


def child(pipeline: str, root: str, bundle: str, scans: str, out: str, ckpt: str, num_workers: int) -> None:
    """Run one pipeline in this process (code and configs from ``root``) and print its timing as JSON."""
    sys.path.insert(0, root)  # the tree under test, ahead of the installed one: the point of the comparison
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(Path(root) / "bundles" / bundle / "configs" / "inference.json")
    parser.update({"dataset_dir": scans, "output_dir": out, "bundle_root": str(Path(root) / "bundles" / bundle),
                   "ckpt_path": ckpt, "num_workers": num_workers})
    if pipeline == "model-zoo":
        zoo_config(parser)
    else:
        parser["overwrite"] = True
    if pipeline == "new-ort":
        parser["runtime"] = "onnxruntime"
    evaluator = parser.get_parsed_content("evaluator")
    parser.get_parsed_content("initialize")  # set_determinism, as `monai.bundle run` does
    start, cpu = time.perf_counter(), _cpu_seconds()
    try:
        evaluator.run()
    except SystemExit as e:  # the batch runner's "some case failed"; the parent compares the outputs
        print(f"{pipeline}: exit status {e.code}", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(json.dumps({"pipeline": pipeline, "seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu,
                      "threads": torch.get_num_threads()}))


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers), user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def baseline_tree(rev: str, work: Path) -> Path:
    """The repository at ``rev`` (``git archive``), extracted under ``work``."""
    target = work / f"baseline-{rev}"
    if not (target / "bundletools").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def big_scan(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], crops: list[Path]) -> None:
    """A CT-sized scan: a mosaic of real Task04 crops (each z-scored), gzipped NIfTI, int16."""
    import nibabel as nib
    import numpy as np

    volume = np.zeros(shape, np.float32)
    tiles = iter(crops * (1 + np.prod(shape) // (len(crops) * 30 * 40 * 30)))
    x = 0
    while x < shape[0]:
        y, width = 0, 0
        while y < shape[1]:
            z, depth = 0, 0
            while z < shape[2]:
                crop = np.asarray(nib.load(next(tiles)).dataobj, dtype=np.float32)
                crop = (crop - crop.mean()) / (crop.std() + 1e-6)
                cut = crop[: shape[0] - x, : shape[1] - y, : shape[2] - z]
                volume[x:x + cut.shape[0], y:y + cut.shape[1], z:z + cut.shape[2]] = cut
                z += cut.shape[2]
                width, depth = max(width, cut.shape[0]), max(depth, cut.shape[1])
            y += depth
        x += width
    nib.save(nib.Nifti1Image(np.clip(volume * 200 + 1000, 0, 4000).astype(np.int16), np.diag([*spacing, 1.0])),
             str(path))


def dice(pred, label, classes: int) -> float:
    import numpy as np

    scores = []
    for c in range(1, classes):
        p, t = pred == c, label == c
        denominator = p.sum() + t.sum()
        scores.append(1.0 if denominator == 0 else 2.0 * np.logical_and(p, t).sum() / denominator)
    return float(np.mean(scores))


def validation_cases(dataset: Path) -> dict[str, Path]:
    """Case name -> label path of the bundles' validation split (42 cases on Task04)."""
    from bundletools.data import case_name, msd_training_datalist, split_datalist

    _, val = split_datalist(msd_training_datalist(dataset), val_fraction=0.2, seed=0)
    return {f"imagesTr_{case_name(item['image'])}": Path(item["label"]) for item in val}


def run_pipeline(pipeline: str, root: Path, bundle: str, scans: Path, out: Path, ckpt: Path, workers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, __file__, "--child", pipeline, str(root), bundle, str(scans), str(out),
                           str(ckpt), str(workers)], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{bundle} {pipeline} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_set(bundle: str, label: str, images: list[Path], pipelines: list[str], roots: dict, ckpt: Path,
              args, work: Path, labels: dict[str, Path], classes: int) -> None:
    import nibabel as nib
    import numpy as np

    scans = work / f"{bundle}-{label}" / "scans"
    warm = work / f"{bundle}-{label}" / "warm"
    for folder, items in ((scans, images), (warm, images[:1])):
        folder.mkdir(parents=True, exist_ok=True)
        for image in items:  # one flat folder, so that every pipeline lists exactly these cases
            link = folder / (image.name if image.parent == work else f"{image.parent.name}_{image.name}")
            if not link.exists():
                link.symlink_to(image)
            link.read_bytes()  # into the page cache before any pipeline runs
    seconds: dict[str, list[float]] = {p: [] for p in pipelines}
    cpu: dict[str, list[float]] = {p: [] for p in pipelines}
    outs = {p: work / f"{bundle}-{label}" / f"out_{p}" for p in pipelines}
    threads = None
    for p in pipelines:  # untimed warm-up on one scan, into the output folder (keeps an ONNX export's cache)
        start = time.perf_counter()
        run_pipeline(p, roots[p], bundle, warm, outs[p], ckpt, args.num_workers)
        if p == "new-ort":
            print(f"  {bundle} {label}: new-ort warm-up (ONNX export included) {time.perf_counter() - start:.0f} s")
    for r in range(args.rounds):
        for p in (pipelines if r % 2 == 0 else pipelines[::-1]):
            result = run_pipeline(p, roots[p], bundle, scans, outs[p], ckpt, args.num_workers)
            seconds[p].append(result["seconds"])
            cpu[p].append(result["cpu_seconds"])
            threads = result["threads"]
    n = len(images)
    files = {p: {f.name[: -len("_seg.nii.gz")]: f for f in outs[p].glob("*_seg.nii.gz")} for p in pipelines}
    for p in pipelines:
        report = outs[p] / "report.json"
        failed = [c for c in json.loads(report.read_text())["cases"] if c["status"] == "failed"] \
            if report.is_file() else []
        if failed:
            print(f"  {bundle} {label} {p}: {len(failed)} case(s) FAILED, e.g. {failed[0]['reason']}")
    reference = "today" if "today" in pipelines else pipelines[0]
    print(f"\n{bundle}, {label}: {n} scan(s), {args.rounds} round(s), num_workers {args.num_workers}, "
          f"{threads} torch threads per process, model {ckpt}")
    print(f"{'pipeline':>10} {'seconds':>9} {'cases/min':>10} {'ratio':>6} {'CPU s':>8} {'CPU ratio':>9} "
          f"{'mean Dice':>10} {'dDice':>8} {'same as ' + reference:>16} {'voxels agree':>13}")
    dices = {}
    for p in pipelines:
        s = statistics.median(seconds[p])
        val = [c for c in labels if c in files[p]]
        dices[p] = (float(np.mean([dice(np.asarray(nib.load(files[p][c]).dataobj),
                                        np.asarray(nib.load(labels[c]).dataobj), classes) for c in val]))
                    if val else float("nan"))
        pairs = [(np.asarray(nib.load(f).dataobj), np.asarray(nib.load(files[reference][c]).dataobj))
                 for c, f in files[p].items() if c in files[reference]]
        same = sum(np.array_equal(a, b) for a, b in pairs)
        agree = sum(int((a == b).sum()) for a, b in pairs) / max(1, sum(a.size for a, _ in pairs))
        ratio = statistics.median(seconds[reference]) / s
        c = statistics.median(cpu[p])
        cpu_ratio = statistics.median(cpu[reference]) / c
        d = dices[p] - dices[reference]
        print(f"{p:>10} {s:>9.1f} {60 * n / s:>10.2f} {ratio:>6.2f} {c:>8.1f} {cpu_ratio:>9.2f} {dices[p]:>10.4f} "
              f"{d:>+8.4f} "
              f"{f'{same}/{len(files[p])}':>16} {agree:>13.6f}   "
              f"(rounds: {', '.join(f'{x:.1f}' for x in seconds[p])} s"
              + (f"; Dice over {len(val)} validation cases" if val else "") + ")")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", default=None, help="comma-separated (default: every bundle under bundles/)")
    parser.add_argument("--pipelines", default="today,new", help=f"comma-separated, of {', '.join(PIPELINES)}")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of today's runner")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder of Task04_Hippocampus")
    parser.add_argument("--weights", help="folder with <bundle>/models/model.pt (default: each bundle's "
                                          "models/model.pt, else a random model: timing only, Dice meaningless)")
    parser.add_argument("--images", choices=("all", "validation"), default="all",
                        help="all: imagesTr + imagesTs; validation: only the 42 validation cases")
    parser.add_argument("--max_cases", type=int, help="only the first N real images (sorted by name)")
    parser.add_argument("--big_scans", type=int, default=1, help="number of CT-sized scans (0: none)")
    parser.add_argument("--no_task04", action="store_true", help="only the CT-sized scans")
    parser.add_argument("--big_shape", default="256x256x200")
    parser.add_argument("--big_spacing", default="0.9x0.9x1.25")
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of each pipeline, interleaved")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of every pipeline")
    parser.add_argument("--workdir", help="keep the inputs' links and the outputs here")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pipeline, root, bundle, scans, out, ckpt, workers = args.child
        child(pipeline, root, bundle, scans, out, ckpt, int(workers))
        return

    # here, not at the top: a child runs a baseline tree's bundletools, which may have no bundles module
    from bundletools.bundles import bundle_names, default_task

    pipelines = args.pipelines.split(",")
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        raise SystemExit(f"unknown pipeline(s) {unknown}; choose from {', '.join(PIPELINES)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        roots = {p: REPO for p in pipelines}
        if "today" in pipelines:
            roots["today"] = baseline_tree(args.baseline, work)
        print(f"today = {args.baseline} ({roots.get('today', '-')}), new = {REPO}")
        for bundle in args.bundles.split(",") if args.bundles else bundle_names():
            task = default_task(bundle)
            dataset = Path(args.data) / task
            images = sorted(p for sub in ("imagesTr", "imagesTs") for p in (dataset / sub).glob("*.nii.gz")
                            if not p.name.startswith("."))
            if not images:
                raise SystemExit(f"no images under {dataset}/imagesTr or imagesTs")
            val = validation_cases(dataset)
            if args.images == "validation":
                images = [p for p in images if f"{p.parent.name}_{p.name[: -len('.nii.gz')]}" in val]
            images = images[: args.max_cases] if args.max_cases else images
            ckpt = (Path(args.weights) / bundle / "models" / "model.pt" if args.weights
                    else REPO / "bundles" / bundle / "models" / "model.pt")
            if not ckpt.is_file():
                from benchmarks.large_volume_memory import random_checkpoint

                ckpt = work / bundle / "models" / "model.pt"
                random_checkpoint(bundle, ckpt, {})
                print(f"{bundle}: no trained model; a random one (timing only: the Dice figures mean nothing)")
            config = json.loads((REPO / "bundles" / bundle / "configs" / "inference.json").read_text())
            classes = int(config["num_classes"])
            if not args.no_task04:
                bench_set(bundle, task, images, pipelines, roots, ckpt, args, work, val, classes)
            if args.big_scans:
                shape = tuple(int(s) for s in args.big_shape.split("x"))
                spacing = tuple(float(s) for s in args.big_spacing.split("x"))
                crops = sorted((Path(args.data) / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))
                bigs = []
                for i in range(args.big_scans):
                    path = work / f"big{i}_{args.big_shape}.nii.gz"
                    if not path.exists():
                        big_scan(path, shape, spacing, crops[i:] + crops[:i])
                    bigs.append(path)
                bench_set(bundle, f"{args.big_shape} scan", bigs, pipelines, roots, ckpt, args, work, {}, classes)


if __name__ == "__main__":
    main()
