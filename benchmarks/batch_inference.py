# SPDX-License-Identifier: Apache-2.0
"""Throughput of batch inference end to end: this collection's runner against the model-zoo pattern, one run.

Both pipelines segment the same scans with the same network, weights, preprocessing and inferer (the bundle's
``inference.json``), each in a fresh process, one after the other:

- ``batch``: the bundle's ``inference.json`` as it is (``bundletools.BatchInference``: per-case isolation,
  temporary file + rename, resume check, report);
- ``model-zoo``: the spleen bundle's ``inference.json`` pattern: ``Dataset`` + ``DataLoader`` +
  ``SupervisedEvaluator`` with a ``CheckpointLoader`` handler and postprocessing ``Activationsd`` ->
  ``Invertd`` -> ``AsDiscreted`` -> ``SaveImaged``.

Each process times its whole run (load, preprocess, infer, invert, save of every case, weight loading included)
after building the workflow; process start and imports are not counted. The inputs are read once beforehand,
so both pipelines find them in the page cache. Prints cases per minute, seconds per case and the ratio, and
checks that both pipelines wrote the same segmentations.

    python benchmarks/batch_inference.py                          # every image of Task04 imagesTr + imagesTs
    python benchmarks/batch_inference.py --max_cases 5            # a quick check
    python benchmarks/batch_inference.py --ckpt path/to/model.pt --num_workers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("model-zoo", "batch")


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


def child(pipeline: str, bundle: str, scans: str, out: str, ckpt: str, num_workers: int) -> None:
    """Run one pipeline in this process and print its timing as JSON."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / bundle / "configs" / "inference.json")
    parser.update({"dataset_dir": scans, "output_dir": out, "bundle_root": str(Path(ckpt).parent.parent),
                   "ckpt_path": ckpt, "num_workers": num_workers})
    if pipeline == "model-zoo":
        zoo_config(parser)
    evaluator = parser.get_parsed_content("evaluator")
    parser.get_parsed_content("initialize")  # set_determinism, as `monai.bundle run` does
    start = time.perf_counter()
    try:
        evaluator.run()
    except SystemExit as e:  # the batch runner's "some case failed"; the parent compares the outputs
        print(f"{pipeline}: exit status {e.code}", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(json.dumps({"pipeline": pipeline, "seconds": seconds, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="unet_segmentation")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "Task04_Hippocampus"))
    parser.add_argument("--max_cases", type=int, help="only the first N images (sorted by name)")
    parser.add_argument("--ckpt", help="model.pt (default: the bundle's models/model.pt, else a random model)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of both pipelines")
    parser.add_argument("--workdir", help="keep the inputs' links and the outputs here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pipeline, scans, out, ckpt, workers = args.child
        child(pipeline, args.bundle, scans, out, ckpt, int(workers))
        return

    dataset = Path(args.dataset_dir)
    images = sorted(p for sub in ("imagesTr", "imagesTs") for p in (dataset / sub).glob("*.nii.gz")
                    if not p.name.startswith("."))
    if not images:
        raise SystemExit(f"no images under {dataset}/imagesTr or imagesTs")
    images = images[: args.max_cases] if args.max_cases else images

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        scans = work / "scans"
        scans.mkdir(parents=True, exist_ok=True)
        for image in images:  # one flat folder, so that both pipelines list exactly these cases
            link = scans / f"{image.parent.name}_{image.name}"
            if not link.exists():
                link.symlink_to(image)
            link.read_bytes()  # into the page cache before either pipeline runs
        ckpt = Path(args.ckpt) if args.ckpt else REPO / "bundles" / args.bundle / "models" / "model.pt"
        if not ckpt.is_file():
            sys.path.insert(0, str(REPO / "benchmarks"))
            from large_volume_memory import random_checkpoint

            ckpt = work / "root" / "models" / "model.pt"
            random_checkpoint(args.bundle, ckpt, {})
            print("no trained model: using a randomly initialised one (the timing does not depend on the weights)")
        results = {}
        for pipeline in PIPELINES:
            out = work / f"out_{pipeline}"
            proc = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--child", pipeline, str(scans),
                                   str(out), str(ckpt), str(args.num_workers)], capture_output=True, text=True,
                                  encoding="utf-8", errors="replace")
            if proc.returncode != 0:
                raise SystemExit(f"{pipeline} failed:\n{proc.stderr[-4000:]}")
            results[pipeline] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[pipeline]["outputs"] = sorted(out.glob("*_seg.nii.gz"))

        import nibabel as nib
        import numpy as np

        n = len(images)
        zoo, ours = results["model-zoo"], results["batch"]
        same = sum(np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
                   for a, b in zip(zoo["outputs"], ours["outputs"]))
        print(f"{args.bundle}, {n} cases of {dataset.name} (imagesTr + imagesTs), model {ckpt}, "
              f"num_workers {args.num_workers}, {ours['threads']} torch threads")
        print(f"{'pipeline':>10} {'cases':>6} {'seconds':>9} {'cases/min':>10} {'s/case':>8}")
        for name in PIPELINES:
            r = results[name]
            print(f"{name:>10} {len(r['outputs']):>6} {r['seconds']:>9.1f} {60 * n / r['seconds']:>10.2f} "
                  f"{r['seconds'] / n:>8.3f}")
        print(f"throughput ratio batch / model-zoo: {zoo['seconds'] / ours['seconds']:.3f} "
              f"(> 1: the batch runner is faster)")
        print(f"identical segmentations: {same} of {n}")


if __name__ == "__main__":
    main()
