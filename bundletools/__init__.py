# SPDX-License-Identifier: Apache-2.0
"""Machinery the bundles share: datalists and data checks, batch inference, handlers, metrics, paths, demo data,
config generation.

Bundle configs reach it as ``$bundletools.<name>`` expressions and ``bundletools.<name>`` targets; the package is
installed (``pip install -e .``), so this works from any working directory, in torchrun workers and in MONAI
Label without ``PYTHONPATH``.

Importing it installs :func:`bundletools.errors.excepthook`: a user error (a missing folder, a bad dataset.json)
that ends ``python -m monai.bundle run`` is printed as one line instead of MONAI's long traceback.

The names below and the submodules (``bundletools.handlers``, ``bundletools.training``, ...) are imported when
first used, so what needs neither torch nor MONAI (the bundle list, ``bundletools.bundles``; the command lines'
``--help``) starts at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from .errors import install_excepthook

__all__ = [
    "REPO_ROOT",
    "bundle_root",
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

install_excepthook()

# name -> the submodule that defines it
_DEFINED_IN = {"BatchInference": "batch", "DatasetError": "data", "inference_datalist": "data",
               "training_split": "data", "scoring_split": "data", "ResumableCheckpoint": "handlers",
               "HausdorffDistanceMM": "metrics"}


def __getattr__(name: str):
    """``bundletools.<name>`` of a name in ``__all__`` or of a submodule, imported on first use."""
    if name in _DEFINED_IN:
        return getattr(importlib.import_module(f"{__name__}.{_DEFINED_IN[name]}"), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _in_checkout() -> bool:
    """Whether the package runs from a checkout of this repository (an editable install), not from site-packages."""
    return (REPO_ROOT / "bundles").is_dir() and (REPO_ROOT / "setup.cfg").is_file()


def bundle_root() -> str:
    """The folder of the bundle whose configs are running: the default ``bundle_root`` of every bundle config.

    It is the folder above ``configs/`` of the first config file of the running MONAI bundle workflow
    (``python -m monai.bundle run ... --config_file <bundle>/configs/train.json``, also under ``torchrun``, or a
    ``ConfigWorkflow``), the same folder MONAI itself puts on ``sys.path`` for a bundle's ``scripts``. So a bundle
    folder copied anywhere keeps its ``models/``, ``eval/`` and ``segmentations/`` in the copy. MONAI Label sets
    ``bundle_root`` itself; outside a workflow (a bare ``ConfigParser``), set ``bundle_root``.

    This is the one place the bundles look into the running process, because a config cannot see its own file:
    MONAI's ``ConfigWorkflow`` (1.5 and 1.6) keeps the folder of its first config file (``config_root_path``) to
    itself, reads the files' contents without their paths and ``metadata.json`` as content (``_meta_``), and puts
    the bundle folder on ``sys.path`` only in ``run()``, after ``bundle_root`` may have been read (MONAI's
    ``bundle_root`` property, ``check_properties``). So the workflow is looked for on the call stack, where it is
    evaluating this expression. Everything else (the runner's config files, metadata, settings) the config hands
    over explicitly.
    """
    import inspect

    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        workflow = frame.f_locals.get("self")
        if isinstance(workflow, ConfigWorkflow) and getattr(workflow, "config_root_path", None) is not None:
            root = Path(workflow.config_root_path)
            return os.path.abspath(root.parent if root.name == "configs" else root)
        frame = frame.f_back
    raise RuntimeError("bundle_root is not set and no MONAI bundle workflow (python -m monai.bundle run, "
                       "ConfigWorkflow) is running to take it from: set bundle_root to the bundle's folder")


def bundle_path(name: str) -> str:
    """Folder of the bundle ``name`` among the package's bundles (:func:`bundletools.bundles.bundle_dir`: this
    checkout's ``bundles/``, or the copy installed with the package; the configs default to :func:`bundle_root`
    instead)."""
    from .bundles import bundle_dir

    return str(bundle_dir(name))


def default_dataset_dir(task: str) -> str:
    """Default ``dataset_dir``: the first existing ``<root>/<task>`` among ``$MONAI_DATA_DIRECTORY``, ``./data``
    and, when the package runs from a checkout of this repository, ``<repo>/data`` and ``<repo>/../shared/data``;
    otherwise ``<first root>/<task>``, which the data loader then reports as missing. Pass ``--dataset_dir`` to use
    any other MSD-layout folder."""
    roots = [os.environ.get("MONAI_DATA_DIRECTORY"), Path.cwd() / "data"]
    if _in_checkout():
        roots += [REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"]
    roots = [Path(r) for r in roots if r]
    for root in roots:
        if (root / task).is_dir():
            return str(root / task)
    return str(roots[0] / task)
