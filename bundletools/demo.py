# SPDX-License-Identifier: Apache-2.0
"""Synthetic demo data and the quick-start run: no download, no GPU.

``python -m bundletools.demo`` writes a small synthetic MSD-layout dataset to ``data/demo/`` (clearly named as
synthetic), trains the UNet bundle on it for a few epochs, evaluates it and segments its images, printing where
each output went. The volumes imitate the default task's layout (one channel, labels 0 background,
1 anterior, 2 posterior, about 40x48x40 voxels at 1 mm) but hold geometric shapes, not anatomy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["make_synthetic_dataset", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An elongated two-part blob (label 1 'anterior' head, label 2 'posterior' tail) in a noisy background."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-3, 3, size=3)
    radii = np.array([rng.uniform(4, 6), rng.uniform(11, 15), rng.uniform(4, 6)], dtype=np.float32)
    offset = (grid - centre[:, None, None, None]) / radii[:, None, None, None]
    inside = (offset**2).sum(0) <= 1.0
    label = np.zeros(shape, dtype=np.uint8)
    label[inside & (offset[1] >= 0)] = 1
    label[inside & (offset[1] < 0)] = 2
    image = rng.normal(100.0, 15.0, size=shape).astype(np.float32)
    image[label == 1] += 60.0
    image[label == 2] += 35.0
    image *= rng.uniform(0.5, 2.0)  # per-volume intensity scale, as in real MRI
    return image, label


def make_synthetic_dataset(
    out_dir: str | Path, num_cases: int = 16, shape: tuple[int, int, int] = (40, 48, 40), seed: int = 0
) -> Path:
    """Write ``num_cases`` synthetic image/label pairs and a ``dataset.json`` in MSD layout to ``out_dir``."""
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    training = []
    for i in range(num_cases):
        image, label = _synthetic_case(rng, shape)
        name = f"synthetic_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), out / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    spec = {
        "name": "SYNTHETIC demo data",
        "description": "Synthetic shapes made by bundletools.demo for the quick start; not medical images.",
        "tensorImageSize": "3D",
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", "1": "anterior", "2": "posterior"},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(spec, indent=2))
    return out


def _run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="unet_segmentation", help="bundle under bundles/ to run")
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data" / "demo"), help="where the data goes")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "runs" / "demo"), help="where the outputs go")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num_cases", type=int, default=16)
    args = parser.parse_args(argv)

    data_dir = make_synthetic_dataset(args.data_dir, num_cases=args.num_cases)
    print(f"Synthetic demo dataset ({args.num_cases} cases): {data_dir}")
    configs = REPO_ROOT / "bundles" / args.bundle / "configs"
    work = Path(args.work_dir) / args.bundle
    common = ["--dataset_dir", str(data_dir), "--bundle_root", str(configs.parent)]
    dirs = ["--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval")]
    start = time.time()
    monai_bundle = [sys.executable, "-m", "monai.bundle", "run"]
    _run(monai_bundle + ["training", "--config_file", str(configs / "train.json"), "--epochs", str(args.epochs)]
         + common + dirs)
    _run(monai_bundle + ["--config_file", f"['{configs / 'train.json'}','{configs / 'evaluate.json'}']"]
         + common + dirs)
    # --overwrite: a repeated demo may have trained a different model; batch inference would keep the old outputs
    _run(monai_bundle + ["--config_file", str(configs / "inference.json"), "--ckpt_dir", str(work / "models"),
                         "--output_dir", str(work / "segmentations"), "--overwrite", "True"] + common)
    print(f"\nDemo finished in {time.time() - start:.0f} s:")
    print(f"  model:          {work / 'models' / 'model.pt'}")
    print(f"  metrics:        {work / 'eval'} (metrics.csv, *_raw.csv)")
    print(f"  segmentations:  {work / 'segmentations'}")
    print(f"  TensorBoard:    tensorboard --logdir {work / 'eval'}")


if __name__ == "__main__":
    main()
