# SPDX-License-Identifier: Apache-2.0
"""The batch report: one record per case and per ignored entry of the input folder, merged across ranks.

``report.json`` holds ``run`` (bundle, config, model, software versions, command: :class:`Provenance`, which the
config composes with what it knows of itself), ``summary`` (counts, time),
``cases`` (one record per case: status, reason, outputs, checksums, seconds, rank; ``series``, the
SeriesInstanceUID of a series read from a folder of several) and ``ignored`` (entries of the input folder that are
not cases, each with its reason; ``rule``, the series rule that passed over a DICOM series); ``report.csv`` has
one row per case and per ignored
entry. Names in both, and in the log lines the runner writes, go through :func:`printable`, so a file name that
is not valid UTF-8 or holds a newline can neither break the report nor forge a line; report.csv also prefixes a
cell that a spreadsheet would take for a formula with ``'`` (:func:`csv_cell`).

The report is always written: when the output folder cannot take it (full, read-only, removed or replaced during
the run), it goes to a new temporary folder instead, and ``summary`` says why and where.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import platform
import sys
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import datetime, timezone
from importlib import metadata as distributions
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from .outputs import write_text_atomic

if TYPE_CHECKING:
    from .writers import Output

__all__ = ["SUCCEEDED", "SKIPPED", "PARTIAL", "FAILED", "IGNORED", "QC", "printable", "csv_cell", "utc_now",
           "Provenance", "BatchReport"]

logger = logging.getLogger("bundletools.batch")

SUCCEEDED, SKIPPED, PARTIAL, FAILED, IGNORED = "succeeded", "skipped", "partial", "failed", "ignored"
STATUSES = (SUCCEEDED, SKIPPED, PARTIAL, FAILED)
QC = "qc"  # the output whose file is a record's "qc" field and the last column of report.csv
_RUNNER_KEYS = ("index", "counts_as_failed")  # what the runner keeps in a record and the report leaves out
_SOFTWARE = ("monai-segmentation-bundles", "torch", "monai", "numpy", "nibabel", "itk", "highdicom", "onnxruntime")
_MAX_LISTED = 20
_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):  # control, format (bidi), line separators
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def utc_now() -> str:
    """The time now as the report writes it (UTC, ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def printable(text: object) -> str:
    """``text`` on one line in valid UTF-8: bytes that are not UTF-8 become ``\\xNN``, control and format
    characters ``\\n``, ``\\t``, ``\\xNN`` or ``\\uNNNN``, and a backslash ``\\\\``, so the escaping can be undone.
    Other characters (``Müller``) are kept."""
    text = str(text)
    if text.isprintable() and "\\" not in text and text.isascii():  # the common case
        return text
    return "".join(_escape(c) for c in text)


def csv_cell(value: object) -> object:
    """``value`` as a CSV cell that no spreadsheet evaluates: text starting with ``=``, ``+``, ``-``, ``@``, a tab
    or a carriage return gets a leading ``'`` (OWASP's advice against CSV injection); other values are kept."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


class Provenance:
    """Where a run comes from, as ``run`` of the report records it. The config hands it what it knows of itself.

    Args:
        bundle_root: the bundle's folder.
        config_files: the config files of the run; each is recorded with its SHA-256 (files that do not exist
            are left out).
        metadata: the bundle's ``metadata.json`` (MONAI's ``_meta_``): its name and version are recorded, and
            writers may read it (the DICOM SEG's segment names).
    """

    def __init__(self, bundle_root: str | os.PathLike | None = None,
                 config_files: Sequence[str | os.PathLike] = (), metadata: Mapping[str, Any] | None = None) -> None:
        self.bundle_root = bundle_root
        self.config_files = [Path(f) for f in config_files or ()]
        self.metadata = dict(metadata or {})

    def describe(self, settings: Mapping, model: Mapping, world: int, started: str) -> dict:
        """The report's ``run``: bundle, config, model, software, command, host."""
        bundle: dict[str, Any] = {"root": printable(self.bundle_root) if self.bundle_root is not None else ""}
        if self.metadata:
            bundle.update(name=self.metadata.get("name", ""), version=self.metadata.get("version", ""))
        bundle["config_files"] = {printable(p): hashlib.sha256(p.read_bytes()).hexdigest()
                                  for p in self.config_files if p.is_file()}
        software = {"python": platform.python_version()}
        for package in _SOFTWARE:
            try:
                software[package] = distributions.version(package)
            except distributions.PackageNotFoundError:
                pass
        # the command line is recorded as it was typed, never read for settings (the config hands those over)
        return {"bundle": bundle, "command": printable(" ".join(sys.argv)), "settings": dict(settings),
                "model": dict(model), "software": software, "host": printable(platform.node()), "processes": world,
                "started": started}


class BatchReport:
    """Writes ``report.json`` and ``report.csv`` in ``output_dir``.

    Args:
        output_dir: the output folder.
        outputs: the declared outputs (:func:`bundletools.writers.declare_outputs`); the first is the ``output``
            column, :data:`QC` the ``qc`` column, the others get their own columns (optional ones last).
    """

    def __init__(self, output_dir: str | Path, outputs: Mapping[str, Output]) -> None:
        self.output_dir = Path(output_dir)
        # the outputs every case has first, then the optional ones (which a case may lack), each in declared order
        self.output_keys = sorted(outputs, key=lambda name: outputs[name].writer.optional)
        optional = [output.writer.title for output in outputs.values() if output.writer.optional]
        self.optional = " or ".join(optional) or "an optional output"  # what a partial case lacks

    def record(self, index: int, case: str, source: Any, status: str, reason: str = "",
               outputs: Mapping[str, str | Path] | None = None, seconds: float = 0.0, rank: int = 0,
               input_sha256: str = "", model_sha256: str = "", counts_as_failed: bool = False) -> dict:
        """The record of one case: ``outputs`` are its files (output key -> path); ``counts_as_failed``: a
        partial case that makes the exit status 2 (it lacks a required output)."""
        outputs = {k: printable(v) for k, v in (outputs or {}).items()}
        series = getattr(source, "series_uid", None)  # one series of a folder of several (images.SeriesPath)
        return {"index": index, "case": printable(case), "status": status, "reason": reason,
                "input": printable(source), **({"series": printable(series)} if series else {}),
                "output": outputs.get(self.output_keys[0], ""),
                "outputs": {k: outputs[k] for k in self.output_keys if k in outputs and k != QC},
                "qc": outputs.get(QC, ""), "seconds": round(seconds, 3), "rank": rank,
                "input_sha256": input_sha256, "model_sha256": model_sha256, "counts_as_failed": counts_as_failed}

    def listed(self, record: Mapping) -> list[str]:
        """The outputs ``record`` lists as written (output keys)."""
        return [*record["outputs"], *([QC] if record["qc"] else [])]

    def gather(self, records: list[dict], rank: int, world: int) -> list[dict] | None:
        """Every rank's records on rank 0 (``None`` on the others), sent through the process group, so that
        merging needs nothing written to the output folder."""
        if world <= 1:
            return records
        parts: list | None = [None] * world if rank == 0 else None
        dist.gather_object(records, parts, dst=0)
        return [rec for part in parts for rec in part] if parts is not None else None

    def write(self, records: list[dict], ignored: Sequence[Mapping], total: int, run: Mapping, seconds: float,
              world: int, problem: str | None = None) -> dict:
        """Write the report of ``total`` cases (``records`` must hold each exactly once) and return it.

        It goes to the output folder unless ``problem`` says why it must not (the folder was removed or replaced)
        or writing there fails; then to a new temporary folder, and ``summary`` gets ``report_error`` (why) and
        ``report_dir`` (where it is; ``""`` when it could not be written anywhere).
        """
        records = sorted(records, key=lambda r: r["index"])
        if len(records) != total:
            raise RuntimeError(f"report has {len(records)} case(s) for {total} in the dataset")
        counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
        segmented = counts[SUCCEEDED] + counts[PARTIAL]
        summary = {"cases": total, **counts, IGNORED: len(ignored), "seconds": round(seconds, 3),
                   "cases_per_minute": round(60.0 * segmented / seconds, 3) if seconds > 0 else None,
                   "processes": world, "output_dir": printable(self.output_dir),
                   "finished": utc_now()}
        cases = [{k: v for k, v in r.items() if k not in _RUNNER_KEYS} for r in records]
        ignored = [{"input": printable(e["input"]), "reason": printable(e["reason"]),
                    **({"rule": e["rule"]} if e.get("rule") else {})} for e in ignored]
        report = {"run": dict(run), "summary": summary, "cases": cases, "ignored": ignored}
        if problem is None:
            try:
                self._write_files(self.output_dir, report)
                self._log(report, self.output_dir)
                return report
            except OSError as e:
                problem = f"{printable(self.output_dir)}: the report cannot be written there ({e.strerror or e})"
                for name in ("report.json", "report.csv"):  # an earlier run's report must not pass for this one's
                    with suppress(OSError):
                        (self.output_dir / name).unlink(missing_ok=True)
                if (self.output_dir / "report.json").exists():
                    problem += f"; {printable(self.output_dir / 'report.json')} is an earlier run's"
        summary["report_error"] = printable(problem)
        try:
            folder = Path(tempfile.mkdtemp(prefix="batch-report-"))
            summary["report_dir"] = printable(folder)
            self._write_files(folder, report)
        except OSError as e:
            folder = None
            summary["report_dir"] = ""
            summary["report_error"] += f"; nor in a temporary folder ({e.strerror or e})"
        self._log(report, folder)
        return report

    def _write_files(self, folder: Path, report: dict) -> None:
        write_text_atomic(folder / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(folder / "report.csv", self._csv(report["cases"], report["ignored"]))

    def _csv(self, cases: list[dict], ignored: list[dict]) -> str:
        extra = [k for k in self.output_keys[1:] if k != QC]
        qc = [QC] if QC in self.output_keys else []
        fields = ["case", "status", "reason", "output", "seconds", "input", *extra, *qc]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for case in cases:
            row = {**case, **{k: case["outputs"].get(k, "") for k in extra}}
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
        for entry in ignored:
            writer.writerow({"status": IGNORED, **{k: csv_cell(v) for k, v in entry.items()}})
        return text.getvalue()

    def _log(self, report: dict, folder: Path | None) -> None:
        summary, cases = report["summary"], report["cases"]
        ignored = summary[IGNORED]
        where = printable(folder / "report.json") if folder is not None else "not written"
        logger.info(f"batch inference: {summary[SUCCEEDED]} segmented, {summary[SKIPPED]} skipped (complete), "
                    + (f"{summary[PARTIAL]} segmented without {self.optional}, " if summary[PARTIAL] else "")
                    + f"{summary[FAILED]} failed of {summary['cases']} case(s), {ignored} other entr"
                    f"{'y' if ignored == 1 else 'ies'} ignored, in {summary['seconds']:.1f} s; report: {where}")
        for status, title in ((PARTIAL, f"case(s) lack {self.optional}"), (FAILED, "case(s) failed")):
            listed = [c for c in cases if c["status"] == status]
            if listed:
                lines = [f"  - {c['case']}: {c['reason']}" for c in listed[:_MAX_LISTED]]
                if len(listed) > _MAX_LISTED:
                    lines.append(f"  ... and {len(listed) - _MAX_LISTED} more (see report.json)")
                logger.error("\n".join([f"{len(listed)} {title}:", *lines]))
