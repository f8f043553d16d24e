# SPDX-License-Identifier: Apache-2.0
"""Batch inference for pipelines: segment every case of a folder, robustly, resumably, on one or N processes.

:class:`BatchInference` is the ``evaluator`` of every bundle's ``inference.json``; ``python -m monai.bundle run``
calls its :meth:`~BatchInference.run`. It is a loop over parts the config composes, split by how long each lives,
as nnU-Net's predictor is:

- how to run: :class:`bundletools.settings.ExecutionSettings` (device, mixed precision, cases in flight, threads,
  DataLoader workers, the process group's timeout);
- which model: :class:`bundletools.model.Checkpoint` (the weights and their SHA-256) and the ``network`` the
  inferer runs, which the config may wrap (Monte-Carlo sampling, ONNX Runtime: :mod:`bundletools.runtime`);
- which data: the ``dataset``, the :class:`bundletools.cases.InputLimits` of what is read, and the ``outputs``,
  each a writer found by name (:mod:`bundletools.writers`: the segmentation, an uncertainty map, the QC picture,
  the DICOM SEG);
- what the report says of the run: :class:`bundletools.report.Provenance` (bundle folder, config files,
  metadata), which the config hands over.

The per-case loop is :class:`bundletools.cases.CaseLoop`, the output folder (lock, temporary names, atomic
replacement, completeness) :class:`bundletools.outputs.OutputFolder`, the report and its merge across ranks
:class:`bundletools.report.BatchReport`. What it adds to MONAI's evaluator:

- one bad case never stops the batch: a read error, an image the model cannot take (``transforms.CheckImaged``),
  a geometry the output could not keep, or a failure during inference or writing is recorded as that case's
  one-line reason and the batch goes on;
- a case is skipped when its outputs all exist and were made from the same input (SHA-256) by the same model
  (SHA-256 of the weights), so an interrupted batch resumes and a corrected scan is segmented again
  (``overwrite`` redoes every case);
- ``report.json`` and ``report.csv`` in ``output_dir``: per case its status (``succeeded``, ``skipped``,
  ``partial``: segmented but without an optional output such as its DICOM SEG, ``failed``), reason, outputs,
  checksums and seconds; every other entry of the input folder as ``ignored`` with its reason; the run's bundle,
  config, model and software versions. The run exits with status 2 when a case failed (or lacks a required
  optional output), 3 when the report could not be written to ``output_dir`` (it is then in a temporary folder
  named on stderr);
- under ``torchrun`` (``WORLD_SIZE`` > 1) the cases still to do are split between the processes (gloo on the
  CPU, NCCL on GPUs) and their reports merged by rank 0;
- speed on CPUs: ``parallel_cases`` cases are inferred and postprocessed at once, each in a thread with its share
  of torch's threads (small 3D convolutions use one core better than two, and one case's Python-bound steps run
  beside another's network), while one writer thread compresses and syncs the finished cases.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .cases import CaseLoop, InputLimits, Predictor, failure_reason
from .data import case_name
from .images import DatasetError, input_checksum, input_fingerprint
from .model import Checkpoint
from .outputs import LOCK_NAME, TMP_PREFIX, OutputFolder
from .report import FAILED, PARTIAL, SKIPPED, SUCCEEDED, BatchReport, Provenance, printable, utc_now
from .settings import ConfigError, ExecutionSettings, flag
from .tracking import check_handlers, notify
from .writers import Output, RunContext, declare_outputs

__all__ = ["BatchInference", "ConfigError", "failure_reason", "SUCCEEDED", "SKIPPED", "PARTIAL", "FAILED",
           "TMP_PREFIX", "LOCK_NAME"]

logger = logging.getLogger(__name__)

DEFAULT_OUTPUTS = {"pred": {"writer": "image", "postfix": "seg", "dtype": "uint8"}}
EXIT_FAILED, EXIT_NO_REPORT = 2, 3  # a case failed; the report is not in output_dir


def _is_file(path: os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class BatchInference:
    """Segment every case of ``dataset`` into ``output_dir``; see the module docstring for the behaviour.

    Args:
        dataset: a MONAI ``Dataset``: ``dataset.data`` is the case list (dicts with ``image`` and optionally
            ``case``, the output name, otherwise the file name without extension; ``root``, the input folder that
            detached headers must stay in; ``error``, a reason to fail the case without reading it) and
            ``dataset[i]`` the preprocessed case. ``dataset.data.ignored`` (see
            :func:`bundletools.data.inference_datalist`) lists the other entries of the input folder for the
            report. Its ``transform`` is what writers invert (the QC picture's image).
        output_dir: folder of the outputs and of the report (created if needed).
        network: what ``inferer`` runs: the network on the device, or a wrapper of it
            (:func:`bundletools.runtime.runtime_network`, :class:`networks.wrappers.MonteCarloUncertainty`).
        inferer: MONAI inferer called as ``inferer(image_batch, network)`` (see :class:`bundletools.cases.Predictor`).
        postprocessing: applied to ``{"image": image, "pred": network output}``; must leave every output on the
            input's grid (e.g. with ``Invertd``).
        checkpoint: the weights, loaded at the start of :meth:`run`; default: the network's weights as they are.
        outputs: the outputs, by name (:func:`bundletools.writers.declare_outputs`); a case is complete when it
            has all of those that apply to it. Default: the segmentation as ``<case>_seg.nii.gz`` (uint8).
        execution: how to run (:class:`bundletools.settings.ExecutionSettings`); default: one CPU process.
        input_limits: which inputs are read (:class:`bundletools.cases.InputLimits`); default: the default
            ``max_voxels``.
        provenance: what the report records of the bundle and its configs (:class:`bundletools.report.Provenance`).
        overwrite: redo every case, also those whose outputs are complete.
        handlers: told about the finished batch by rank 0, after the report is written
            (:func:`bundletools.tracking.notify`): MONAI's ``MLFlowHandler`` (``--tracking mlflow`` adds one) records
            a run; a callable is called with the report. One that fails is a warning, not a failed batch.
        exit_on_failure: raise ``SystemExit(2)`` at the end when a case failed (or is ``partial`` without a
            required output), ``SystemExit(3)`` when the report could not be written to ``output_dir`` (the exit
            status pipelines check); otherwise :meth:`run` just returns the report.
    """

    image_key, pred_key = "image", "pred"

    def __init__(
        self,
        dataset: Any,
        output_dir: str | os.PathLike,
        network: Callable,
        inferer: Callable,
        postprocessing: Callable | None = None,
        checkpoint: Checkpoint | None = None,
        outputs: Mapping[str, Mapping] | None = None,
        execution: ExecutionSettings | None = None,
        input_limits: InputLimits | None = None,
        provenance: Provenance | None = None,
        overwrite: bool = False,
        handlers: Sequence[Any] | None = None,
        exit_on_failure: bool = True,
    ) -> None:
        self.dataset = dataset
        self.network, self.inferer, self.postprocessing = network, inferer, postprocessing
        self.checkpoint = checkpoint if checkpoint is not None else Checkpoint(None, network)
        self.outputs: dict[str, Output] = declare_outputs(DEFAULT_OUTPUTS if outputs is None else outputs)
        if not self.outputs:
            raise ConfigError("outputs: no output is enabled; the segmentation at least must be written")
        self.execution = execution if execution is not None else ExecutionSettings()
        self.input_limits = input_limits if input_limits is not None else InputLimits()
        self.provenance = provenance if provenance is not None else Provenance()
        self.overwrite = flag(overwrite, "overwrite")
        self.handlers = check_handlers(handlers)
        self.exit_on_failure = exit_on_failure
        self.folder = OutputFolder(output_dir, {name: output.suffix for name, output in self.outputs.items()})

    def case_names(self) -> list[str]:
        """Output name of every case, in dataset order."""
        return [str(item.get("case") or case_name(item[self.image_key])) for item in self.dataset.data]

    def run(self) -> dict:
        """Segment the cases, write the report, and return it (``{"run", "summary", "cases", "ignored"}``).

        Raises:
            SystemExit: with ``exit_on_failure``, status 3 when the report could not be written to ``output_dir``
                (it is in the temporary folder named on stderr), else status 2 when a case failed or is ``partial``
                without a required output.
            BatchError: the batch cannot start (another batch holds the output folder, no model, a bad setting,
                an output that cannot be made, ...).
        """
        started, started_at = time.perf_counter(), utc_now()
        rank, world, own_group = self.execution.init_distributed()
        report = BatchReport(self.folder.path, self.outputs)
        threads_before = torch.get_num_threads()
        try:
            model_sha256 = self.checkpoint.load()
            run = RunContext(model_sha256, self.provenance.metadata, getattr(self.dataset, "transform", None))
            for output in self.outputs.values():
                output.writer.prepare(run)
            if isinstance(self.network, torch.nn.Module):
                self.network.eval()
            names = self.case_names()
            todo, done = self._plan(names, model_sha256, report, rank, world)
            mine = todo[rank::world]
            threads, parallel = self.execution.split(len(mine))
            torch.set_num_threads(max(1, threads // parallel))  # the cases in flight share the CPU
            logger.info(f"batch inference: {len(names)} case(s), {sum(r['status'] == SKIPPED for r in done)} "
                        f"already complete, {len(todo)} to do"
                        + (f", {len(mine)} on rank {rank} of {world}" if world > 1 else "")
                        + f"; outputs in {printable(self.folder.path)}")
            predict = Predictor(self.network, self.inferer, self.postprocessing, self.execution, self.image_key,
                                self.pred_key)
            loop = CaseLoop(self.dataset, self.input_limits, predict, self.outputs, self.folder, report,
                            self.execution.num_workers, parallel)
            records = report.gather((done if rank == 0 else []) + loop.run(mine, names, rank, model_sha256), rank,
                                    world)
            shared: list = [None]
            if rank == 0:
                problem = self.folder.changed()
                records = self._check_outputs(records, names, report, problem)
                info = self._run_info(model_sha256, threads, parallel, world, started_at)
                ignored = getattr(self.dataset.data, "ignored", [])
                any_failed = any(r["status"] == FAILED or r["counts_as_failed"] for r in records)
                shared = [(report.write(records, ignored, len(names), info, time.perf_counter() - started, world,
                                        problem), any_failed)]
            if world > 1:
                dist.broadcast_object_list(shared, src=0)
            result, any_failed = shared[0]
            if rank == 0:
                notify(self.handlers, result)
        finally:
            torch.set_num_threads(threads_before)
            self.folder.unlock()
            if own_group and dist.is_initialized():
                dist.destroy_process_group()
        self._exit(result["summary"], any_failed, rank)
        return result

    def _run_info(self, model_sha256: str, threads: int, parallel: int, world: int, started_at: str) -> dict:
        """The report's ``run``: the provenance the config handed over, with the settings and model of this run."""
        series_rules = getattr(self.dataset.data, "series_rules", None)
        settings = {"outputs": {name: output.spec for name, output in self.outputs.items()},
                    "overwrite": self.overwrite, **self.input_limits.describe(),
                    **({"series_rules": series_rules} if series_rules is not None else {}),
                    **self.execution.describe(threads, parallel), "runtime": getattr(self.network, "runtime", "torch")}
        model = {"path": printable(self.checkpoint.path) if self.checkpoint.path is not None else "",
                 "sha256": model_sha256, **getattr(self.network, "provenance", {})}
        return self.provenance.describe(settings, model, world, started_at)

    def _exit(self, summary: Mapping, any_failed: bool, rank: int) -> None:
        """The exit status pipelines check (with ``exit_on_failure``), and the one line a pipeline's log shows
        even when the report is nowhere to be found."""
        if "report_error" in summary:
            if rank == 0:
                where = f"the report is in {summary['report_dir']}" if summary["report_dir"] else "no report"
                print(f"bundletools.batch: error: {summary['report_error']}; {where}; {summary[SUCCEEDED]} "
                      f"segmented, {summary[SKIPPED]} skipped, {summary[PARTIAL]} partial, {summary[FAILED]} failed "
                      f"of {summary['cases']} case(s)" + (f"; exit status {EXIT_NO_REPORT}" if self.exit_on_failure
                                                          else ""), file=sys.stderr)
            if self.exit_on_failure:
                raise SystemExit(EXIT_NO_REPORT)
        if self.exit_on_failure and any_failed:
            raise SystemExit(EXIT_FAILED)

    def _keys(self, source: Any) -> list[str]:
        """The outputs the case read from ``source`` has."""
        return [name for name, output in self.outputs.items() if output.writer.applies(source)]

    def _plan(self, names: list[str], model_sha256: str, report: BatchReport, rank: int,
              world: int) -> tuple[list[int], list[dict]]:
        """(indices of the cases to do, records of the cases decided without segmenting them: skipped as complete,
        or failed before reading). Rank 0 locks the output folder, removes what an interrupted run left and plans;
        the other ranks get its plan."""
        plan: list = [None]
        if rank == 0:
            self.folder.lock()
            for name in self.folder.remove_stale():
                logger.info(f"removed {printable(name)}, left behind by an interrupted run")
            plan = [self._decide(names, model_sha256, report)]
        if world > 1:
            dist.broadcast_object_list(plan, src=0)
            if rank != 0:
                self.folder.bind()
        return plan[0]

    def _decide(self, names: list[str], model_sha256: str, report: BatchReport) -> tuple[list[int], list[dict]]:
        todo, done = [], []
        for index, (case, item) in enumerate(zip(names, self.dataset.data)):
            source = item.get(self.image_key)
            problem = item.get("error") or self.folder.name_problem(case)
            if problem:
                reason = failure_reason(DatasetError(problem), source)
                logger.warning(f"{printable(case)}: FAILED: {reason}")
                self.folder.discard(case)
                done.append(report.record(index, case, source, FAILED, reason))
                continue
            keys = self._keys(source)
            previous = None if self.overwrite else self.folder.record(case, keys)
            if previous is not None and previous.get("model_sha256") != model_sha256:
                logger.info(f"{printable(case)}: its outputs come from another model; segmenting it again")
            elif previous is not None:
                try:
                    same = (input_fingerprint(source) == previous.get("input_fingerprint")
                            or input_checksum(source) == previous.get("input_sha256"))
                except OSError:
                    same = False
                if same:
                    outputs = {k: p for k, p in self.folder.paths(case).items() if k in keys}
                    done.append(report.record(index, case, source, SKIPPED, outputs=outputs,
                                              input_sha256=previous.get("input_sha256", ""),
                                              model_sha256=model_sha256))
                    continue
                logger.info(f"{printable(case)}: its input changed since its outputs were written; segmenting it "
                            "again")
            todo.append(index)
        return todo, done

    def _check_outputs(self, records: list[dict], names: list[str], report: BatchReport,
                       problem: str | None) -> list[dict]:
        """The records as the report must state them: a case whose outputs are gone by now (removed during the
        run, or with the whole output folder, as ``problem`` says) failed, whatever it was before."""
        checked = []
        for record in records:
            if record["status"] in (SUCCEEDED, SKIPPED, PARTIAL):
                paths = self.folder.paths(names[record["index"]])
                missing = [] if problem else [paths[k].name for k in report.listed(record) if not _is_file(paths[k])]
                if problem or missing:
                    why = problem or f"{', '.join(missing)} no longer there: removed during the run"
                    source = self.dataset.data[record["index"]][self.image_key]
                    record = {**record, "status": FAILED, "output": "", "outputs": {}, "qc": "",
                              "reason": failure_reason(DatasetError(f"its outputs are lost: {why}"), source)}
            checked.append(record)
        return checked
