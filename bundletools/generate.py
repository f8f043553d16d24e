# SPDX-License-Identifier: Apache-2.0
"""Write every bundle's configs from the shared templates plus the bundle's own ``spec.json``.

MONAI Label reads one inference file and one training file per bundle, so each bundle must ship complete
configs; writing them by hand would mean five copies of the same transforms, handlers and workflows drifting
apart. Instead ``bundletools/templates/`` holds what all bundles share and ``bundles/<name>/spec.json`` says what
is different about one bundle, in four kinds of entries:

- ``common``: top-level keys written into both ``train.json`` and ``inference.json`` (``network_def``,
  ``roi_size``, ...); a key the template lacks goes just before ``network_def``.
- ``train``, ``evaluate``, ``inference``, ``multi_gpu_train``: config ids to set, written the MONAI way
  (``"epochs"``, ``"validate#inferer#roi_size"``) and applied with MONAI's own :class:`ConfigParser`. A nested id
  must exist in the template, or be a new argument of a component or a new entry of ``outputs`` (a bundle's own
  output, ``"outputs#uncertainty"``); a typo is an error. Ids never address a list item by position
  (``"preprocessing#transforms#5"`` is refused): lists grow through extension points.
- ``extend``: per config file, the items of its named extension points. A template list holds a point as the item
  ``{"_extension_": "<name>"}``; the generator replaces it with the spec's items, or with nothing. The points are
  listed in :data:`EXTENSION_POINTS` (e.g. ``before_network_input``: preprocessing after the intensity
  normalisation, before the final type conversion).
- ``metadata``: merged into the metadata template: dicts key by key; a top-level list (``references``) is the
  spec's items followed by the template's items the spec does not have; other values (nested lists such as
  shapes too) replaced. It must give the bundle's ``version`` (``MAJOR.MINOR.PATCH``) and its ``changelog``
  (version -> what changed, newest first, with an entry for ``version``): :mod:`bundletools.versions`.

Every generated JSON file starts with a ``_generated_`` key saying where it comes from (MONAI, MONAI Label and
``monai.bundle`` ignore a key that no workflow refers to); ``logging.conf`` starts with a comment.

``bundletools-generate`` (or ``python -m bundletools.generate``) rewrites the ``configs/`` of every bundle (every
folder of ``bundles/`` with a ``spec.json``, :mod:`bundletools.bundles`); ``--check`` only compares and prints a
unified diff of every out-of-date file, and names every bundle whose configs changed without a new version (tests
run both, so a template or spec edit without regeneration, or without a version bump, fails);
``--record-versions`` regenerates and then records each bundle's version and configs hash in
``bundles/versions.json`` (:mod:`bundletools.versions`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import sys
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.utils import ID_SEP_KEY

from .bundles import bundle_names, bundles_dir
from .versions import SEMVER, VersionError, record_versions, version_key, version_problems

__all__ = ["render_bundle", "generate", "main", "EXTENSION_POINTS", "GENERATED_KEY"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
CONFIG_FILES = ("train", "evaluate", "inference", "multi_gpu_train")
_COMMON_INTO = ("train", "inference")
_PLACEHOLDER_NAME = "BUNDLE_NAME"
_LEGACY_SEP = "#"
_EXTENSION_KEY = "_extension_"
GENERATED_KEY = "_generated_"
_OPEN_MAPPINGS = ("outputs",)  # mappings a spec may add entries to, besides a component's arguments

# extension point -> where it sits; a spec may fill only these (checked against the templates by a test)
EXTENSION_POINTS = {
    "train": {
        "after_orientation": "train#deterministic_transforms, after Orientationd (both image and label)",
        "before_network_input": "train#deterministic_transforms, after NormalizeIntensityd, before EnsureTyped",
        "after_spatial_augmentation": "train#random_transforms, after RandFlipd, before the intensity augmentation",
        "initialize": "initialize, after set_determinism",
    },
    "inference": {
        "after_orientation": "preprocessing, after Orientationd",
        "before_network_input": "preprocessing, after NormalizeIntensityd, before EnsureTyped",
    },
    "multi_gpu_train": {
        "initialize": "initialize, after the process group and set_determinism",
    },
    "evaluate": {},
}


def _load(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _replace_name(obj: Any, name: str) -> Any:
    if isinstance(obj, str):
        return obj.replace(_PLACEHOLDER_NAME, name)
    if isinstance(obj, dict):
        return {k: _replace_name(v, name) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_name(v, name) for v in obj]
    return obj


def _is_extension(item: Any) -> bool:
    return isinstance(item, dict) and _EXTENSION_KEY in item


def _fill_extensions(obj: Any, fill: dict[str, list], used: set[str], where: str) -> Any:
    """Replace every ``{"_extension_": name}`` list item with ``fill[name]`` (or nothing)."""
    if isinstance(obj, dict):
        if _EXTENSION_KEY in obj:
            raise ValueError(f"{where}: extension point {obj[_EXTENSION_KEY]!r} must be an item of a list")
        return {k: _fill_extensions(v, fill, used, where) for k, v in obj.items()}
    if isinstance(obj, list):
        out = []
        for item in obj:
            if _is_extension(item):
                name = item[_EXTENSION_KEY]
                used.add(name)
                out.extend(copy.deepcopy(fill.get(name, [])))
            else:
                out.append(_fill_extensions(item, fill, used, where))
        return out
    return obj


def _set_top_level(config: dict, key: str, value: Any) -> dict:
    """Set ``key``; a key the template lacks goes just before ``network_def`` so related settings stay together."""
    if key in config or "network_def" not in config:
        config[key] = value
        return config
    out = {}
    for k, v in config.items():
        if k == "network_def":
            out[key] = value
        out[k] = v
    return out


def _set_ids(config: dict, overrides: dict[str, Any], where: str) -> dict:
    """Apply ``{id: value}`` with MONAI's ConfigParser; top-level keys keep their place (or go before network_def)."""
    nested = {}
    for config_id, value in overrides.items():
        parts = config_id.replace(_LEGACY_SEP, ID_SEP_KEY).split(ID_SEP_KEY)
        if any(part.isdigit() for part in parts):
            raise KeyError(f"{where}: {config_id!r} addresses a list item by its position; fill an extension point "
                           f"({', '.join(sorted(set().union(*map(set, EXTENSION_POINTS.values()))))}) or set the "
                           "whole list")
        if len(parts) == 1:
            config = _set_top_level(config, config_id, copy.deepcopy(value))
        else:
            nested[config_id] = value
    parser = ConfigParser(config)
    for config_id, value in nested.items():
        parent, _, last = config_id.replace(_LEGACY_SEP, ID_SEP_KEY).rpartition(ID_SEP_KEY)
        try:
            container = parser[parent]
        except (KeyError, IndexError, ValueError) as e:
            raise KeyError(f"{where}: {config_id!r} does not exist in the template (no {parent!r})") from e
        # a new key only as an argument of a component (a misspelt one fails when it is instantiated) or an entry of
        # an open mapping
        if not isinstance(container, dict) or (last not in container and "_target_" not in container
                                               and parent not in _OPEN_MAPPINGS):
            raise KeyError(f"{where}: {config_id!r} does not exist in the template; new keys go at the top level")
        parser[config_id] = copy.deepcopy(value)
    return parser.get()


def _merge(base: Any, extra: Any, top: bool = True) -> Any:
    """Metadata merge: dicts key by key; a top-level list (``references``) as ``extra``'s items followed by
    ``base``'s missing ones; anything else, including nested lists (shapes, value ranges), replaced by ``extra``."""
    if isinstance(base, dict) and isinstance(extra, dict):
        out = copy.deepcopy(base)
        for k, v in extra.items():
            out[k] = _merge(out[k], v, top=False) if k in out else copy.deepcopy(v)
            if top and isinstance(out[k], list) and isinstance(base.get(k), list) and isinstance(v, list):
                out[k] = copy.deepcopy(v) + [copy.deepcopy(x) for x in base[k] if x not in v]
        return out
    return copy.deepcopy(extra)


def _check_release(metadata: dict, where: str) -> None:
    """The spec's ``version`` and ``changelog``: a ``MAJOR.MINOR.PATCH`` version with its entry, newest first."""
    version, changelog = metadata.get("version"), metadata.get("changelog")
    if not isinstance(version, str) or not SEMVER.match(version):
        raise ValueError(f"{where}: metadata.version must be the bundle's version, MAJOR.MINOR.PATCH (not "
                         f"{version!r}); bump it whenever the bundle's configs change")
    if not isinstance(changelog, dict) or version not in changelog or not str(changelog[version]).strip():
        raise ValueError(f"{where}: metadata.changelog must have an entry for version {version}, saying what changed")
    bad = [v for v in changelog if not SEMVER.match(str(v))]
    if bad:
        raise ValueError(f"{where}: metadata.changelog keys must be versions MAJOR.MINOR.PATCH, not {bad}")
    if list(changelog) != sorted(changelog, key=version_key, reverse=True) or list(changelog)[0] != version:
        raise ValueError(f"{where}: metadata.changelog must list the versions newest first, starting with {version}")


def _generated_note(name: str, template: str) -> str:
    return (f"Generated by `python -m bundletools.generate` from bundles/{name}/spec.json and "
            f"bundletools/templates/{template} of monai-segmentation-bundles. In that repository edit those two and "
            "regenerate (the generator overwrites edits made here, and a test fails until then); a copy of the "
            "bundle folder outside it may be edited freely. For one run, override on the command line instead "
            "(--<key> <value>).")


def _dump(config: dict, note: str) -> str:
    return json.dumps({GENERATED_KEY: note, **config}, indent=4) + "\n"


def render_bundle(bundle_dir: Path) -> dict[str, str]:
    """Text of every generated file of the bundle, keyed by its path relative to the bundle folder."""
    name = bundle_dir.name
    spec_path = bundle_dir / "spec.json"
    spec = _load(spec_path)
    unknown = set(spec) - {"common", "metadata", "extend", *CONFIG_FILES}
    if unknown:
        raise KeyError(f"{spec_path}: unknown section(s) {sorted(unknown)}")
    extend = spec.get("extend", {})
    for config_name, points in extend.items():
        known = EXTENSION_POINTS.get(config_name)
        if known is None:
            raise KeyError(f"{spec_path} [extend]: no config file {config_name!r}; one of {list(CONFIG_FILES)}")
        for point, items in points.items():
            if point not in known:
                raise KeyError(f"{spec_path} [extend][{config_name}]: no extension point {point!r}; "
                               f"{config_name}.json has {sorted(known) or 'none'}")
            if not isinstance(items, list):
                raise TypeError(f"{spec_path} [extend][{config_name}][{point}]: must be a list of items")
    files: dict[str, str] = {}
    for config_name in CONFIG_FILES:
        where = f"{spec_path} [{config_name}]"
        config = _replace_name(_load(TEMPLATES / f"{config_name}.json"), name)
        used: set[str] = set()
        config = _fill_extensions(config, extend.get(config_name, {}), used, where)
        missing = used ^ set(EXTENSION_POINTS[config_name])
        if missing:  # the templates and EXTENSION_POINTS must agree
            raise RuntimeError(f"templates/{config_name}.json and EXTENSION_POINTS disagree on {sorted(missing)}")
        if config_name in _COMMON_INTO:
            for key, value in spec.get("common", {}).items():
                config = _set_top_level(config, key, copy.deepcopy(value))
        config = _set_ids(config, spec.get(config_name, {}), where)
        if "NETWORK_DEF" in json.dumps(config):
            raise KeyError(f"{spec_path}: 'common' must define network_def")
        files[f"configs/{config_name}.json"] = _dump(config, _generated_note(name, f"{config_name}.json"))
    metadata = _merge(_replace_name(_load(TEMPLATES / "metadata.json"), name), spec.get("metadata", {}))
    _check_release(metadata, f"{spec_path} [metadata]")
    files["configs/metadata.json"] = _dump(metadata, _generated_note(name, "metadata.json"))
    files["configs/logging.conf"] = (
        f"# {_generated_note(name, 'logging.conf')}\n" + (TEMPLATES / "logging.conf").read_text()
    )
    files["LICENSE"] = (TEMPLATES.parents[1] / "LICENSE").read_text()
    return files


def generate(root: Path | None = None, check: bool = False) -> list[tuple[Path, str]]:
    """Write (or with ``check``, only compare) the generated files of every bundle in ``root`` (default: this
    checkout's ``bundles/``); returns ``(path, unified diff)`` of every file that was out of date (the diff from the
    file on disk to the generated text)."""
    root = Path(root) if root is not None else bundles_dir()
    stale = []
    for name in bundle_names(root):
        for rel, text in render_bundle(root / name).items():
            path = root / name / rel
            old = path.read_text() if path.is_file() else ""
            if old == text:
                continue
            diff = "".join(difflib.unified_diff(old.splitlines(keepends=True), text.splitlines(keepends=True),
                                                fromfile=f"{path} (on disk)", tofile=f"{path} (generated)"))
            stale.append((path, diff))
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bundletools-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="only compare: print a diff of every out-of-date file (exit 1 if any)")
    parser.add_argument("--record-versions", "--record_versions", dest="record_versions", action="store_true",
                        help="after writing, record each bundle's version and configs hash in bundles/versions.json "
                             "(refused for a bundle whose configs changed under the version already recorded)")
    parser.add_argument("--bundles_dir", type=Path, default=None,
                        help="the folder of the bundles (default: bundles/ of this checkout)")
    args = parser.parse_args(argv)
    if args.check and args.record_versions:
        parser.error("--check only compares; --record-versions writes: give one of them")
    root = args.bundles_dir or bundles_dir()
    if not bundle_names(root):
        parser.error(f"no bundles (folders with a spec.json) in {root}; pass --bundles_dir")
    stale = generate(root, check=args.check)
    for path, diff in stale:
        if args.check:
            print(f"out of date: {path}")
            print(diff)
        else:
            print(f"wrote: {path}")
    if args.check and stale:
        print(f"{len(stale)} file(s) out of date: run `bundletools-generate` (or `python -m bundletools.generate`)")
    if args.record_versions:
        try:
            changed = record_versions(root)
        except VersionError as e:
            print(f"bundletools-generate: error: {e}", file=sys.stderr)
            return 1
        for name in changed:
            print(f"recorded: {name}")
        return 0
    problems = version_problems(root) if args.check else []
    for problem in problems:
        print(f"version: {problem}")
    return 1 if (args.check and (stale or problems)) else 0


if __name__ == "__main__":
    sys.exit(main())
