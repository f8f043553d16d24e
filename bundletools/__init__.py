# SPDX-License-Identifier: Apache-2.0
"""Machinery the bundles share: datalists and data checks, batch inference, handlers, metrics, paths, demo data,
config generation.

Bundle configs reach it as ``$bundletools.<name>`` expressions and ``bundletools.<name>`` targets; the package is
installed (``pip install -e .``), so this works from any working directory, in torchrun workers and in MONAI
Label without ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .batch import BatchInference
from .data import DatasetError, inference_datalist, scoring_split, training_split
from .handlers import ResumableCheckpoint
from .metrics import HausdorffDistanceMM

__all__ = [
    "REPO_ROOT",
    "bundle_path",
    "default_dataset_dir",
    "BatchInference",
    "DatasetError",
    "inference_datalist",
    "training_split",
    "scoring_split",
    "ResumableCheckpoint",
    "HausdorffDistanceMM",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


def bundle_path(name: str) -> str:
    """Folder of the bundle ``name`` in this checkout (the default ``bundle_root`` of every bundle config).

    Configs cannot see their own location, and ``"."`` would put ``models/`` wherever the command was started,
    so the default is the bundle folder itself. MONAI Label and users who copy a bundle elsewhere override
    ``bundle_root``.
    """
    path = REPO_ROOT / "bundles" / name
    if not (path / "configs").is_dir():
        raise FileNotFoundError(f"bundle {name!r} not found at {path}; pass --bundle_root <folder of the bundle>")
    return str(path)


def default_dataset_dir(task: str) -> str:
    """Default ``dataset_dir``: the first existing ``<root>/<task>`` among ``$MONAI_DATA_DIRECTORY``,
    ``<repo>/data`` and ``<repo>/../shared/data``; otherwise ``<repo>/data/<task>``, which the data loader then
    reports as missing. Pass ``--dataset_dir`` to use any other MSD-layout folder."""
    roots = [os.environ.get("MONAI_DATA_DIRECTORY"), REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"]
    for root in roots:
        if root and (Path(root) / task).is_dir():
            return str(Path(root) / task)
    return str(REPO_ROOT / "data" / task)
