# SPDX-License-Identifier: Apache-2.0
"""Write every bundle's configs from the shared templates plus the bundle's own ``spec.json``.

MONAI Label reads one inference file and one training file per bundle, so each bundle must ship complete
configs; writing them by hand would mean five copies of the same transforms, handlers and workflows drifting
apart. Instead ``bundletools/templates/`` holds what all bundles share and ``bundles/<name>/spec.json`` says what
is different about one bundle:

- ``common``: top-level keys written into both ``train.json`` and ``inference.json`` (``network_def``,
  ``roi_size``, ...);
- ``train``, ``inference``, ``evaluate``, ``multi_gpu_train``: overrides of single config ids, written as MONAI
  ids (``"train#random_transforms#0#spatial_size"``) or new top-level keys;
- ``metadata``: merged key by key into the metadata template.

``python -m bundletools.generate`` rewrites every bundle's ``configs/``; ``--check`` only reports files that are
out of date (a test runs it, so a template or spec edit without regeneration fails CI).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from monai.bundle.utils import ID_SEP_KEY

_LEGACY_SEP = "#"

__all__ = ["render_bundle", "generate", "main"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
CONFIG_FILES = ("train", "evaluate", "inference", "multi_gpu_train")
_COMMON_INTO = ("train", "inference")
_PLACEHOLDER_NAME = "BUNDLE_NAME"


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


def _set_id(config: dict, config_id: str, value: Any, where: str) -> dict:
    parts = config_id.replace(_LEGACY_SEP, ID_SEP_KEY).split(ID_SEP_KEY)
    if len(parts) == 1:
        return _set_top_level(config, config_id, value)
    node: Any = config
    for depth, part in enumerate(parts[:-1]):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as e:
            raise KeyError(f"{where}: {config_id!r} does not exist in the template (at {part!r})") from e
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def render_bundle(bundle_dir: Path) -> dict[str, str]:
    """Text of every generated file of the bundle, keyed by its path relative to the bundle folder."""
    name = bundle_dir.name
    spec_path = bundle_dir / "spec.json"
    spec = _load(spec_path)
    unknown = set(spec) - {"common", "metadata", *CONFIG_FILES}
    if unknown:
        raise KeyError(f"{spec_path}: unknown section(s) {sorted(unknown)}")
    files: dict[str, str] = {}
    for config_name in CONFIG_FILES:
        config = _replace_name(_load(TEMPLATES / f"{config_name}.json"), name)
        if config_name in _COMMON_INTO:
            for key, value in spec.get("common", {}).items():
                config = _set_top_level(config, key, copy.deepcopy(value))
        for config_id, value in spec.get(config_name, {}).items():
            config = _set_id(config, config_id, copy.deepcopy(value), f"{spec_path} [{config_name}]")
        if "NETWORK_DEF" in json.dumps(config):
            raise KeyError(f"{spec_path}: 'common' must define network_def")
        files[f"configs/{config_name}.json"] = json.dumps(config, indent=4) + "\n"
    metadata = _merge(_replace_name(_load(TEMPLATES / "metadata.json"), name), spec.get("metadata", {}))
    files["configs/metadata.json"] = json.dumps(metadata, indent=4) + "\n"
    files["configs/logging.conf"] = (TEMPLATES / "logging.conf").read_text()
    files["LICENSE"] = (TEMPLATES.parents[1] / "LICENSE").read_text()
    return files


def generate(bundles_dir: Path = BUNDLES, check: bool = False) -> list[Path]:
    """Write (or with ``check``, only compare) the generated files; returns the paths that were out of date."""
    stale = []
    for spec in sorted(bundles_dir.glob("*/spec.json")):
        for rel, text in render_bundle(spec.parent).items():
            path = spec.parent / rel
            if path.is_file() and path.read_text() == text:
                continue
            stale.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report out-of-date files (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = generate(check=args.check)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
