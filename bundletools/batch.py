# SPDX-License-Identifier: Apache-2.0
"""Batch inference for pipelines: segment every case of a folder, robustly, resumably, on one or N processes.

:class:`BatchInference` is the ``evaluator`` of every bundle's ``inference.json``; ``python -m monai.bundle run``
calls its :meth:`~BatchInference.run`. For each case it reads and preprocesses the scan (in DataLoader workers),
runs the bundle's ``inferer`` and ``postprocessing`` and writes ``<output_dir>/<case>_<postfix>.nii.gz`` for each
declared output under a hidden temporary name, renamed once complete. What it adds to MONAI's evaluator:

- one bad case never stops the batch: a read error, an image the model cannot take (``transforms.CheckImaged``)
  or a failure during inference or writing is recorded as that case's one-line reason and the batch goes on;
- cases whose outputs all exist are skipped (``overwrite`` redoes them), so an interrupted batch resumes;
- ``report.json`` and ``report.csv`` in ``output_dir``: per case its status (``succeeded``, ``skipped``,
  ``failed``), reason, outputs and seconds; the run exits with status 2 when any case failed;
- under ``torchrun`` (``WORLD_SIZE`` > 1) the cases still to do are split between the processes (gloo on the
  CPU, NCCL on GPUs) and their reports merged by rank 0;
- an optional QC picture per case (``<case>_qc.png``, see :mod:`bundletools.qc`).

Only one batch may write to an output folder at a time (a lock file, ``.batch.lock``, enforces it), which makes
it safe to delete the temporary files a killed run left behind.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.transforms import Invertd, SaveImage

from transforms import InvalidImageError

from .data import DatasetError, case_name, check_dicom_series

try:  # advisory lock on the output folder (POSIX); without it, concurrent runs are simply not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["BatchInference", "failure_reason", "SUCCEEDED", "SKIPPED", "FAILED", "TMP_PREFIX"]

logger = logging.getLogger(__name__)

SUCCEEDED, SKIPPED, FAILED = "succeeded", "skipped", "failed"
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".batch.lock"
DEFAULT_OUTPUTS = {"pred": {"postfix": "seg", "dtype": "uint8"}}
_MAX_REASON = 400
_MAX_LISTED = 20


def failure_reason(error: BaseException, source: str | os.PathLike | None = None, stage: str = "failed") -> str:
    """A one-line reason for a failed case, ``<input name>: <problem>``, without a traceback.

    MONAI wraps errors raised inside a transform chain (``applying transform ...``); the innermost one says what
    is wrong, after ``stage``. The input checks (:class:`transforms.InvalidImageError`, :class:`DatasetError`)
    already say what is wrong and are kept as they are. ITK's source locations and line breaks are dropped.
    """
    chain, seen = [error], {id(error)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
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
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def _load_stage(error: BaseException) -> str:
    """"cannot read the image" when the error comes from ``LoadImage``, else "preprocessing failed"."""
    e: BaseException | None = error
    while e is not None:
        if "LoadImage" in str(e):
            return "cannot read the image"
        e = e.__cause__ or e.__context__
    return "preprocessing failed"


def _numpy(x: Any) -> np.ndarray:
    return (x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)).detach().cpu().numpy()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first(sample: Any) -> Any:
    """DataLoader ``collate_fn``: cases are processed one at a time, uncollated (a module-level function so that
    worker processes can pickle it)."""
    return sample


class _Cases(torch.utils.data.Dataset):
    """The cases to do, read and preprocessed (in DataLoader workers when ``num_workers`` > 0).

    Never raises: a case that cannot be loaded comes back as ``{"index", "error", "seconds"}``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, data: list, indices: list[int], image_key: str) -> None:
        self.dataset, self.data, self.indices, self.image_key = dataset, data, indices, image_key

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        source = self.data[index].get(self.image_key)
        start = time.perf_counter()
        try:
            if self.data[index].get("error"):  # known before reading (e.g. two inputs with the same case name)
                raise DatasetError(self.data[index]["error"])
            if source is not None and os.path.isdir(source):
                check_dicom_series(source)
            return {"index": index, "data": self.dataset[index], "seconds": time.perf_counter() - start}
        except Exception as e:  # any failure of this case is its result, not the batch's
            return {"index": index, "error": failure_reason(e, source, _load_stage(e)),
                    "traceback": traceback.format_exc(),
                    "seconds": time.perf_counter() - start}


class BatchInference:
    """Segment every case of ``dataset`` into ``output_dir``; see the module docstring for the behaviour.

    Args:
        dataset: a MONAI ``Dataset``: ``dataset.data`` is the case list (dicts with ``image_key`` and optionally
            ``case``, the output name; otherwise the file name without extension) and ``dataset[i]`` the
            preprocessed case. Its ``transform`` is inverted to draw the QC pictures.
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
        outputs: ``{key: {"postfix": ..., "dtype": ...}}``: which keys of the postprocessed case are written, as
            ``<case>_<postfix><output_ext>`` with that dtype. A case is complete when all of them exist.
        image_key, pred_key: keys of the image and of the network output.
        overwrite: redo cases whose outputs already exist.
        qc: also write ``<case>_qc.png`` (part of what makes a case complete).
        qc_key: the output drawn in the QC picture.
        qc_size: side of each of the three QC panels in pixels.
        num_workers: DataLoader workers reading and preprocessing the next cases while one is segmented.
        output_ext: extension of the written images.
        exit_on_failure: raise ``SystemExit(2)`` at the end when a case failed (the exit status pipelines check);
            otherwise :meth:`run` just returns the report.
        dist_timeout_s: timeout of the process group created under torchrun (the last rank to finish waits for
            the others at the end; the torch default of 30 minutes is too short for long batches).
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
        num_workers: int = 0,
        output_ext: str = ".nii.gz",
        exit_on_failure: bool = True,
        dist_timeout_s: float = 24 * 3600,
    ) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.ckpt_path = ckpt_path
        self.weights_network = network if weights_network is None else weights_network
        self.device = torch.device(device)
        self.amp = bool(amp)
        self.outputs = {k: dict(v) for k, v in (outputs or DEFAULT_OUTPUTS).items()}
        for key, spec in self.outputs.items():
            if "postfix" not in spec:
                raise ValueError(f"output {key!r} needs a 'postfix' (the file name is <case>_<postfix>{output_ext})")
            spec["dtype"] = np.dtype(spec.get("dtype", "float32"))
        self.image_key, self.pred_key = image_key, pred_key
        self.overwrite, self.qc, self.qc_key, self.qc_size = bool(overwrite), bool(qc), qc_key, int(qc_size)
        self.num_workers = int(num_workers)
        self.output_ext = output_ext
        self.exit_on_failure = exit_on_failure
        self.dist_timeout_s = dist_timeout_s

    # ----------------------------------------------------------------------------------------------- paths
    def case_names(self) -> list[str]:
        """Output name of every case, in dataset order."""
        return [str(item.get("case") or case_name(item[self.image_key])) for item in self.dataset.data]

    def final_paths(self, case: str) -> dict[str, Path]:
        """Where the outputs of ``case`` go (the QC picture under the key ``"qc"`` when enabled)."""
        paths = {key: self.output_dir / f"{case}_{spec['postfix']}{self.output_ext}" for key, spec in
                 self.outputs.items()}
        if self.qc:
            paths["qc"] = self.output_dir / f"{case}_qc.png"
        return paths

    def is_complete(self, case: str) -> bool:
        """Every output of ``case`` exists (outputs only ever appear complete: they are renamed into place)."""
        return all(p.is_file() and p.stat().st_size > 0 for p in self.final_paths(case).values())

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        """Segment the cases, write the report, and return it (``{"summary": ..., "cases": [...]}``).

        Raises:
            SystemExit: status 2 when a case failed and ``exit_on_failure`` (after the report is written).
        """
        started = time.perf_counter()
        rank, world, own_group = self._init_distributed()
        lock = None
        try:
            self._load_weights()
            self.network.eval()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            names = self.case_names()
            if rank == 0:
                lock = self._lock()
                self._remove_stale_files()
                plan = [self._plan(names)]
            else:
                plan = [None]
            if world > 1:
                dist.broadcast_object_list(plan, src=0)
            todo, skipped = plan[0]
            mine = todo[rank::world]
            logger.info(f"batch inference: {len(names)} case(s), {len(skipped)} already complete, {len(todo)} to do"
                        + (f", {len(mine)} on rank {rank} of {world}" if world > 1 else "")
                        + f"; outputs in {self.output_dir}")
            records = [self._record(i, names[i], SKIPPED, outputs=self.final_paths(names[i])) for i in
                       (skipped if rank == 0 else [])]
            records += self._segment_all(names, mine, rank)
            report = self._gather_report(records, names, rank, world, time.perf_counter() - started)
        finally:
            if lock is not None:
                lock.close()
            if own_group and dist.is_initialized():
                dist.destroy_process_group()
        failed = report["summary"]["failed"]
        if failed and self.exit_on_failure:
            raise SystemExit(2)
        return report

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

    def _load_weights(self) -> None:
        if self.ckpt_path is None:
            return
        path = Path(self.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trained model; train the bundle first or pass --ckpt_path <model.pt>")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
            state = state["model"]
        getattr(self.weights_network, "module", self.weights_network).load_state_dict(state)

    def _lock(self):
        """Hold an exclusive lock on ``output_dir`` for the run, or fail naming the folder."""
        handle = open(self.output_dir / LOCK_NAME, "w", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                handle.close()
                raise RuntimeError(f"{self.output_dir}: another batch inference is writing to this folder; wait "
                                   "for it to finish or use another output_dir") from e
        return handle

    def _remove_stale_files(self) -> None:
        """Temporary outputs and rank reports of a killed run (safe: this run holds the folder's lock)."""
        for path in self.output_dir.iterdir():
            if path.name.startswith(TMP_PREFIX) or re.fullmatch(r"\.report\.rank\d+\.json", path.name):
                logger.info(f"removing {path.name}, left behind by an interrupted run")
                path.unlink(missing_ok=True)

    def _plan(self, names: list[str]) -> tuple[list[int], list[int]]:
        """(cases to do, cases already complete), as indices; every rank gets rank 0's plan."""
        if self.overwrite:
            return list(range(len(names))), []
        done = [not item.get("error") and self.is_complete(n) for n, item in zip(names, self.dataset.data)]
        return [i for i, d in enumerate(done) if not d], [i for i, d in enumerate(done) if d]

    # ---------------------------------------------------------------------------------------------- cases
    def _record(self, index: int, case: str, status: str, reason: str = "", outputs: Mapping | None = None,
                seconds: float = 0.0, rank: int = 0) -> dict:
        outputs = {k: str(v) for k, v in (outputs or {}).items()}
        return {"index": index, "case": case, "status": status, "reason": reason,
                "input": str(self.dataset.data[index][self.image_key]),
                "output": outputs.get(next(iter(self.outputs)), ""),
                "outputs": {k: outputs[k] for k in self.outputs if k in outputs},
                "qc": outputs.get("qc", ""), "seconds": round(seconds, 3), "rank": rank}

    def _segment_all(self, names: list[str], indices: list[int], rank: int) -> list[dict]:
        cases = _Cases(self.dataset, self.dataset.data, indices, self.image_key)
        loader = torch.utils.data.DataLoader(cases, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                             collate_fn=_first)
        records = []
        for n, sample in enumerate(loader, 1):
            index = sample["index"]
            case = names[index]
            start = time.perf_counter()
            reason, outputs = sample.get("error", ""), None
            if not reason:
                try:
                    outputs = self._segment(case, sample.pop("data"))
                except Exception as e:  # this case failed; the batch goes on
                    reason = failure_reason(e, self.dataset.data[index][self.image_key], "segmentation failed")
                    sample["traceback"] = traceback.format_exc()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            sample.pop("data", None)
            seconds = sample["seconds"] + time.perf_counter() - start
            if reason:
                logger.debug(f"case {case}:\n{sample.get('traceback', '')}")
                logger.warning(f"[{n}/{len(indices)}] {case}: FAILED: {reason}")
                records.append(self._record(index, case, FAILED, reason, seconds=seconds, rank=rank))
            else:
                logger.info(f"[{n}/{len(indices)}] {case}: segmented in {seconds:.1f} s")
                records.append(self._record(index, case, SUCCEEDED, outputs=outputs, seconds=seconds, rank=rank))
        return records

    def _segment(self, case: str, data: dict) -> dict[str, Path]:
        """Infer, postprocess and write one preprocessed case; returns the final paths."""
        image = data[self.image_key]
        inputs = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))[None]
        if getattr(self.inferer, "sw_device", None) is None:
            inputs = inputs.to(self.device)
        autocast = torch.autocast("cuda") if self.amp and self.device.type == "cuda" else nullcontext()
        with torch.no_grad():
            with autocast:
                logits = self.inferer(inputs, self.network)
            if isinstance(logits, (list, tuple)):  # deep supervision heads: the first is the prediction
                logits = logits[0]
            del inputs
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            ops = list(image.applied_operations) if isinstance(image, MetaTensor) else []
            data[self.pred_key] = MetaTensor(logits[0].float(), meta=meta, applied_operations=ops)
            del logits, image
            if self.postprocessing is not None:
                data = self.postprocessing(data)
            return self._write(case, data)

    def _write(self, case: str, data: dict) -> dict[str, Path]:
        """Write every output under a temporary name, then rename them all into place."""
        final = self.final_paths(case)
        temps: dict[str, Path] = {}
        try:
            for key, spec in self.outputs.items():
                if key not in data:
                    raise KeyError(f"postprocessing produced no {key!r} output")
                temps[key] = self.output_dir / f"{TMP_PREFIX}{os.getpid()}-{final[key].name}"
                writer = SaveImage(output_ext=self.output_ext, output_dtype=spec["dtype"], resample=False,
                                   separate_folder=False, print_log=False)
                value = data[key]
                writer(value.cpu() if isinstance(value, torch.Tensor) else value,
                       filename=str(temps[key])[: -len(self.output_ext)])
            if self.qc:
                temps["qc"] = self.output_dir / f"{TMP_PREFIX}{os.getpid()}-{final['qc'].name}"
                self._write_qc(data, temps["qc"])
            for key, tmp in temps.items():
                os.replace(tmp, final[key])
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
        return final

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
    def _gather_report(self, records: list[dict], names: list[str], rank: int, world: int, seconds: float) -> dict:
        """Write the report (rank 0 merges every rank's records under torchrun); every rank gets the summary."""
        if world > 1:
            _atomic_write_text(self.output_dir / f".report.rank{rank}.json", json.dumps(records))
            dist.barrier()
            report = None
            if rank == 0:
                parts = [self.output_dir / f".report.rank{r}.json" for r in range(world)]
                records = [rec for part in parts for rec in json.loads(part.read_text(encoding="utf-8"))]
                report = self._write_report(records, len(names), world, seconds)
                for part in parts:
                    part.unlink()
            shared = [report]
            dist.broadcast_object_list(shared, src=0)
            return shared[0]
        return self._write_report(records, len(names), world, seconds)

    def _write_report(self, records: list[dict], total: int, world: int, seconds: float) -> dict:
        records = sorted(records, key=lambda r: r["index"])
        counts = {s: sum(r["status"] == s for r in records) for s in (SUCCEEDED, SKIPPED, FAILED)}
        if len(records) != total:
            raise RuntimeError(f"report has {len(records)} case(s) for {total} in the dataset")
        summary = {"cases": total, **counts, "seconds": round(seconds, 3),
                   "cases_per_minute": round(60.0 * counts[SUCCEEDED] / seconds, 3) if seconds > 0 else None,
                   "processes": world, "output_dir": str(self.output_dir),
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        cases = [{k: v for k, v in r.items() if k != "index"} for r in records]
        report = {"summary": summary, "cases": cases}
        _atomic_write_text(self.output_dir / "report.json", json.dumps(report, indent=2) + "\n")
        extra = [k for k in self.outputs if k != next(iter(self.outputs))]
        fields = ["case", "status", "reason", "output", "seconds", "input", *extra, *(["qc"] if self.qc else [])]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for case in cases:
            writer.writerow({**case, **{k: case["outputs"].get(k, "") for k in extra}})
        _atomic_write_text(self.output_dir / "report.csv", text.getvalue())
        logger.info(f"batch inference: {counts[SUCCEEDED]} segmented, {counts[SKIPPED]} skipped (complete), "
                    f"{counts[FAILED]} failed of {total} case(s) in {seconds:.1f} s; report: "
                    f"{self.output_dir / 'report.json'}")
        failed = [c for c in cases if c["status"] == FAILED]
        if failed:
            lines = [f"  - {c['case']}: {c['reason']}" for c in failed[:_MAX_LISTED]]
            if len(failed) > _MAX_LISTED:
                lines.append(f"  ... and {len(failed) - _MAX_LISTED} more (see report.json)")
            logger.error("\n".join([f"{len(failed)} case(s) failed:", *lines]))
        return report
