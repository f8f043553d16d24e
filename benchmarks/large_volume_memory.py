# SPDX-License-Identifier: Apache-2.0
"""Peak memory of a bundle's batch inference on one CT-sized volume (512 x 512 x 400 voxels by default).

Writes a synthetic volume (int16, CT-like values) and, unless ``--ckpt`` is given, a randomly initialised
checkpoint of the bundle's ``network_def`` (memory does not depend on the weights), then runs the bundle's
inference exactly as a pipeline does, ``python -m monai.bundle run --config_file bundles/<bundle>/configs/
inference.json ...``, in a fresh process. Prints that process's peak resident memory (``ru_maxrss``), its wall
time and the output's shape. ``--num_workers 0`` (the default here) keeps reading and preprocessing in the
measured process; with workers, each worker is a process of its own and holds the next scan.

    python -m benchmarks.large_volume_memory                                  # unet_segmentation, 512x512x400
    python -m benchmarks.large_volume_memory --bundle dnet_segmentation --shape 256 256 200
    python -m benchmarks.large_volume_memory --spacing 0.7 0.7 1.25 -- --sw_batch_size 8   # overrides after --
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_volume(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    """Smooth blobs plus noise in CT units, written as uncompressed NIfTI (reading time is not the point)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    coarse = rng.normal(0.0, 400.0, size=tuple(max(2, s // 32) for s in shape)).astype(np.float32)
    volume = np.empty(shape, np.int16)
    index = [np.minimum((np.arange(s) * c) // s, c - 1) for s, c in zip(shape, coarse.shape)]
    for z in range(shape[2]):  # slice by slice: the volume is never held as floats
        plane = coarse[np.ix_(index[0], index[1], [index[2][z]])][..., 0]
        volume[:, :, z] = np.clip(plane + rng.normal(0.0, 30.0, size=plane.shape), -1000, 2000)
    nib.save(nib.Nifti1Image(volume, np.diag([*spacing, 1.0])), str(path))


def random_checkpoint(bundle: str, path: Path, overrides: dict) -> None:
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / bundle / "configs" / "inference.json")
    parser.update(overrides)
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)


def _pairs(extra: list[str]) -> dict:
    """``--key value`` overrides (as strings; enough for the network's own keys such as in_channels)."""
    import json

    out = {}
    for key, value in zip(extra[::2], extra[1::2]):
        try:
            out[key.lstrip("-")] = json.loads(value)
        except ValueError:
            out[key.lstrip("-")] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_volume_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="unet_segmentation")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="voxel size in mm")
    parser.add_argument("--ckpt", help="model.pt to use (default: a randomly initialised one)")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--workdir", help="keep the volume, outputs and log here (default: a temporary folder)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then config overrides: --key value ...")
    args = parser.parse_args()
    extra = [a for a in args.overrides if a != "--"]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        (work / "in").mkdir(parents=True, exist_ok=True)
        shape, spacing = tuple(args.shape), tuple(args.spacing)
        t0 = time.perf_counter()
        write_volume(work / "in" / "large.nii", shape, spacing)
        ckpt = Path(args.ckpt) if args.ckpt else work / "root" / "models" / "model.pt"
        if not args.ckpt:
            random_checkpoint(args.bundle, ckpt, _pairs(extra))
        print(f"volume {shape} at {spacing} mm written in {time.perf_counter() - t0:.0f} s; model: "
              f"{ckpt if args.ckpt else 'randomly initialised'}", flush=True)

        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                   str(REPO / "bundles" / args.bundle / "configs" / "inference.json"),
                   "--dataset_dir", str(work / "in"), "--output_dir", str(work / "out"),
                   "--bundle_root", str(work / "root"), "--ckpt_path", str(ckpt),
                   "--num_workers", str(args.num_workers), "--overwrite", "True", *extra]
        log = work / "inference.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(log.read_text()[-4000:])
            raise SystemExit(f"inference failed with exit status {proc.returncode}")

        import nibabel as nib

        out_shape = nib.load(str(work / "out" / "large_seg.nii.gz")).shape
        voxels = shape[0] * shape[1] * shape[2]
        print(f"bundle {args.bundle}, input {shape} ({voxels / 1e6:.1f} M voxels, {spacing} mm), "
              f"num_workers {args.num_workers}, overrides {extra or 'none'}")
        print(f"peak RSS of the inference process: {usage.ru_maxrss / 1024:.0f} MB; wall time {wall:.0f} s "
              f"(process start, model load, read, preprocess, infer, invert, write); output shape {out_shape}")
        if out_shape != shape:
            raise SystemExit("the output does not have the input's shape")


if __name__ == "__main__":
    main()
