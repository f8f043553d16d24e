# SPDX-License-Identifier: Apache-2.0
"""The output folder of a batch: its lock, temporary names, atomic replacement, stale files and completeness.

:class:`OutputFolder` owns everything the runner does to ``output_dir`` besides the report:

- **Lock** (``.batch.lock``): one batch at a time. The file is opened without following a symbolic link, never
  truncated or written, and locked with ``flock``; the descriptor is close-on-exec and closed in every process
  forked while it is held (DataLoader workers), so the lock dies with the process that took it. While the run
  holds it, the lock file is how the folder is recognised: a folder removed or replaced during the run (where
  ``.batch.lock`` is gone or another file) is never written to as if it were the locked one
  (:meth:`OutputFolder.changed`).
- **Nothing is followed through a symbolic link:** ``.batch`` must be a folder of its own (a link there stops the
  run), temporary files are created exclusively (a link planted under a temporary name is never written through),
  records and outputs are read without following links, and a link in place of an output or record is replaced
  by the rename, never written through. Nothing outside the folder is written or deleted.
- **Writes**: each output of a case is written under a short temporary name (``.tmp-<pid>-<n><ext>``, whatever the
  case name's length), flushed to disk (``fsync``) and hashed, then renamed into place; the folder is synced after
  the renames. A case's outputs are only ever seen complete under their final names, and a case whose write fails
  leaves none of its outputs under their final names.
- **Completeness**: next to the outputs, ``.batch/<digest>.json`` records which input (its SHA-256) and which
  model (SHA-256 of the weights) produced them, and each output's size and SHA-256. It is removed before a case's
  outputs are replaced and written after, so a case is complete only when its record matches the current input and
  model and every output is the file the record describes (truncated, changed or swapped outputs are not).
- **Stale files**: temporary files of a killed run are removed (safe: the lock is held).
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
from contextlib import suppress
from pathlib import Path

try:  # advisory lock on the output folder (POSIX); without it, concurrent runs are simply not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["BatchError", "OutputFolder", "write_text_atomic", "fsync_folder", "new_temp_file", "read_regular_file",
           "LOCK_NAME", "TMP_PREFIX", "STATE_DIR"]

logger = logging.getLogger("bundletools.batch")

LOCK_NAME = ".batch.lock"
TMP_PREFIX = ".tmp-"
STATE_DIR = ".batch"
_COUNTER = itertools.count()
_HELD_LOCKS: set[int] = set()
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CHUNK = 1 << 20


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


def _open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of the regular file ``path``; a symbolic link or anything else is an ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file ``path``, read without following a symbolic link (``OSError`` otherwise)."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _sync_and_hash(path: Path) -> dict:
    """Flush the just written file ``path`` to disk; returns its size and SHA-256 (read from the page cache)."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        digest, size = hashlib.sha256(), 0
        while block := f.read(_CHUNK):
            digest.update(block)
            size += len(block)
        os.fsync(fd)
    return {"size": size, "sha256": digest.hexdigest()}


def _fingerprint(st: os.stat_result) -> str:
    """Size, device, inode and times of a file: equal fingerprints mean an untouched file (the change time moves
    with any write or rename), so outputs are hashed again only when theirs moved."""
    return f"{st.st_size} {st.st_dev} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}"


def _intact(path: Path, expected: Mapping) -> bool:
    """Whether ``path`` is a regular file (not a link) with the recorded size and SHA-256."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != expected.get("size"):
            return False
        if _fingerprint(st) == expected.get("fingerprint"):
            return True
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as f:
            digest = hashlib.sha256()
            while block := f.read(_CHUNK):
                digest.update(block)
        return digest.hexdigest() == expected.get("sha256")
    except OSError:
        return False


def new_temp_file(folder: Path, ext: str = "") -> Path:
    """A new empty file ``folder/.tmp-<pid>-<n><ext>``, created exclusively: whatever already has that name (a
    link planted there) is never written through."""
    while True:
        path = folder / f"{TMP_PREFIX}{os.getpid()}-{next(_COUNTER)}{ext}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, 0o666))
            return path
        except FileExistsError:
            continue


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` through a temporary file, synced, then renamed into place (a link at
    ``path`` is replaced, not followed)."""
    path = Path(path)
    tmp = new_temp_file(path.parent, path.suffix)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        with suppress(OSError):
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
        # absolute: ITK changes the working directory for a moment whenever it loads one of its modules, which
        # happens in whichever thread first needs it, while other threads write outputs
        self.path = Path(os.path.abspath(path))
        self.files = dict(files)
        self._lock_fd: int | None = None
        self._identity: tuple[int, int] | None = None

    # ---------------------------------------------------------------------------------------------- lock
    def lock(self) -> None:
        """Take the folder's lock, or raise :class:`BatchError` naming the folder and the problem."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_NAME
        flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW
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
        self.bind()
        self._state_dir(create=False)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            _HELD_LOCKS.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None

    def bind(self) -> None:
        """Note the lock file's device and inode, so that :meth:`changed` sees the folder removed or replaced (the
        held lock keeps that inode from being reused). :meth:`lock` does it; the other processes of a torchrun
        batch call it once the folder is locked."""
        st = os.lstat(self.path / LOCK_NAME)
        self._identity = (st.st_dev, st.st_ino)

    def changed(self) -> str | None:
        """Why the folder is no longer the one noted by :meth:`bind` (removed, or replaced by another), or
        ``None``."""
        try:
            st = os.lstat(self.path / LOCK_NAME)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == self._identity:
            return None
        if not self.path.is_dir():
            return f"{self.path}: the output folder was removed during the run"
        return (f"{self.path}: the output folder was replaced during the run (its {LOCK_NAME} is not the one this "
                "run locked)")

    def _state_dir(self, create: bool) -> Path:
        """``.batch``, checked to be a folder of its own; a symbolic link there (which would make the runner delete
        and write files in the link's target) or any other file is a :class:`BatchError`."""
        path = self.path / STATE_DIR
        if create:
            with suppress(FileExistsError):
                path.mkdir()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if create:
                raise
            return path
        if stat.S_ISLNK(st.st_mode):
            raise BatchError(f"{path}: is a symbolic link; the runner keeps its records in the output folder itself: "
                             "remove the link (nothing was deleted or written through it)")
        if not stat.S_ISDIR(st.st_mode):
            raise BatchError(f"{path}: is not a folder; the runner keeps its records there: remove it")
        return path

    def remove_stale(self) -> list[str]:
        """Remove the temporary files of a killed run; returns their names. Only with the lock held."""
        removed = []
        for folder in (self.path, self._state_dir(create=False)):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not entry.name.startswith(TMP_PREFIX) or entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    os.unlink(entry.path)  # a link is removed itself, never its target
                except OSError as e:
                    logger.warning(f"cannot remove {entry.path}, left behind by an interrupted run ({e.strerror})")
                    continue
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
        """What produced the outputs of ``case`` (written by :meth:`write`) when they are all there, each the file
        the record describes (those of ``keys`` only, when given: the outputs this case has), else ``None``."""
        try:
            record = json.loads(read_regular_file(self._record_path(case)).decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("case_bytes") != os.fsencode(case).hex():
            return None
        outputs = record.get("outputs")
        if not isinstance(outputs, dict):  # a record of an older runner, without checksums: redo the case
            return None
        for key, path in self.paths(case).items():
            if keys is not None and key not in keys:
                continue
            expected = outputs.get(key)
            if not isinstance(expected, dict) or expected.get("file") != path.name or not _intact(path, expected):
                return None
        return record

    # ------------------------------------------------------------------------------------------------ write
    def write(self, case: str, writers: Mapping[str, Callable[[Path], None]], record: Mapping,
              optional: Collection[str] = ()) -> tuple[dict[str, Path], dict[str, Exception]]:
        """Write every output of ``case`` with its writer (called with a temporary path that has the final
        extension), sync and hash them, rename them into place, then write ``record`` with their sizes and
        checksums.

        A writer of ``optional`` that raises fails only its output (an earlier file of that name is removed); any
        other failure raises, with none of the case's new outputs left under their final names.

        Returns:
            (final path of each output written, the error of each optional output that was not).
        """
        problem = self.changed()
        if problem is not None:
            raise BatchError(f"{problem}; the case's outputs were not written")
        final = self.paths(case)
        record_path = self._record_path(case)
        temps: dict[str, Path] = {}
        written: dict[str, dict] = {}
        failed: dict[str, Exception] = {}
        renamed: list[Path] = []
        try:
            for key, write in writers.items():
                temps[key] = new_temp_file(self.path, _extension(self.files[key]))
                try:
                    write(temps[key])
                    written[key] = _sync_and_hash(temps[key])
                except Exception as e:
                    if key not in optional:
                        raise
                    failed[key] = e
            self._state_dir(create=True)
            record_path.unlink(missing_ok=True)  # the case is incomplete until its new record is written
            for key in failed:
                final[key].unlink(missing_ok=True)
            for key in written:
                os.replace(temps[key], final[key])
                renamed.append(final[key])
            fsync_folder(self.path)
            for key, path in zip(written, renamed):
                written[key].update(file=path.name, fingerprint=_fingerprint(os.lstat(path)))
            write_text_atomic(record_path, json.dumps({**record, "outputs": written,
                                                       "case_bytes": os.fsencode(case).hex()}, indent=1))
        except BaseException:
            for path in renamed:  # a failed case keeps none of its outputs
                with suppress(OSError):
                    path.unlink()
            raise
        finally:
            for tmp in temps.values():
                with suppress(OSError):
                    tmp.unlink(missing_ok=True)
        return dict(zip(written, renamed)), failed

    def discard(self, case: str) -> None:
        """Remove the outputs and the record of ``case``, which failed: outputs an earlier run made for it came
        from another input or model, or an input that no longer reads, and must not pass for this run's. Nothing
        is removed from a folder that :meth:`changed`."""
        if self.changed() is not None:
            return
        paths = list(self.paths(case).values())
        with suppress(BatchError):  # a .batch that is not the folder's own is never entered
            self._state_dir(create=False)
            paths.append(self._record_path(case))
        for path in paths:
            try:
                path.unlink()  # a link is removed itself, never its target
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    logger.warning(f"cannot remove {path} of a failed case ({e.strerror})")
