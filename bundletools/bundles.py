# SPDX-License-Identifier: Apache-2.0
"""The bundles, found instead of listed: every folder of a bundles folder that has a ``spec.json``; and a bundle
found by name for the command lines (``bundletools-infer <name>``).

The config generator, the tests and the benchmarks ask here, so a new bundle is a new folder (``spec.json``, its
card, the configs generated from the spec) and no list to extend.

Where the bundles are (:func:`bundles_dir`): ``bundles/`` of this checkout when the package runs from one (also an
editable install), otherwise the copy installed with the package (``bundletools/_bundles/``: setup.py ships
``bundles/`` as package data). :func:`find_bundle` looks a name up in the current folder, then in each folder of
``$BUNDLETOOLS_BUNDLES_PATH``, then there (``python -m bundletools.bundles`` prints what it finds where).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

__all__ = ["BundleNotFoundError", "bundle_dir", "bundle_names", "bundles_dir", "default_task", "find_bundle",
           "search_path", "short_names", "PATH_VARIABLE"]

SPEC = "spec.json"
PATH_VARIABLE = "BUNDLETOOLS_BUNDLES_PATH"
_INSTALLED = Path(__file__).resolve().parent / "_bundles"  # exists only in a non-editable install


class BundleNotFoundError(FileNotFoundError):
    """No bundle of that name or folder; the message says where it looked."""


def bundles_dir() -> Path:
    """The bundles that come with the package: the copy installed with it (``bundletools/_bundles``) where there is
    one, else ``bundles/`` of this checkout (read at each call: ``bundletools.REPO_ROOT`` says where that is)."""
    from . import REPO_ROOT

    return _INSTALLED if _INSTALLED.is_dir() else REPO_ROOT / "bundles"


def search_path() -> list[Path]:
    """The folders :func:`find_bundle` looks a name up in, in order: the current folder, each folder of
    ``$BUNDLETOOLS_BUNDLES_PATH`` (separated by ``os.pathsep``), then :func:`bundles_dir`."""
    extra = [Path(p).expanduser() for p in os.environ.get(PATH_VARIABLE, "").split(os.pathsep) if p.strip()]
    folders: list[Path] = []
    for folder in [Path.cwd(), *extra, bundles_dir()]:
        if folder.resolve() not in [f.resolve() for f in folders]:
            folders.append(folder)
    return folders


def _has(folder: Path, config: str) -> bool:
    return (folder / "configs" / config).is_file()


def find_bundle(bundle: str | os.PathLike, config: str = "inference.json") -> Path:
    """The folder (absolute) of ``bundle``: a bundle folder (relative to the current folder, or absolute: any folder
    with ``configs/<config>``, such as a copy of a bundle) or a bundle name, looked up in :func:`search_path`.

    Raises:
        BundleNotFoundError: neither; the message lists each folder searched and the bundles it has.
    """
    text = os.fspath(bundle)
    path = Path(text).expanduser()
    if _has(path, config):
        return path.resolve()
    if text in ("", ".", "..") or Path(text).name != text:  # a path, not a name
        raise BundleNotFoundError(f"unknown bundle {text!r}: not a bundle folder (no "
                                  f"{path.resolve() / 'configs' / config})")
    for folder in search_path():
        if _has(folder / text, config):
            return (folder / text).resolve()
    looked = "; ".join(f"{folder} ({_listing(folder, config)})" for folder in search_path())
    raise BundleNotFoundError(f"unknown bundle {text!r}: not a bundle folder and no bundle of that name (a folder "
                              f"with configs/{config}) in the current folder, ${PATH_VARIABLE} or the package's "
                              f"bundles; looked in: {looked}")


def _names_with(folder: Path, config: str) -> list[str]:
    try:
        return sorted(p.parent.parent.name for p in folder.glob(f"*/configs/{config}"))
    except OSError:
        return []


def _listing(folder: Path, config: str) -> str:
    if not folder.is_dir():
        return "not a folder"
    return ", ".join(_names_with(folder, config)) or "no bundles"


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


def main() -> None:
    """``python -m bundletools.bundles``: where bundle names are looked up and which bundles each folder has."""
    print(f"bundles are looked up by name in (first match wins; ${PATH_VARIABLE} adds folders):")
    for folder in search_path():
        print(f"  {folder}: {_listing(folder, 'inference.json')}")


if __name__ == "__main__":
    main()
