# SPDX-License-Identifier: Apache-2.0
"""The per-case loop of a batch: read, infer, write; a case's failure is that case's alone.

:class:`CaseLoop` runs the cases one process was given, in three overlapping stages:

1. DataLoader workers check each next case's header (:class:`InputLimits`: size, also once resampled, geometry,
   detached data files), hash the input and read and preprocess it; a failure there comes back as the case's
   reason instead of an exception;
2. ``parallel`` compute threads infer and postprocess (:class:`Predictor`) and let each output's writer take
   what it needs (:meth:`bundletools.writers.Writer.write`);
3. one writer thread writes the case's outputs through :class:`bundletools.outputs.OutputFolder` (temporary names,
   ``fsync``, renames, the completeness record) while the compute threads go on with the next cases; at most
   ``2 * parallel`` cases are held in memory.

An optional output (the DICOM SEG) that cannot be made fails only itself: the case keeps its other outputs and is
``partial``. Every other failure fails the case, whose outputs from earlier runs are removed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

from transforms import InvalidImageError, SliceAxisLastd

from .images import DEFAULT_MAX_VOXELS, DatasetError, check_resampled_size, input_checksum, input_fingerprint, \
    inspect_image
from .inferers import stitches_on_device
from .outputs import OutputFolder
from .report import FAILED, PARTIAL, SUCCEEDED, BatchReport, printable, utc_now
from .settings import ConfigError, ExecutionSettings
from .writers import Output

__all__ = ["CaseLoop", "InputLimits", "Predictor", "failure_reason"]

logger = logging.getLogger("bundletools.batch")

_MAX_REASON = 400
_READ = "cannot read the image"


def failure_reason(error: BaseException, source: str | os.PathLike | None = None, stage: str = "failed") -> str:
    """A one-line reason for a failed case, ``<input name>: <problem>``, without a traceback, printable.

    MONAI wraps errors raised inside a transform chain (``applying transform ...``); the innermost one says what
    is wrong, after ``stage``, unless an error of the system (a full disk, a read-only file system) comes first:
    that one is the reason, whatever it was raised while handling. The input checks
    (:class:`transforms.InvalidImageError`, :class:`DatasetError`) already say what is wrong and are kept as they
    are. ITK's source locations and line breaks are dropped, and characters that could break a report or a log
    line are escaped (:func:`bundletools.report.printable`).
    """
    def inner(e: BaseException) -> BaseException | None:
        if isinstance(e, OSError) and e.errno is not None:
            return None
        return e.__cause__ or (None if e.__suppress_context__ else e.__context__)

    chain, seen = [error], {id(error)}
    while (nxt := inner(chain[-1])) is not None and id(nxt) not in seen:
        chain.append(nxt)
        seen.add(id(nxt))
    root = chain[-1]
    message = " ".join(str(root).split())
    message = re.sub(r"\S+\.(?:cxx|cpp|h|hxx):\d+:\s*", "", message)  # ITK: "/path/itkNrrdImageIO.cxx:935:"
    message = re.sub(r"\(0x[0-9a-f]+\)", "", message)
    if isinstance(root, (InvalidImageError, DatasetError)):
        reason = message
    else:
        reason = f"{stage} ({type(root).__name__}: {message})" if message else f"{stage} ({type(root).__name__})"
    if source is not None:  # every reason starts with the input's name
        name = Path(source).name
        if reason.startswith(str(source)):
            reason = name + reason[len(str(source)):]
        elif not reason.startswith(name):
            reason = f"{name}: {reason}"
    reason = printable(reason)
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def _load_stage(error: BaseException) -> str:
    """"cannot read the image" when the error comes from ``LoadImage`` (or ``transforms.LoadImageSeriesd``), else
    "preprocessing failed"."""
    e: BaseException | None = error
    while e is not None:
        if "LoadImage" in str(e):
            return _READ
        e = e.__cause__ or e.__context__
    return "preprocessing failed"


def _raise(error: Exception, path: Path) -> None:
    """A file writer that fails with ``error``: that of an optional output whose writer could not even start."""
    raise error


class InputLimits:
    """Which inputs are read: checked from the header, before any voxel is (in the DataLoader workers).

    Args:
        max_voxels: the largest input (voxels times channels, from its header) that is read, also once resampled
            to ``pixdim``; larger ones fail without being read. ``None``: no limit.
        pixdim: the spacing (mm) the preprocessing resamples to (its ``Spacingd``), per axis after the orientation
            to RAS; an entry of 0 keeps that axis's spacing. With it, ``max_voxels`` is checked against the
            resampled size, from the header, before the resampling allocates it. ``None``: the input's size only.
        preprocessing: the inference preprocessing; when it moves the thickest axis last
            (``transforms.SliceAxisLastd``), ``pixdim`` applies after that move.
    """

    def __init__(self, max_voxels: int | None = DEFAULT_MAX_VOXELS, pixdim: Sequence[float] | None = None,
                 preprocessing: Any = None) -> None:
        try:
            self.max_voxels = None if max_voxels is None else int(max_voxels)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"max_voxels must be a whole number of voxels or null, got {max_voxels!r}") from e
        try:
            self.pixdim = None if pixdim is None else tuple(float(v) for v in pixdim)
        except (TypeError, ValueError):
            self.pixdim = ()
        if self.pixdim is not None and len(self.pixdim) != 3:
            raise ConfigError(f"pixdim must be three numbers (mm; 0 keeps an axis's spacing), got {pixdim!r}")
        transforms = getattr(preprocessing, "transforms", ())
        self.slice_axis_last = any(isinstance(t, SliceAxisLastd) for t in transforms)

    def check(self, source: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        """Raise :class:`DatasetError` naming the problem when ``source`` must not be read."""
        header = inspect_image(source, root=root, max_voxels=self.max_voxels)
        if self.pixdim is not None and self.max_voxels is not None:
            check_resampled_size(source, header, self.pixdim, self.max_voxels, self.slice_axis_last)

    def describe(self) -> dict:
        return {"max_voxels": self.max_voxels, "pixdim": list(self.pixdim) if self.pixdim is not None else None}


def _first(sample: Any) -> Any:
    """DataLoader ``collate_fn``: cases are processed one at a time, uncollated (a module-level function so that
    worker processes can pickle it)."""
    return sample


class _Loading(torch.utils.data.Dataset):
    """The cases to do, checked, checksummed, read and preprocessed (in DataLoader workers when there are any).

    Never raises: a case that cannot be loaded comes back as ``{"index", "error", "traceback", "seconds"}``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, indices: list[int], image_key: str,
                 limits: InputLimits) -> None:
        self.dataset, self.indices, self.image_key, self.limits = dataset, indices, image_key, limits

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        item = self.dataset.data[index]
        source = item.get(self.image_key)
        start = time.perf_counter()
        stage = _READ
        try:
            checksums = {}
            if isinstance(source, (str, os.PathLike)):
                self.limits.check(source, item.get("root"))
                fingerprint = input_fingerprint(source)  # before the checksum: a later change moves it
                checksums = {"input_sha256": input_checksum(source), "input_fingerprint": fingerprint}
            stage = ""
            data = self.dataset[index]
            return {"index": index, "data": data, **checksums, "seconds": time.perf_counter() - start}
        except Exception as e:  # any failure of this case is its result, not the batch's
            return {"index": index, "error": failure_reason(e, source, stage or _load_stage(e)),
                    "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}


class Predictor:
    """Infers and postprocesses one preprocessed case: what a compute thread does.

    Args:
        network: what the inferer runs (a module, or a wrapper such as the ONNX Runtime network).
        inferer: MONAI inferer called as ``inferer(image_batch, network)``. Inputs stay on the CPU when it has an
            ``sw_device`` (sliding-window and slice inferers move each window batch to the device), so only
            windows occupy device memory, unless the case is stitched on the device as a whole.
        postprocessing: applied to ``{image_key: image, pred_key: network output}`` (a MetaTensor carrying the
            image's metadata); must leave every output on the input's grid (e.g. with ``Invertd``).
        execution: the device and mixed precision.
    """

    def __init__(self, network: Callable, inferer: Callable, postprocessing: Callable | None,
                 execution: ExecutionSettings, image_key: str = "image", pred_key: str = "pred") -> None:
        self.network, self.inferer, self.postprocessing = network, inferer, postprocessing
        self.device, self.autocast = execution.device, execution.autocast
        self.image_key, self.pred_key = image_key, pred_key

    def __call__(self, data: dict) -> dict:
        image = data[self.image_key]
        inputs = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))[None]
        on_device = stitches_on_device(self.inferer, inputs.shape[2:].numel())
        if on_device:
            inputs = inputs.to(self.device)
        with torch.no_grad():
            with self.autocast():
                try:
                    logits = self.inferer(inputs, self.network)
                except torch.cuda.OutOfMemoryError:
                    if not (on_device and getattr(self.inferer, "sw_device", None) is not None):
                        raise
                    # the case did not fit for stitching on the device after all (other cases in flight, another
                    # process): stitch it in CPU memory, windows still on the device
                    logger.info("out of device memory for stitching this case there; stitching it on the CPU")
                    inputs = inputs.cpu()
                    self.free_device_memory()
                    logits = self.inferer(inputs, self.network, device=torch.device("cpu"))
            if isinstance(logits, (list, tuple)):  # deep supervision heads: the first is the prediction
                logits = logits[0]
            del inputs
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            ops = list(image.applied_operations) if isinstance(image, MetaTensor) else []
            data[self.pred_key] = MetaTensor(logits[0].float(), meta=meta, applied_operations=ops)
            del logits, image
            return data if self.postprocessing is None else self.postprocessing(data)

    def free_device_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _Progress:
    """The ``[n/total]`` of the log lines, counted as cases finish (in any thread)."""

    def __init__(self, total: int) -> None:
        self.total, self._count, self._lock = total, 0, threading.Lock()

    def step(self, case: str) -> str:
        with self._lock:
            self._count += 1
            return f"[{self._count}/{self.total}] {printable(case)}"


class CaseLoop:
    """Segments the cases of one process; see the module docstring.

    Args:
        dataset: the MONAI ``Dataset`` of the run (``dataset.data[i]`` the case, ``dataset[i]`` preprocessed).
        limits: which inputs are read.
        predict: infers and postprocesses a preprocessed case.
        outputs: the declared outputs.
        folder: the locked output folder.
        report: makes the cases' records.
        num_workers: DataLoader workers.
        parallel: cases in flight.
    """

    def __init__(self, dataset: Any, limits: InputLimits, predict: Predictor, outputs: Mapping[str, Output],
                 folder: OutputFolder, report: BatchReport, num_workers: int, parallel: int) -> None:
        self.dataset, self.limits, self.predict, self.outputs = dataset, limits, predict, outputs
        self.folder, self.report, self.num_workers, self.parallel = folder, report, num_workers, parallel
        self.optional = [name for name, output in outputs.items() if output.writer.optional]

    def run(self, indices: list[int], names: list[str], rank: int, model_sha256: str) -> list[dict]:
        """The records of the cases ``indices`` (``names``: every case's output name), in their order."""
        self.names, self.rank, self.model_sha256 = names, rank, model_sha256
        self.progress = _Progress(len(indices))
        self.slots = threading.Semaphore(2 * self.parallel)  # cases held in memory, loaded to written
        loader = torch.utils.data.DataLoader(_Loading(self.dataset, indices, self.predict.image_key, self.limits),
                                             batch_size=None, shuffle=False, num_workers=self.num_workers,
                                             collate_fn=_first)
        samples = iter(loader)  # forks the DataLoader workers before this run starts any thread
        compute = ThreadPoolExecutor(self.parallel, thread_name_prefix="batch-case")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="batch-write")
        results: list[Future] = []
        try:
            for sample in samples:
                self.slots.acquire()
                results.append(compute.submit(self._case, sample))
            return [future.result().result() for future in results]  # write futures, in submission order
        finally:
            compute.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True, cancel_futures=True)

    def _case(self, sample: dict) -> Future:
        """Infer and postprocess one loaded case (in a compute thread), then hand its outputs to the writer
        thread; returns the future of the case's record. Never raises: a failure is the case's record."""
        handed_off = False
        try:
            future = self._compute(sample)
            handed_off = True
            return future
        finally:
            if not handed_off:
                self.slots.release()

    def _compute(self, sample: dict) -> Future:
        index, start = sample["index"], time.perf_counter()
        source = self.dataset.data[index][self.predict.image_key]
        reason, files = sample.get("error", ""), {}
        if not reason:
            try:
                files = self._files(self.predict(sample.pop("data")), source)
            except Exception as e:  # this case failed; the batch goes on
                reason = failure_reason(e, source, "segmentation failed")
                sample["traceback"] = traceback.format_exc()
                self.predict.free_device_memory()
        sample.pop("data", None)
        seconds = sample["seconds"] + time.perf_counter() - start
        if reason:
            done: Future = Future()
            done.set_result(self._failed(index, source, reason, sample.get("traceback", ""), seconds, sample))
            self.slots.release()
            return done
        return self.writer.submit(self._write, index, source, files, seconds, sample)

    def _files(self, case: dict, source: Any) -> dict[str, Callable[[Path], None]]:
        """The file writer of each output this case has."""
        files = {}
        for name, output in self.outputs.items():
            if not output.writer.applies(source):
                continue
            try:
                files[name] = output.writer.write(case, source)
            except Exception as e:
                if not output.writer.optional:
                    raise
                files[name] = partial(_raise, e)  # fails only this output, when the folder writes it
        return files

    def _checksums(self, sample: dict) -> dict:
        return {"input_sha256": sample.get("input_sha256", ""), "model_sha256": self.model_sha256}

    def _failed(self, index: int, source: Any, reason: str, trace: str, seconds: float, sample: dict) -> dict:
        case = self.names[index]
        logger.debug(f"case {printable(case)}:\n{trace}")
        logger.warning(f"{self.progress.step(case)}: FAILED: {reason}")
        self.folder.discard(case)
        return self.report.record(index, case, source, FAILED, reason, seconds=seconds, rank=self.rank,
                                  **self._checksums(sample))

    def _write(self, index: int, source: Any, files: dict, seconds: float, sample: dict) -> dict:
        """Write the case's outputs (in the writer thread); returns its record."""
        case, start = self.names[index], time.perf_counter()
        provenance = {"case": printable(case), "input": printable(source), **self._checksums(sample),
                      "input_fingerprint": sample.get("input_fingerprint", ""), "written": utc_now()}
        try:
            written, problems = self.folder.write(case, files, provenance, optional=self.optional)
        except Exception as e:
            return self._failed(index, source, failure_reason(e, source, "writing the outputs failed"),
                                traceback.format_exc(), seconds + time.perf_counter() - start, sample)
        finally:
            self.slots.release()
        total = seconds + time.perf_counter() - start
        record = partial(self.report.record, index, case, source, outputs=written, seconds=total, rank=self.rank,
                         **self._checksums(sample))
        step = self.progress.step(case)
        if problems:  # an optional output could not be made: the case keeps its other outputs
            reason = "; ".join(failure_reason(e, source, f"{self.outputs[name].writer.title} was not written")
                               for name, e in problems.items())
            for e in problems.values():
                logger.debug(f"case {printable(case)}:\n"
                             + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
            logger.warning(f"{step}: segmented in {total:.1f} s, but {reason}")
            return record(PARTIAL, reason, counts_as_failed=any(self.outputs[name].required for name in problems))
        logger.info(f"{step}: segmented in {total:.1f} s")
        return record(SUCCEEDED)
