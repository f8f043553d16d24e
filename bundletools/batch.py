# SPDX-License-Identifier: Apache-2.0
"""Batch inference for pipelines: segment every case of a folder, robustly, resumably, on one or N processes.

:class:`BatchInference` is the ``evaluator`` of every bundle's ``inference.json``; ``python -m monai.bundle run``
calls its :meth:`~BatchInference.run`. It is the loop over the cases; the output folder (lock, temporary names,
atomic replacement, completeness) is :class:`bundletools.outputs.OutputFolder`, the report and its merge across
ranks :class:`bundletools.report.BatchReport`, the file writers :mod:`bundletools.writers`. For each case it
checks the scan's header (:func:`bundletools.images.inspect_image`: size, geometry, detached data files), reads
and preprocesses it (in DataLoader workers), runs the bundle's ``inferer`` and ``postprocessing`` and writes
``<output_dir>/<case>_<postfix>.nii.gz`` for each declared output. What it adds to MONAI's evaluator:

- one bad case never stops the batch: a read error, an image the model cannot take (``transforms.CheckImaged``),
  a geometry the output could not keep, or a failure during inference or writing is recorded as that case's
  one-line reason and the batch goes on;
- a case is skipped when its outputs all exist and were made from the same input (SHA-256) by the same model
  (SHA-256 of the weights), so an interrupted batch resumes and a corrected scan is segmented again
  (``overwrite`` redoes every case);
- ``report.json`` and ``report.csv`` in ``output_dir``: per case its status (``succeeded``, ``skipped``,
  ``partial``: segmented but without its DICOM SEG, ``failed``), reason, outputs, checksums and seconds; every
  other entry of the input folder as ``ignored`` with its reason; the run's bundle, config, model and software
  versions. The run exits with status 2 when a case failed (or lacks its DICOM SEG), 3 when the report could not
  be written to ``output_dir`` (it is then in a temporary folder named on stderr);
- under ``torchrun`` (``WORLD_SIZE`` > 1) the cases still to do are split between the processes (gloo on the
  CPU, NCCL on GPUs) and their reports merged by rank 0;
- an optional QC picture per case (``<case>_qc.png``, see :mod:`bundletools.qc`);
- an optional DICOM SEG per case read from a DICOM series (``<case>_seg.dcm``, see :mod:`bundletools.dicomseg`).
- speed on CPUs: ``parallel_cases`` cases are inferred and postprocessed at once, each in a thread with its share
  of torch's threads (small 3D convolutions use one core better than two, and one case's Python-bound steps run
  beside another's network), while one writer thread compresses and syncs the finished cases; ``runtime=
  "onnxruntime"`` runs the network exported to ONNX (:mod:`bundletools.runtime`).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import platform
import re
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.transforms import Invertd

from transforms import InvalidImageError, SliceAxisLastd

from .data import case_name
from .images import (DEFAULT_MAX_VOXELS, DatasetError, check_resampled_size, input_checksum, input_fingerprint,
                     inspect_image)
from .inferers import stitches_on_device
from .outputs import LOCK_NAME, STATE_DIR, TMP_PREFIX, BatchError, OutputFolder
from .report import FAILED, PARTIAL, SKIPPED, SUCCEEDED, BatchReport, printable
from .writers import WRITERS

__all__ = ["BatchInference", "ConfigError", "failure_reason", "SUCCEEDED", "SKIPPED", "PARTIAL", "FAILED",
           "TMP_PREFIX", "LOCK_NAME"]

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
DEFAULT_OUTPUTS = {"pred": {"postfix": "seg", "dtype": "uint8"}}
DICOM_SEG = "dicom_seg"  # the output key of the DICOM SEG of a case read from a DICOM series
_MAX_REASON = 400
_READ = "cannot read the image"
EXIT_FAILED, EXIT_NO_REPORT = 2, 3  # a case failed; the report is not in output_dir


class ConfigError(BatchError, ValueError):
    """A setting of the runner has a value it cannot take; the message names the key (the batch cannot start)."""


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
    """"cannot read the image" when the error comes from ``LoadImage`` (or ``transforms.LoadScand``), else
    "preprocessing failed"."""
    e: BaseException | None = error
    while e is not None:
        if "LoadImage" in str(e) or "LoadScand" in str(e):
            return _READ
        e = e.__cause__ or e.__context__
    return "preprocessing failed"


def _numpy(x: Any) -> np.ndarray:
    return (x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)).detach().cpu().numpy()


def _flag(value: Any, name: str) -> bool:
    """A boolean setting as given in a config or on a command line: ``True``/``False``, or ``"true"``/``"false"``
    in any case (``python -m monai.bundle`` passes ``--qc false`` as the string ``"false"``)."""
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _whole(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < minimum:
        raise ConfigError(f"{name} must be a {'positive' if minimum else 'non-negative'} whole number, got {value!r}")
    return int(value)


def _pixdim(value: Any) -> tuple[float, ...] | None:
    try:
        pixdim = None if value is None else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pixdim = ()
    if pixdim is not None and len(pixdim) != 3:
        raise ConfigError(f"pixdim must be three numbers (mm; 0 keeps an axis's spacing), got {value!r}")
    return pixdim


def _raise(error: Exception, path: Path) -> None:
    """A writer that fails with ``error``: that of an output that could not even be prepared."""
    raise error


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# the config files of the run when the command line does not name them (set by ``python -m bundletools.infer``)
RUN_CONFIG_FILES: list[str] = []


def _config_files() -> list[Path]:
    """The config files of this run: :data:`RUN_CONFIG_FILES`, or ``--config_file`` on the command line of
    ``python -m monai.bundle`` (one path or a list), or ``[]``."""
    if RUN_CONFIG_FILES:
        return [Path(f) for f in RUN_CONFIG_FILES if Path(f).is_file()]
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config_file":
            value = argv[i + 1]
            try:
                files = ast.literal_eval(value) if value.lstrip().startswith(("[", "(")) else [value]
            except (ValueError, SyntaxError):
                files = [value]
            return [Path(f) for f in files if Path(str(f)).is_file()]
    return []


class _Progress:
    """The ``[n/total]`` of the log lines, counted as cases finish (in any thread)."""

    def __init__(self, total: int) -> None:
        self.total, self._count, self._lock = total, 0, threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count


def _first(sample: Any) -> Any:
    """DataLoader ``collate_fn``: cases are processed one at a time, uncollated (a module-level function so that
    worker processes can pickle it)."""
    return sample


class _Cases(torch.utils.data.Dataset):
    """The cases to do: header checked (also the size the preprocessing resamples it to), checksummed, read and
    preprocessed (in DataLoader workers when ``num_workers`` > 0).

    Never raises: a case that cannot be loaded comes back as ``{"index", "error", "seconds"}``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, data: list, indices: list[int], image_key: str,
                 max_voxels: int | None, pixdim: tuple[float, ...] | None, slice_axis_last: bool) -> None:
        self.dataset, self.data, self.indices, self.image_key = dataset, data, indices, image_key
        self.max_voxels, self.pixdim, self.slice_axis_last = max_voxels, pixdim, slice_axis_last

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        item = self.data[index]
        source = item.get(self.image_key)
        start = time.perf_counter()
        stage = _READ
        try:
            checksums = {}
            if isinstance(source, (str, os.PathLike)):
                header = inspect_image(source, root=item.get("root"), max_voxels=self.max_voxels)
                if self.pixdim is not None and self.max_voxels is not None:
                    check_resampled_size(source, header, self.pixdim, self.max_voxels, self.slice_axis_last)
                fingerprint = input_fingerprint(source)  # before the checksum: a later change moves it
                checksums = {"input_sha256": input_checksum(source), "input_fingerprint": fingerprint}
            stage = ""
            data = self.dataset[index]
            return {"index": index, "data": data, **checksums, "seconds": time.perf_counter() - start}
        except Exception as e:  # any failure of this case is its result, not the batch's
            return {"index": index, "error": failure_reason(e, source, stage or _load_stage(e)),
                    "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}


class BatchInference:
    """Segment every case of ``dataset`` into ``output_dir``; see the module docstring for the behaviour.

    Args:
        dataset: a MONAI ``Dataset``: ``dataset.data`` is the case list (dicts with ``image_key`` and optionally
            ``case``, the output name, otherwise the file name without extension; ``root``, the input folder that
            detached headers must stay in; ``error``, a reason to fail the case without reading it) and
            ``dataset[i]`` the preprocessed case. ``dataset.data.ignored`` (see
            :func:`bundletools.data.inference_datalist`) lists the other entries of the input folder for the
            report. Its ``transform`` is inverted to draw the QC pictures.
        output_dir: folder of the outputs and of the report (created if needed).
        network: the network, on ``device``.
        inferer: MONAI inferer called as ``inferer(image_batch, network)``. Inputs stay on the CPU when it has an
            ``sw_device`` (sliding-window and slice inferers move each window batch to the device), so only
            windows occupy device memory.
        postprocessing: applied to ``{image_key: image, pred_key: network output}`` (a MetaTensor carrying the
            image's metadata); must leave every key of ``outputs`` on the input's grid (e.g. with ``Invertd``).
        ckpt_path: weights to load before the run (a state dict, or ``{"model": state dict}``); ``None`` keeps
            the network as it is.
        weights_network: the module that takes the checkpoint's weights, when ``network`` wraps it (e.g.
            :class:`networks.wrappers.MonteCarloUncertainty`); default ``network``.
        device: device of the network.
        amp: CUDA automatic mixed precision.
        outputs: ``{key: {"postfix": ..., "dtype": ..., "writer": "image"}}``: which keys of the postprocessed
            case are written, as ``<case>_<postfix><output_ext>`` (or the output's own ``ext``) by the writer of
            :data:`bundletools.writers.WRITERS`. A case is complete when all of them exist.
        image_key, pred_key: keys of the image and of the network output.
        overwrite: redo every case, also those whose outputs are complete.
        qc: also write ``<case>_qc.png`` (part of what makes a case complete).
        qc_key: the output drawn in the QC picture.
        qc_size: side of each of the three QC panels in pixels.
        dicom_seg: also write ``<case>_seg.dcm``, the DICOM SEG of the segmentation (the first output), for each
            case read from a DICOM series (:mod:`bundletools.dicomseg`; needs highdicom and the bundle's
            ``metadata.json``). Part of what makes such a case complete. A SEG that cannot be made fails only the
            SEG: the case keeps its other outputs and is ``partial``, with the SEG's problem as its reason.
        dicom_seg_required: whether a ``partial`` case (no DICOM SEG) makes the exit status 2, as a failed case
            does; ``False``: it is reported, and the exit status ignores it.
        num_workers: DataLoader workers reading and preprocessing the next cases while one is segmented.
        output_ext: extension of the written images.
        max_voxels: the largest input (voxels times channels, from its header) that is read, also once resampled
            to ``pixdim``; larger ones fail without being read. ``None``: no limit.
        pixdim: the spacing (mm) the preprocessing resamples to (its ``Spacingd``), per axis after the orientation
            to RAS and, when the preprocessing has ``transforms.SliceAxisLastd``, with the thickest axis last; an
            entry of 0 keeps that axis's spacing. With it, ``max_voxels`` is checked against the resampled size,
            from the header, before the resampling allocates it. ``None``: the input's size only.
        bundle_root: the bundle's folder, recorded in the report (name, version, config files' checksums).
        exit_on_failure: raise ``SystemExit(2)`` at the end when a case failed (or is ``partial`` and
            ``dicom_seg_required``), ``SystemExit(3)`` when the report could not be written to ``output_dir`` (the
            exit status pipelines check); otherwise :meth:`run` just returns the report.
        dist_timeout_s: timeout of the process group created under torchrun (the last rank to finish waits for
            the others at the end; the torch default of 30 minutes is too short for long batches).
        parallel_cases: cases segmented at the same time, each in a thread of its own (the network and the
            postprocessing of one case run while another's are). ``None``: 2 on a CPU with 2 or more threads,
            otherwise 1; never more than the cases to do (a single scan gets every thread). Each case in flight holds its image, network output and postprocessed outputs in memory:
            set 1 for scans that barely fit once.
        num_threads: CPU threads of the run: while it runs, torch's intra-op threads are
            ``num_threads // parallel_cases`` (so that the cases in flight share the CPU instead of fighting over
            it) and restored afterwards. ``None``: torch's current number (``torch.get_num_threads()``, which
            follows ``OMP_NUM_THREADS``; torchrun sets 1 per process).
        runtime: what runs the network: ``"torch"`` (the module itself) or ``"onnxruntime"`` (the network exported
            to ONNX and run by ONNX Runtime on the CPU; needs the ``onnx`` extra). The exported model is cached
            in ``output_dir/.batch/``, keyed and checked by the checkpoint, the network's structure and the
            exporter's versions (:class:`bundletools.runtime.OnnxRuntimeNetwork`), so only the first run of a
            model exports it.
        onnx_path: with ``runtime="onnxruntime"``, an exported model to run instead (for example from
            ``python -m monai.bundle onnx_export``); it must take the inferer's windows.
    """

    def __init__(
        self,
        dataset: Any,
        output_dir: str | os.PathLike,
        network: torch.nn.Module,
        inferer: Callable,
        postprocessing: Callable | None = None,
        ckpt_path: str | os.PathLike | None = None,
        weights_network: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        amp: bool = False,
        outputs: Mapping[str, Mapping[str, str]] | None = None,
        image_key: str = "image",
        pred_key: str = "pred",
        overwrite: bool = False,
        qc: bool = False,
        qc_key: str = "pred",
        qc_size: int = 256,
        dicom_seg: bool = False,
        dicom_seg_required: bool = True,
        num_workers: int = 0,
        output_ext: str = ".nii.gz",
        max_voxels: int | None = DEFAULT_MAX_VOXELS,
        pixdim: Sequence[float] | None = None,
        bundle_root: str | os.PathLike | None = None,
        exit_on_failure: bool = True,
        dist_timeout_s: float = 24 * 3600,
        parallel_cases: int | None = None,
        num_threads: int | None = None,
        runtime: str = "torch",
        onnx_path: str | os.PathLike | None = None,
    ) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.ckpt_path = ckpt_path
        self.weights_network = network if weights_network is None else weights_network
        self.device = torch.device(device)
        self.amp = _flag(amp, "amp")
        self.outputs = {k: dict(v) for k, v in (outputs or DEFAULT_OUTPUTS).items()}
        for key, spec in self.outputs.items():
            if "postfix" not in spec:
                raise ConfigError(f"output {key!r} needs a 'postfix' (the file name is <case>_<postfix>{output_ext})")
            spec["dtype"] = np.dtype(spec.get("dtype", "float32"))
            spec.setdefault("writer", "image")
            spec.setdefault("ext", output_ext)
            if spec["writer"] not in WRITERS:
                raise ConfigError(f"output {key!r}: unknown writer {spec['writer']!r}; writers: {sorted(WRITERS)}")
        self.image_key, self.pred_key = image_key, pred_key
        self.overwrite, self.qc = _flag(overwrite, "overwrite"), _flag(qc, "qc")
        self.dicom_seg = _flag(dicom_seg, "dicom_seg")
        self.dicom_seg_required = _flag(dicom_seg_required, "dicom_seg_required")
        self.qc_key, self.qc_size = qc_key, int(qc_size)
        self.num_workers = _whole(num_workers, "num_workers", minimum=0)
        self.output_ext = output_ext
        try:
            self.max_voxels = None if max_voxels is None else int(max_voxels)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"max_voxels must be a whole number of voxels or null, got {max_voxels!r}") from e
        self.pixdim = _pixdim(pixdim)
        transforms = getattr(getattr(dataset, "transform", None), "transforms", ())
        self._slice_axis_last = any(isinstance(t, SliceAxisLastd) for t in transforms)
        self.bundle_root = bundle_root
        self.exit_on_failure = exit_on_failure
        self.dist_timeout_s = dist_timeout_s
        self.parallel_cases = None if parallel_cases is None else _whole(parallel_cases, "parallel_cases")
        self.num_threads = None if num_threads is None else _whole(num_threads, "num_threads")
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if runtime == "onnxruntime" and self.device.type != "cpu":
            raise ConfigError(f"runtime 'onnxruntime' runs on the CPU; the device is {self.device}")
        if onnx_path is not None and runtime != "onnxruntime":
            raise ConfigError(f"onnx_path is given ({onnx_path}) but the runtime is {runtime!r}; add runtime "
                              "'onnxruntime' to run the ONNX model")
        self.runtime = runtime
        self.onnx_path = onnx_path
        files = {key: f"_{spec['postfix']}{spec['ext']}" for key, spec in self.outputs.items()}
        if self.qc:
            files["qc"] = "_qc.png"
        if self.dicom_seg:  # <case>_seg.dcm next to <case>_seg.nii.gz
            files[DICOM_SEG] = f"_{self.outputs[next(iter(self.outputs))]['postfix']}.dcm"
        self.folder = OutputFolder(self.output_dir, files)
        self._seg_info: tuple[dict[int, str], Any] | None = None  # segment names, algorithm; set by run()

    # ----------------------------------------------------------------------------------------------- paths
    def case_names(self) -> list[str]:
        """Output name of every case, in dataset order."""
        return [str(item.get("case") or case_name(item[self.image_key])) for item in self.dataset.data]

    def final_paths(self, case: str) -> dict[str, Path]:
        """Where the outputs of ``case`` go (the QC picture under the key ``"qc"`` when enabled)."""
        return self.folder.paths(case)

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        """Segment the cases, write the report, and return it (``{"run", "summary", "cases", "ignored"}``).

        Raises:
            SystemExit: with ``exit_on_failure``, status 3 when the report could not be written to ``output_dir``
                (it is in the temporary folder named on stderr), else status 2 when a case failed or is ``partial``
                and ``dicom_seg_required``.
            BatchError: the batch cannot start (another batch holds the output folder, no model, a bad setting,
                ...).
        """
        started, started_at = time.perf_counter(), _now()
        rank, world, own_group = self._init_distributed()
        report = BatchReport(self.output_dir, [*self.outputs, *([DICOM_SEG] if self.dicom_seg else [])], self.qc)
        threads_before = torch.get_num_threads()
        try:
            model_sha256 = self._load_weights()
            if self.dicom_seg:
                self._seg_info = self._dicom_seg_info(model_sha256)
            self.network.eval()
            names = self.case_names()
            if rank == 0:
                self.folder.lock()
                for name in self.folder.remove_stale():
                    logger.info(f"removed {printable(name)}, left behind by an interrupted run")
                plan = [self._plan(names, model_sha256)]
            else:
                plan = [None]
            if world > 1:
                dist.broadcast_object_list(plan, src=0)
                if rank != 0:
                    self.folder.bind()
            todo, done = plan[0]
            mine = todo[rank::world]
            self._threads = self.num_threads or threads_before
            parallel = self.parallel_cases or (2 if self.device.type == "cpu" and self._threads >= 2 else 1)
            self._parallel = max(1, min(parallel, len(mine)))  # one scan gets every thread
            torch.set_num_threads(max(1, self._threads // self._parallel))
            self._model = self._runnable(model_sha256)
            logger.info(f"batch inference: {len(names)} case(s), {sum(r['status'] == SKIPPED for r in done)} "
                        f"already complete, {len(todo)} to do"
                        + (f", {len(mine)} on rank {rank} of {world}" if world > 1 else "")
                        + f"; outputs in {printable(self.output_dir)}")
            records = (done if rank == 0 else []) + self._segment_all(names, mine, rank, model_sha256)
            records = report.gather(records, rank, world)
            shared = [None]
            if rank == 0:
                problem = self.folder.changed()
                records = self._check_outputs(records, names, problem)
                run = self._run_info(model_sha256, started_at, world)
                ignored = getattr(self.dataset.data, "ignored", [])
                shared = [report.write(records, ignored, len(names), run, time.perf_counter() - started, world,
                                       problem)]
            if world > 1:
                dist.broadcast_object_list(shared, src=0)
            result = shared[0]
        finally:
            torch.set_num_threads(threads_before)
            self._model = None
            self.folder.unlock()
            if own_group and dist.is_initialized():
                dist.destroy_process_group()
        summary = result["summary"]
        if "report_error" in summary:
            if rank == 0:  # the one line a pipeline's log shows even when the report is nowhere to be found
                where = f"the report is in {summary['report_dir']}" if summary["report_dir"] else "no report"
                print(f"bundletools.batch: error: {summary['report_error']}; {where}; {summary[SUCCEEDED]} "
                      f"segmented, {summary[SKIPPED]} skipped, {summary[PARTIAL]} without DICOM SEG, "
                      f"{summary[FAILED]} failed of {summary['cases']} case(s)"
                      + (f"; exit status {EXIT_NO_REPORT}" if self.exit_on_failure else ""), file=sys.stderr)
            if self.exit_on_failure:
                raise SystemExit(EXIT_NO_REPORT)
        if self.exit_on_failure and (summary[FAILED] or (summary[PARTIAL] and self.dicom_seg_required)):
            raise SystemExit(EXIT_FAILED)
        return result

    def _init_distributed(self) -> tuple[int, int, bool]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1, False
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=self.dist_timeout_s))
        return dist.get_rank(), dist.get_world_size(), True

    def _runnable(self, model_sha256: str) -> Callable:
        """What the inferer runs: the network itself, or its ONNX Runtime counterpart."""
        if self.runtime == "torch":
            return self.network
        from networks.wrappers import MonteCarloUncertainty

        from .runtime import OnnxRuntimeNetwork, free_axes

        if isinstance(self.network, MonteCarloUncertainty):
            raise ConfigError("runtime 'onnxruntime' cannot run Monte-Carlo dropout sampling (mc_samples > 0): its "
                              "dropout layers must stay random; use runtime 'torch'")
        return OnnxRuntimeNetwork(self.network, self.output_dir / STATE_DIR, model_sha256,
                                  threads=max(1, self._threads // self._parallel), dynamic_axes=free_axes(self.inferer),
                                  onnx_path=self.onnx_path)

    def _load_weights(self) -> str:
        """Load the checkpoint; returns the SHA-256 of the model: of the checkpoint file, or of the network's
        weights when there is none."""
        target = getattr(self.weights_network, "module", self.weights_network)
        if self.ckpt_path is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(target.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            return digest.hexdigest()
        path = Path(self.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trained model; train the bundle first or pass --ckpt_path <model.pt>")
        try:
            raw = path.read_bytes()
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
                state = state["model"]
            if not isinstance(state, Mapping):
                raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
            target.load_state_dict(state)
        except Exception as e:  # truncated, not a checkpoint, or another network's weights
            message = " ".join(str(e).split())
            raise BatchError(f"{path}: cannot load the model weights (ckpt_path) ({type(e).__name__}: "
                             f"{message[:300]}{'...' if len(message) > 300 else ''})") from e
        return hashlib.sha256(raw).hexdigest()

    def _plan(self, names: list[str], model_sha256: str) -> tuple[list[int], list[dict]]:
        """(indices of the cases to do, records of the cases decided without segmenting them: skipped as complete,
        or failed before reading); every rank gets rank 0's plan."""
        todo, done = [], []
        for index, (case, item) in enumerate(zip(names, self.dataset.data)):
            source = item.get(self.image_key)
            problem = item.get("error") or self.folder.name_problem(case)
            if problem:
                reason = failure_reason(DatasetError(problem), source)
                logger.warning(f"{printable(case)}: FAILED: {reason}")
                self.folder.discard(case)
                done.append(self._record(index, case, FAILED, reason))
                continue
            previous = None if self.overwrite else self.folder.record(case, self._case_keys(source))
            if previous is not None and previous.get("model_sha256") != model_sha256:
                logger.info(f"{printable(case)}: its outputs come from another model; segmenting it again")
            elif previous is not None:
                try:
                    same = (input_fingerprint(source) == previous.get("input_fingerprint")
                            or input_checksum(source) == previous.get("input_sha256"))
                except OSError:
                    same = False
                if same:
                    outputs = {k: p for k, p in self.folder.paths(case).items() if k in self._case_keys(source)}
                    done.append(self._record(index, case, SKIPPED, outputs=outputs,
                                             input_sha256=previous.get("input_sha256", ""),
                                             model_sha256=model_sha256))
                    continue
                logger.info(f"{printable(case)}: its input changed since its outputs were written; segmenting it "
                            "again")
            todo.append(index)
        return todo, done

    # ---------------------------------------------------------------------------------------------- cases
    def _record(self, index: int, case: str, status: str, reason: str = "", outputs: Mapping | None = None,
                seconds: float = 0.0, rank: int = 0, input_sha256: str = "", model_sha256: str = "") -> dict:
        outputs = {k: printable(v) for k, v in (outputs or {}).items()}
        return {"index": index, "case": printable(case), "status": status, "reason": reason,
                "input": printable(self.dataset.data[index][self.image_key]),
                "output": outputs.get(next(iter(self.outputs)), ""),
                "outputs": {k: outputs[k] for k in [*self.outputs, DICOM_SEG] if k in outputs},
                "qc": outputs.get("qc", ""), "seconds": round(seconds, 3), "rank": rank,
                "input_sha256": input_sha256, "model_sha256": model_sha256}

    def _segment_all(self, names: list[str], indices: list[int], rank: int, model_sha256: str) -> list[dict]:
        """Segment the cases ``indices``: DataLoader workers read and preprocess the next cases, ``parallel_cases``
        threads infer and postprocess, one thread writes (gzip and fsync wait on the disk while the next case is
        computed). At most ``2 * parallel_cases`` cases are held in memory at once."""
        cases = _Cases(self.dataset, self.dataset.data, indices, self.image_key, self.max_voxels, self.pixdim,
                       self._slice_axis_last)
        loader = torch.utils.data.DataLoader(cases, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                             collate_fn=_first)
        progress = _Progress(len(indices))
        slots = threading.Semaphore(2 * self._parallel)
        results: list[Future] = []
        samples = iter(loader)  # forks the DataLoader workers before this run starts any thread
        compute = ThreadPoolExecutor(self._parallel, thread_name_prefix="batch-case")
        writer = ThreadPoolExecutor(1, thread_name_prefix="batch-write")
        try:
            for sample in samples:
                slots.acquire()
                results.append(compute.submit(self._case, sample, names, rank, model_sha256, writer, slots, progress))
            return [future.result().result() for future in results]  # write futures, in submission order
        finally:
            compute.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True, cancel_futures=True)

    def _case(self, sample: dict, names: list[str], rank: int, model_sha256: str, writer: ThreadPoolExecutor,
              slots: threading.Semaphore, progress: "_Progress") -> Future:
        """Infer and postprocess one loaded case (in a compute thread), then hand its outputs to the writer;
        returns the future of the case's record. Never raises: a failure is the case's record."""
        index = sample["index"]
        case, source = names[index], self.dataset.data[index][self.image_key]
        start = time.perf_counter()
        handed_off = False
        try:
            future = self._case_steps(sample, index, case, source, start, rank, model_sha256, writer, slots,
                                      progress)
            handed_off = True
            return future
        finally:
            if not handed_off:
                slots.release()

    def _case_steps(self, sample: dict, index: int, case: str, source: Any, start: float, rank: int,
                    model_sha256: str, writer: ThreadPoolExecutor, slots: threading.Semaphore,
                    progress: "_Progress") -> Future:
        provenance = {"case": printable(case), "input": printable(source),
                      "input_sha256": sample.get("input_sha256", ""),
                      "input_fingerprint": sample.get("input_fingerprint", ""), "model_sha256": model_sha256}
        checksums = {"input_sha256": provenance["input_sha256"], "model_sha256": model_sha256}
        reason, writers = sample.get("error", ""), None
        if not reason:
            try:
                writers = self._infer(sample.pop("data"), source)
            except Exception as e:  # this case failed; the batch goes on
                reason = failure_reason(e, source, "segmentation failed")
                sample["traceback"] = traceback.format_exc()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        sample.pop("data", None)
        seconds = sample["seconds"] + time.perf_counter() - start

        def failed(reason: str, trace: str, seconds: float) -> dict:
            logger.debug(f"case {printable(case)}:\n{trace}")
            logger.warning(f"[{progress.next()}/{progress.total}] {printable(case)}: FAILED: {reason}")
            self.folder.discard(case)
            return self._record(index, case, FAILED, reason, seconds=seconds, rank=rank, **checksums)

        def write() -> dict:
            start = time.perf_counter()
            try:
                outputs, problems = self.folder.write(case, writers, {**provenance, "written": _now()},
                                                      optional=[DICOM_SEG])
            except Exception as e:
                return failed(failure_reason(e, source, "writing the outputs failed"), traceback.format_exc(),
                              seconds + time.perf_counter() - start)
            finally:
                slots.release()
            total = seconds + time.perf_counter() - start
            step = f"[{progress.next()}/{progress.total}] {printable(case)}"
            if problems:  # the DICOM SEG could not be made: the case keeps its other outputs
                reason = "; ".join(failure_reason(e, source, "the DICOM SEG was not written")
                                   for e in problems.values())
                for e in problems.values():
                    logger.debug(f"case {printable(case)}:\n"
                                 + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
                logger.warning(f"{step}: segmented in {total:.1f} s, but {reason}")
                return self._record(index, case, PARTIAL, reason, outputs=outputs, seconds=total, rank=rank,
                                    **checksums)
            logger.info(f"{step}: segmented in {total:.1f} s")
            return self._record(index, case, SUCCEEDED, outputs=outputs, seconds=total, rank=rank, **checksums)

        if reason:
            done: Future = Future()
            done.set_result(failed(reason, sample.get("traceback", ""), seconds))
            slots.release()
            return done
        return writer.submit(write)

    def _infer(self, data: dict, source: Any = None) -> dict[str, Callable[[Path], None]]:
        """Infer and postprocess one preprocessed case; returns the writer of each output."""
        image = data[self.image_key]
        inputs = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))[None]
        on_device = stitches_on_device(self.inferer, inputs.shape[2:].numel())
        if on_device:
            inputs = inputs.to(self.device)
        autocast = torch.autocast("cuda") if self.amp and self.device.type == "cuda" else nullcontext()
        with torch.no_grad():
            with autocast:
                try:
                    logits = self.inferer(inputs, self._model)
                except torch.cuda.OutOfMemoryError:
                    if not (on_device and getattr(self.inferer, "sw_device", None) is not None):
                        raise
                    # the case did not fit for stitching on the device after all (other cases in flight, another
                    # process): stitch it in CPU memory, windows still on the device
                    logger.info("out of device memory for stitching this case there; stitching it on the CPU")
                    inputs = inputs.cpu()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    logits = self.inferer(inputs, self._model, device=torch.device("cpu"))
            if isinstance(logits, (list, tuple)):  # deep supervision heads: the first is the prediction
                logits = logits[0]
            del inputs
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            ops = list(image.applied_operations) if isinstance(image, MetaTensor) else []
            data[self.pred_key] = MetaTensor(logits[0].float(), meta=meta, applied_operations=ops)
            del logits, image
            if self.postprocessing is not None:
                data = self.postprocessing(data)
            writers = {}
            for key, spec in self.outputs.items():
                if key not in data:
                    raise KeyError(f"postprocessing produced no {key!r} output")
                writers[key] = WRITERS[spec["writer"]](data[key], spec, data)
            if self.qc:
                writers["qc"] = partial(self._write_qc, data)
            if DICOM_SEG in self._case_keys(source):
                from .dicomseg import segmentation_writer

                names, algorithm = self._seg_info
                labels = data[next(iter(self.outputs))]  # the segmentation: the first declared output
                try:
                    writers[DICOM_SEG] = segmentation_writer(labels, names, algorithm, source=source)
                except Exception as e:  # fails only the SEG, when the folder writes it (OutputFolder.write)
                    writers[DICOM_SEG] = partial(_raise, e)
            return writers

    def _check_outputs(self, records: list[dict], names: list[str], problem: str | None) -> list[dict]:
        """The records as the report must state them: a case whose outputs are gone by now (removed during the
        run, or with the whole output folder, as ``problem`` says) failed, whatever it was before."""
        checked = []
        for record in records:
            if record["status"] in (SUCCEEDED, SKIPPED, PARTIAL):
                paths = self.folder.paths(names[record["index"]])
                keys = [*record["outputs"], *(["qc"] if record["qc"] else [])]
                missing = [] if problem else [paths[k].name for k in keys if not _is_file(paths[k])]
                if problem or missing:
                    why = problem or f"{', '.join(missing)} no longer there: removed during the run"
                    source = self.dataset.data[record["index"]][self.image_key]
                    record = {**record, "status": FAILED, "output": "", "outputs": {}, "qc": "",
                              "reason": failure_reason(DatasetError(f"its outputs are lost: {why}"), source)}
            checked.append(record)
        return checked

    def _case_keys(self, source: Any) -> list[str]:
        """The outputs a case has: all declared ones, and the DICOM SEG when enabled and the input is a series."""
        from .dicomseg import is_dicom_series

        keys = list(self.folder.files)
        if DICOM_SEG in keys and not (isinstance(source, (str, os.PathLike)) and is_dicom_series(source)):
            keys.remove(DICOM_SEG)
        return keys

    def _dicom_seg_info(self, model_sha256: str) -> tuple[dict[int, str], Any]:
        """Segment names and algorithm identification of the DICOM SEGs, from the bundle's ``metadata.json``; a
        :class:`BatchError` when they cannot be had (the run cannot start)."""
        from importlib.util import find_spec

        from .dicomseg import AlgorithmInfo, segment_names

        if find_spec("highdicom") is None:
            raise BatchError("dicom_seg needs highdicom: pip install 'monai-segmentation-bundles[dicom]'")
        path = self._metadata_file()
        if path is None:
            raise BatchError("dicom_seg needs the bundle's configs/metadata.json for the segment names; pass "
                             "bundle_root")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            names = segment_names(meta)
        except (OSError, ValueError) as e:
            raise BatchError(f"{printable(path)}: {e}") from e
        return names, AlgorithmInfo(str(meta.get("name", "")), str(meta.get("version", "")), model_sha256)

    def _metadata_file(self) -> Path | None:
        """The bundle's ``metadata.json``: next to the config that ran, else under ``bundle_root``."""
        configs = _config_files()
        if not configs and self.bundle_root is not None:
            configs = [p for p in [Path(self.bundle_root) / "configs" / "inference.json"] if p.is_file()]
        path = configs[0].parent / "metadata.json" if configs else None
        return path if path is not None and path.is_file() else None

    def _write_qc(self, data: dict, path: Path) -> None:
        from .qc import save_qc_png

        label = data[self.qc_key]
        image = data[self.image_key]
        transform = getattr(self.dataset, "transform", None)
        if transform is not None:  # the preprocessed image back on the input's grid, as the label is
            image = Invertd("_qc_image", transform=transform, orig_keys=self.image_key, nearest_interp=False)(
                {"_qc_image": image, self.image_key: image})["_qc_image"]
        affine = label.meta["affine"] if isinstance(label, MetaTensor) else np.eye(4)
        save_qc_png(_numpy(image)[0].astype(np.float32), _numpy(label)[0].round().astype(np.int32),
                    _numpy(affine).astype(np.float64), path, self.qc_size)

    # --------------------------------------------------------------------------------------------- report
    def _run_info(self, model_sha256: str, started_at: str, world: int) -> dict:
        """What the report records about the run: bundle, config, model, software, command, host."""
        bundle: dict[str, Any] = {"root": printable(self.bundle_root) if self.bundle_root is not None else ""}
        configs = _config_files()
        if not configs and self.bundle_root is not None:
            configs = [p for p in [Path(self.bundle_root) / "configs" / "inference.json"] if p.is_file()]
        if configs:
            try:
                meta = json.loads((configs[0].parent / "metadata.json").read_text(encoding="utf-8"))
                bundle.update(name=meta.get("name", ""), version=meta.get("version", ""))
            except (OSError, ValueError):
                pass
        bundle["config_files"] = {printable(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in configs}
        software = {"python": platform.python_version()}
        for package in ("monai-segmentation-bundles", "torch", "monai", "numpy", "nibabel", "itk", "highdicom",
                        "onnxruntime"):
            try:
                software[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
        settings = {"outputs": {k: {**v, "dtype": str(v["dtype"])} for k, v in self.outputs.items()},
                    "overwrite": self.overwrite, "qc": self.qc, "dicom_seg": self.dicom_seg,
                    "dicom_seg_required": self.dicom_seg_required, "max_voxels": self.max_voxels,
                    "pixdim": list(self.pixdim) if self.pixdim is not None else None,
                    "num_workers": self.num_workers, "device": str(self.device), "amp": self.amp,
                    "parallel_cases": self._parallel, "num_threads": self._threads, "runtime": self.runtime}
        model = {"path": printable(self.ckpt_path) if self.ckpt_path is not None else "", "sha256": model_sha256}
        if self.runtime == "onnxruntime":  # what actually ran: the ONNX models and their checksums
            model["onnx"] = {printable(p): sha for p, sha in getattr(self._model, "models", {}).items()}
        return {"bundle": bundle, "command": printable(" ".join(sys.argv)), "settings": settings, "model": model,
                "software": software, "host": printable(platform.node()), "processes": world,
                "started": started_at}
