# SPDX-License-Identifier: Apache-2.0
"""Batch inference from the command line, for pipelines:

    python -m bundletools.infer <bundle> <input_dir> <output_dir> [--overwrite] [--qc] [--<config key> <value> ...]

``<bundle>`` is a bundle name of this repository (``unet_segmentation``) or the folder of a bundle. This is
exactly ``python -m monai.bundle run --config_file <bundle>/configs/inference.json --dataset_dir <input_dir>
--output_dir <output_dir>``, with the bundle's logging configuration; any other config key
is an override (``--ckpt_path /models/best.pt``, ``--num_workers 4``). Under ``torchrun`` the processes split the
cases. Exit status: 0 when every case was segmented or already complete, 2 when a case failed (the report says
which and why), 1 when the run could not start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["infer", "main"]


def _bundle_folder(bundle: str | os.PathLike) -> Path:
    from . import bundle_path

    path = Path(bundle)
    if (path / "configs" / "inference.json").is_file():
        return path.resolve()
    if os.sep in str(bundle):
        raise FileNotFoundError(f"{path}: not a bundle folder (no configs/inference.json)")
    return Path(bundle_path(str(bundle)))


def infer(bundle: str, input_dir: str, output_dir: str, overwrite: bool = False, qc: bool = False,
          **overrides: Any) -> None:
    """Segment every scan of ``input_dir`` (files and DICOM series folders) into ``output_dir``.

    Args:
        bundle: bundle name or folder.
        input_dir: folder of scans, or an MSD folder (``imagesTr/`` and ``imagesTs/``).
        output_dir: folder of ``<case>_seg.nii.gz``, ``report.json`` and ``report.csv``.
        overwrite: redo cases whose outputs already exist (otherwise they are skipped).
        qc: also write ``<case>_qc.png``.
        overrides: other config keys of the bundle's ``inference.json``.
    """
    from monai.bundle import run

    root = _bundle_folder(bundle)
    configs = root / "configs"
    overrides.setdefault("bundle_root", str(root))
    run(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), dataset_dir=str(input_dir), output_dir=str(output_dir),
        overwrite=bool(overwrite), qc=bool(qc), **overrides)


def main() -> None:
    import fire

    fire.Fire(infer)


if __name__ == "__main__":
    main()
