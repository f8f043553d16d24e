# SPDX-License-Identifier: Apache-2.0
"""The bundles of this repository, found instead of listed: every folder under ``bundles/`` that has a ``spec.json``.

The config generator, the tests and the benchmarks ask here (and the batch runner's lookup by name can), so a new
bundle is a new folder (``spec.json``, its card, the configs generated from the spec) and no list to extend.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

__all__ = ["bundle_dir", "bundle_names", "bundles_dir", "default_task", "short_names"]

SPEC = "spec.json"


def bundles_dir() -> Path:
    """``bundles/`` of this checkout (read at each call: ``bundletools.REPO_ROOT`` says where the checkout is)."""
    from . import REPO_ROOT

    return REPO_ROOT / "bundles"


def bundle_names(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the bundles in ``root`` (default :func:`bundles_dir`), sorted: its folders with a ``spec.json``."""
    root = Path(root) if root is not None else bundles_dir()
    return sorted(spec.parent.name for spec in root.glob(f"*/{SPEC}"))


def bundle_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of the bundle ``name`` in ``root`` (default :func:`bundles_dir`); a ``FileNotFoundError`` names
    the bundles there are."""
    root = Path(root) if root is not None else bundles_dir()
    if name in ("", ".", "..") or Path(name).name != name or not (root / name / SPEC).is_file():
        raise FileNotFoundError(f"no bundle {name!r} in {root}; the bundles are {', '.join(bundle_names(root))}")
    return root / name


def default_task(name: str) -> str:
    """The folder name of the bundle's default task (``Task04_Hippocampus``), so the data a benchmark gives a bundle
    follow its spec: the ``<task>`` of the ``dataset_dir`` its ``train.json`` defaults to, which must be
    ``$bundletools.default_dataset_dir('<task>')`` (read, not evaluated: no torch or MONAI needed)."""
    path = bundle_dir(name) / "configs" / "train.json"
    expression = str(json.loads(path.read_text(encoding="utf-8")).get("dataset_dir", ""))
    try:
        call = ast.parse(expression.removeprefix("$"), mode="eval").body
        if ast.unparse(call.func) == "bundletools.default_dataset_dir" and len(call.args) == 1 and not call.keywords:
            return ast.literal_eval(call.args[0])
    except (SyntaxError, ValueError, AttributeError):
        pass
    raise ValueError(f"{path}: dataset_dir {expression!r} names no task; it must default to "
                     "$bundletools.default_dataset_dir('<task folder name>')")


def short_names() -> dict[str, str]:
    """Bundle name -> the short name the benchmarks give it (``unet-bundle``, the ``dnet`` entry): the first word of
    the name, or the name without ``_segmentation`` where another bundle's name starts with the same word."""
    names = bundle_names()
    first = {name: name.split("_")[0] for name in names}
    shared = {word for word in first.values() if list(first.values()).count(word) > 1}
    return {name: name.removesuffix("_segmentation") if first[name] in shared else first[name] for name in names}
