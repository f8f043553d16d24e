# SPDX-License-Identifier: Apache-2.0
"""Batch inference from the command line, for pipelines:

    python -m bundletools.infer <bundle> <input_dir> <output_dir> [--overwrite [true|false]] [--qc [true|false]]
                                [--dicom_seg [true|false]] [--tracking mlflow] [--<config key> <value> ...]

``<bundle>`` is the folder of a bundle (a copy anywhere) or a bundle name (``unet_segmentation``), looked up in the
current folder, then in each folder of ``$BUNDLETOOLS_BUNDLES_PATH``, then among the bundles installed with the
package (``python -m bundletools.bundles`` lists them). A bundle needs its trained model: ``models/model.pt`` of its
folder, or ``--ckpt_path``. This is
exactly ``python -m monai.bundle run --config_file <bundle>/configs/inference.json --dataset_dir <input_dir>
--output_dir <output_dir>``, with the bundle's logging configuration; any other key of the bundle's
``inference.json`` is an override (``--ckpt_path /models/best.pt``, ``--num_workers 4``, ``--key=value``), and
``--tracking mlflow`` is MONAI's experiment tracking (:mod:`bundletools.tracking`: one MLflow run per batch; with
``--tracking_uri``, ``--experiment_name``, ``--run_name``).

Values are taken as typed, by the type of the key's default: paths and other strings stay strings (``2024.10``,
``1e3``, ``out,v2``), booleans are ``true`` or ``false`` in any case (``--overwrite`` alone means true), numbers
and lists (``[32,32,8]``) are parsed for keys whose default is one; a value starting with ``$`` or ``@`` is a MONAI
expression or reference. A key the bundle does not have is an error that lists the keys it has.

Under ``torchrun`` the processes split the cases. Exit status: 0 when every case was segmented or already
complete, 2 when a case failed or lacks its DICOM SEG (the report says which and why), 3 when the report could
not be written to the output folder (full, read-only, removed or replaced during the run; stderr names the
temporary folder that holds it), 1 when the run could not start (one line on stderr names the problem: an unknown
bundle or key, a bad value of a key, a missing input folder, a missing or unreadable model, a locked output
folder; the traceback is logged at DEBUG level).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CommandLineError, one_line, user_error

__all__ = ["infer", "main", "parse_command_line", "CommandLineError"]

USAGE = ("usage: python -m bundletools.infer <bundle> <input_dir> <output_dir> [--overwrite [true|false]] "
         "[--qc [true|false]] [--dicom_seg [true|false]] [--tracking mlflow] [--<config key> <value> ...]")
_BOOL_WORDS = ("true", "false")


def _bundle_folder(bundle: str | os.PathLike) -> Path:
    """The bundle's folder: a bundle folder, or a name looked up in the current folder, ``$BUNDLETOOLS_BUNDLES_PATH``
    and the package's bundles (:func:`bundletools.bundles.find_bundle`)."""
    from .bundles import BundleNotFoundError, find_bundle

    try:
        return find_bundle(bundle, "inference.json")
    except BundleNotFoundError as e:
        raise CommandLineError(str(e)) from None


def infer(bundle: str, input_dir: str, output_dir: str, overwrite: bool = False, qc: bool = False,
          tracking: str | None = None, **overrides: Any) -> None:
    """Segment every scan of ``input_dir`` (files and DICOM series folders) into ``output_dir``.

    Args:
        bundle: bundle name or folder.
        input_dir: folder of scans, or an MSD folder (``imagesTr/`` and ``imagesTs/``).
        output_dir: folder of ``<case>_seg.nii.gz``, ``report.json`` and ``report.csv``.
        overwrite: redo every case, also those whose outputs are complete (otherwise they are skipped).
        qc: also write ``<case>_qc.png``.
        tracking: MONAI's ``tracking`` (``"mlflow"``, or a settings file): see :mod:`bundletools.tracking`.
        overrides: other config keys of the bundle's ``inference.json``, as Python values.
    """
    from monai.bundle import run

    root = _bundle_folder(bundle)
    configs = root / "configs"
    overrides.setdefault("bundle_root", str(root))
    overrides.setdefault("config_files", [str(configs / "inference.json")])  # recorded in the report
    if tracking is not None:
        overrides["tracking"] = tracking
    run(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), dataset_dir=str(input_dir), output_dir=str(output_dir),
        overwrite=overwrite, qc=qc, **overrides)


def parse_command_line(argv: Sequence[str]) -> tuple[list[str], dict[str, str | None]]:
    """(positional arguments, ``{key: value as typed, or None for a bare flag}``)."""
    positional: list[str] = []
    options: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            key, has_value, value = arg[2:].partition("=")
            if not has_value:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                takes = nxt is not None and not nxt.startswith("--")
                value = nxt if takes else None
                i += 1 if takes else 0
            if key in options:
                raise CommandLineError(f"--{key} is given twice")
            options[key] = value
        else:
            positional.append(arg)
        i += 1
    return positional, options


def _bool(key: str, text: str | None) -> bool:
    if text is None:
        return True
    if text.strip().lower() not in _BOOL_WORDS:
        raise CommandLineError(f"--{key} takes true or false, not {text!r}")
    return text.strip().lower() == "true"


def _typed(parser: Any, key: str, text: str | None, bundle: str) -> Any:
    """The override ``text`` of ``key`` with the type of the key's default in the bundle's config."""
    if key not in parser:
        keys = sorted(k for k in parser.get() if not k.startswith("_") and k != "imports")
        raise CommandLineError(f"the bundle {bundle} has no config key {key!r}; its keys are {', '.join(keys)} "
                               "(and nested ids such as inferer#roi_size)")
    default = parser[key]
    if isinstance(text, str) and text[:1] in ("$", "@", "%"):
        return text  # a MONAI expression, reference or macro
    if isinstance(default, str) and default[:1] in ("$", "@", "%"):  # an expression: its value says the type
        try:
            default = parser.get_parsed_content(key)
        except Exception:
            default = ""
    if isinstance(default, bool):
        return _bool(key, text)
    if text is None:
        raise CommandLineError(f"--{key} needs a value")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (list, tuple, dict)):
            try:
                value = json.loads(text)
            except ValueError:
                value = ast.literal_eval(text)
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, type(default) if isinstance(default, dict) else list):
                raise ValueError(text)
            return value
    except (ValueError, SyntaxError) as e:
        kind = type(default).__name__
        raise CommandLineError(f"--{key} takes a {'list' if kind == 'tuple' else kind} like its default "
                               f"{json.dumps(default) if not isinstance(default, tuple) else list(default)}, "
                               f"not {text!r}") from e
    if default is None:  # no type to go by: JSON numbers, lists and null are parsed, anything else is a string
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _overrides(root: Path, options: dict[str, str | None], bundle: str) -> dict[str, Any]:
    """The options as typed config values, after checking that the bundle has each key."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = options.get("bundle_root") or str(root)
    for key in ("dataset_dir", "output_dir"):
        if key in options:
            raise CommandLineError(f"--{key}: give the input and output folders as the 2nd and 3rd arguments")
    overrides = {key: _typed(parser, key, text, bundle) for key, text in options.items()}
    parser.update(overrides)
    ckpt = parser.get_parsed_content("ckpt_path") if "ckpt_path" in parser else None
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise CommandLineError(f"no trained model at {ckpt}: train the bundle first or pass --ckpt_path <model.pt>")
    return overrides


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1])
        return
    logging.captureWarnings(True)  # warnings join the run's log (stdout), so stderr holds an error and nothing else
    try:
        positional, options = parse_command_line(argv)
        if len(positional) != 3:
            raise CommandLineError(f"expected <bundle> <input_dir> <output_dir>, got {len(positional)} "
                                   f"argument(s) {positional}; {USAGE}")
        bundle, input_dir, output_dir = positional
        root = _bundle_folder(bundle)
        if not Path(input_dir).is_dir():
            raise CommandLineError(f"the input folder {input_dir!r} does not exist" if not Path(input_dir).exists()
                                   else f"the input {input_dir!r} is not a folder")
        if "tracking" in options and not (options["tracking"] or "").strip():
            raise CommandLineError("--tracking takes mlflow (or a file of tracking settings)")
        tracking = options.pop("tracking", None)
        overrides = _overrides(root, options, bundle)
        infer(str(root), input_dir, output_dir, tracking=tracking, **overrides)
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        logging.getLogger("bundletools.infer").debug("the run could not start", exc_info=True)
        print(f"bundletools.infer: error: {one_line(cause)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
