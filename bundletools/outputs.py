# SPDX-License-Identifier: Apache-2.0
"""The output folder of a batch: its lock, temporary names, atomic replacement, stale files and completeness.

:class:`OutputFolder` owns everything the runner does to ``output_dir`` besides the report:

- **Lock** (``.batch.lock``): one batch at a time. The file is opened without following a symbolic link, never
  truncated or written, and locked with ``flock``; the descriptor is close-on-exec and closed in every process
  forked while it is held (DataLoader workers), so the lock dies with the process that took it.
- **Writes**: each output of a case is written under a short temporary name (``.tmp-<pid>-<n><ext>``, whatever the
  case name's length), flushed to disk (``fsync``), then renamed into place; the folder is synced after the
  renames. A case's outputs are only ever seen complete under their final names.
- **Completeness**: next to the outputs, ``.batch/<digest>.json`` records which input (its SHA-256) and which
  model (SHA-256 of the weights) produced them. It is removed before a case's outputs are replaced and written
  after, so a case is complete only when all its outputs exist and its record matches the current input and model.
- **Stale files**: temporary files and rank reports of a killed run are removed (safe: the lock is held).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import stat
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

try:  # advisory lock on the output folder (POSIX); without it, concurrent runs are simply not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["BatchError", "OutputFolder", "write_text_atomic", "fsync_folder", "LOCK_NAME", "TMP_PREFIX",
           "STATE_DIR"]

logger = logging.getLogger("bundletools.batch")

LOCK_NAME = ".batch.lock"
TMP_PREFIX = ".tmp-"
STATE_DIR = ".batch"
_COUNTER = itertools.count()
_HELD_LOCKS: set[int] = set()


class BatchError(RuntimeError):
    """The batch cannot start (output folder locked or unusable, no model, ...); the message says why."""


def _close_inherited_locks() -> None:
    """In a forked child: close the lock descriptors of the parent, so that its lock dies with it."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames and removals in ``folder`` durable (no-op where folders cannot be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(folder: Path, ext: str = "") -> Path:
    return folder / f"{TMP_PREFIX}{os.getpid()}-{next(_COUNTER)}{ext}"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` through a temporary file, synced, then renamed into place."""
    path = Path(path)
    tmp = _temp_path(path.parent, path.suffix)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _extension(suffix: str) -> str:
    """``".nii.gz"`` of ``"_seg.nii.gz"``: the part writers choose their format by."""
    name = suffix.rsplit("/", 1)[-1]
    for ext in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(ext):
            return name[-len(ext):]
    return os.path.splitext(name)[1]


class OutputFolder:
    """The output folder of a batch; see the module docstring.

    Args:
        path: the folder (created when the lock is taken).
        files: output key -> what follows the case name in the file name (``{"pred": "_seg.nii.gz"}``).
    """

    def __init__(self, path: str | os.PathLike, files: Mapping[str, str]) -> None:
        self.path = Path(path)
        self.files = dict(files)
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------------------------------------- lock
    def lock(self) -> None:
        """Take the folder's lock, or raise :class:`BatchError` naming the folder and the problem."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_NAME
        flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BatchError(f"{path}: is a symbolic link; the lock file must be a plain file: remove the link "
                                 "(nothing was written through it)") from e
            raise BatchError(f"{path}: cannot open the lock file ({e.strerror})") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BatchError(f"{path}: is not a plain file; remove it")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise BatchError(f"{path}: cannot be locked ({e.strerror}); use an output_dir on a file system "
                                     "that supports locks") from e
                raise BatchError(f"{self.path}: another batch inference is writing to this folder; wait for it "
                                 "to finish or use another output_dir") from e
        self._lock_fd = fd
        _HELD_LOCKS.add(fd)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            _HELD_LOCKS.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_stale(self, is_stale: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Remove the temporary files of a killed run (and the files ``is_stale`` names); returns their names.
        Only with the lock held."""
        removed = []
        for folder in (self.path, self.path / STATE_DIR):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.startswith(TMP_PREFIX) or (folder == self.path and is_stale(entry.name)):
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(entry.name)
        return removed

    # --------------------------------------------------------------------------------------------- names
    def paths(self, case: str) -> dict[str, Path]:
        """Final path of each output of ``case``."""
        return {key: self.path / f"{case}{suffix}" for key, suffix in self.files.items()}

    def name_problem(self, case: str) -> str | None:
        """Why the outputs of ``case`` cannot be written under their names (too long), or ``None``."""
        try:
            limit = os.pathconf(self.path if self.path.is_dir() else self.path.parent, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):
            limit = 255
        for path in self.paths(case).values():
            size = len(os.fsencode(path.name))
            if size > limit:
                return (f"the output name {path.name[:40]}...{path.name[-20:]} is {size} bytes long and the file "
                        f"system allows {limit}: shorten the input's name by {size - limit} bytes")
        return None

    def _record_path(self, case: str) -> Path:
        return self.path / STATE_DIR / f"{hashlib.sha256(os.fsencode(case)).hexdigest()[:32]}.json"

    # ----------------------------------------------------------------------------------------- completeness
    def record(self, case: str, keys: Collection[str] | None = None) -> dict | None:
        """What produced the outputs of ``case`` (written by :meth:`write`) when they are all there (those of
        ``keys`` only, when given: the outputs this case has), else ``None``."""
        paths = [p for k, p in self.paths(case).items() if keys is None or k in keys]
        if not all(p.is_file() and p.stat().st_size > 0 for p in paths):
            return None
        try:
            record = json.loads(self._record_path(case).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if record.get("case_bytes") == os.fsencode(case).hex() else None

    # ------------------------------------------------------------------------------------------------ write
    def write(self, case: str, writers: Mapping[str, Callable[[Path], None]], record: Mapping) -> dict[str, Path]:
        """Write every output of ``case`` with its writer (called with a temporary path that has the final
        extension), sync them, rename them into place, then write ``record``; returns their final paths."""
        final = self.paths(case)
        temps: dict[str, Path] = {}
        try:
            for key, write in writers.items():
                temps[key] = _temp_path(self.path, _extension(self.files[key]))
                write(temps[key])
                _fsync_file(temps[key])
            record_path = self._record_path(case)
            record_path.unlink(missing_ok=True)  # the case is incomplete until its new record is written
            for key, tmp in temps.items():
                os.replace(tmp, final[key])
            fsync_folder(self.path)
            record_path.parent.mkdir(exist_ok=True)
            write_text_atomic(record_path, json.dumps({**record, "case_bytes": os.fsencode(case).hex()}, indent=1))
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
        return {key: final[key] for key in writers}
