# SPDX-License-Identifier: Apache-2.0
"""The batch report: one record per case and per ignored entry of the input folder, merged across ranks.

``report.json`` holds ``run`` (bundle, config, model, software versions, command), ``summary`` (counts, time),
``cases`` (one record per case: status, reason, outputs, checksums, seconds, rank) and ``ignored`` (entries of
the input folder that are not cases, each with its reason); ``report.csv`` has one row per case and per ignored
entry. Names in both, and in the log lines the runner writes, go through :func:`printable`, so a file name that
is not valid UTF-8 or holds a newline can neither break the report nor forge a line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from .outputs import write_text_atomic

__all__ = ["SUCCEEDED", "SKIPPED", "FAILED", "IGNORED", "printable", "BatchReport"]

logger = logging.getLogger("bundletools.batch")

SUCCEEDED, SKIPPED, FAILED, IGNORED = "succeeded", "skipped", "failed", "ignored"
_MAX_LISTED = 20
_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_RANK_PART = re.compile(r"\.report\.rank\d+\.json")


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):  # control, format (bidi), line separators
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def printable(text: object) -> str:
    """``text`` on one line in valid UTF-8: bytes that are not UTF-8 become ``\\xNN``, control and format
    characters ``\\n``, ``\\t``, ``\\xNN`` or ``\\uNNNN``, and a backslash ``\\\\``, so the escaping can be undone.
    Other characters (``Müller``) are kept."""
    text = str(text)
    if text.isprintable() and "\\" not in text and text.isascii():  # the common case
        return text
    return "".join(_escape(c) for c in text)


class BatchReport:
    """Writes ``report.json`` and ``report.csv`` in ``output_dir``.

    Args:
        output_dir: the output folder.
        output_keys: the declared outputs; the first is the ``output`` column, the others get their own columns.
        qc: add a ``qc`` column.
    """

    def __init__(self, output_dir: str | Path, output_keys: Sequence[str], qc: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.output_keys = list(output_keys)
        self.qc = qc

    def gather(self, records: list[dict], rank: int, world: int) -> list[dict] | None:
        """Every rank's records on rank 0 (``None`` on the others); each rank writes its part to
        ``.report.rank<r>.json``, which rank 0 reads and removes."""
        if world <= 1:
            return records
        part = self.output_dir / f".report.rank{rank}.json"
        write_text_atomic(part, json.dumps(records))
        dist.barrier()
        if rank != 0:
            return None
        parts = [self.output_dir / f".report.rank{r}.json" for r in range(world)]
        merged = [rec for p in parts for rec in json.loads(p.read_text(encoding="utf-8"))]
        for p in parts:
            p.unlink()
        return merged

    @staticmethod
    def is_rank_part(name: str) -> bool:
        """Whether ``name`` is a rank's part of the report (left behind by a killed run)."""
        return bool(_RANK_PART.fullmatch(name))

    def write(self, records: list[dict], ignored: Sequence[Mapping], total: int, run: Mapping, seconds: float,
              world: int) -> dict:
        """Write the report of ``total`` cases (``records`` must hold each exactly once) and return it."""
        records = sorted(records, key=lambda r: r["index"])
        if len(records) != total:
            raise RuntimeError(f"report has {len(records)} case(s) for {total} in the dataset")
        counts = {s: sum(r["status"] == s for r in records) for s in (SUCCEEDED, SKIPPED, FAILED)}
        summary = {"cases": total, **counts, IGNORED: len(ignored), "seconds": round(seconds, 3),
                   "cases_per_minute": round(60.0 * counts[SUCCEEDED] / seconds, 3) if seconds > 0 else None,
                   "processes": world, "output_dir": printable(self.output_dir),
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        cases = [{k: v for k, v in r.items() if k != "index"} for r in records]
        ignored = [{"input": printable(e["input"]), "reason": printable(e["reason"])} for e in ignored]
        report = {"run": dict(run), "summary": summary, "cases": cases, "ignored": ignored}
        write_text_atomic(self.output_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(self.output_dir / "report.csv", self._csv(cases, ignored))
        self._log(summary, cases, ignored)
        return report

    def _csv(self, cases: list[dict], ignored: list[dict]) -> str:
        extra = self.output_keys[1:]
        fields = ["case", "status", "reason", "output", "seconds", "input", *extra, *(["qc"] if self.qc else [])]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for case in cases:
            writer.writerow({**case, **{k: case["outputs"].get(k, "") for k in extra}})
        for entry in ignored:
            writer.writerow({"status": IGNORED, **entry})
        return text.getvalue()

    def _log(self, summary: dict, cases: list[dict], ignored: list[dict]) -> None:
        logger.info(f"batch inference: {summary[SUCCEEDED]} segmented, {summary[SKIPPED]} skipped (complete), "
                    f"{summary[FAILED]} failed of {summary['cases']} case(s), {len(ignored)} other entr"
                    f"{'y' if len(ignored) == 1 else 'ies'} ignored, in {summary['seconds']:.1f} s; report: "
                    f"{printable(self.output_dir / 'report.json')}")
        failed = [c for c in cases if c["status"] == FAILED]
        if failed:
            lines = [f"  - {c['case']}: {c['reason']}" for c in failed[:_MAX_LISTED]]
            if len(failed) > _MAX_LISTED:
                lines.append(f"  ... and {len(failed) - _MAX_LISTED} more (see report.json)")
            logger.error("\n".join([f"{len(failed)} case(s) failed:", *lines]))
