# SPDX-License-Identifier: Apache-2.0
"""Ignite handlers shared by the bundles' training workflows."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai.handlers
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import MetricsSaver

from .errors import traceback_wanted, user_error

__all__ = ["ResumableCheckpoint", "LabelledMetricsSaver", "StatsHandler", "ValidationHandler", "TimeBudget", "PolyLR",
           "IterationProgress", "atomic_torch_save", "datalist_fingerprint"]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def datalist_fingerprint(data: Sequence[Mapping[str, Any]]) -> str:
    """A hash of the file names (not the folders) of every ``image`` and ``label`` of a datalist, in any order:
    the same cases give the same fingerprint after the dataset folder was moved."""

    def names(value: Any) -> list[str]:
        values = value if isinstance(value, (list, tuple)) else [value]
        return [os.path.basename(str(v)) for v in values]

    cases = sorted(json.dumps([names(item.get("image")), names(item.get("label"))]) for item in data)
    return hashlib.sha256("\n".join(cases).encode()).hexdigest()


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ResumableCheckpoint:
    """Keep the best model as ``model.pt`` and the full training state after each epoch, and resume from it.

    After each epoch (and after validation, so attach it after the ``ValidationHandler``) this writes:

    - ``<ckpt_dir>/<best_filename>``: the model's state dict, on CPU, whenever the evaluator's key metric
      improved this epoch (every epoch when there is no evaluator). It loads with
      ``torch.load(path, weights_only=True)`` on a machine without a GPU, in MONAI Label, and in ``ckpt_export``.
    - ``<ckpt_dir>/<state_filename>``: every object of ``save_dict`` (model, optimizer, scheduler), the
      trainer's epoch and iteration, and the best metric so far.

    When the trainer starts and the state file exists, everything is restored, so running the same command
    again after a kill continues with the epoch after the last finished one, and the best-model bookkeeping
    carries over (a worse epoch after the restart does not overwrite ``model.pt``). The trainer keeps the
    ``max_epochs`` of the current run, so a finished run can be extended by raising ``epochs``.

    With ``data`` (the training datalist), the state also records which cases were trained on (file names of
    every image and label), and a state from a different set of cases is not resumed: that run starts at
    epoch 1 from the weights the network already has. This is what MONAI Label needs: each of its training
    requests passes the labels done so far as ``train#dataset#data`` and loads ``model.pt`` first, so a request
    with new labels trains a new run instead of finding the state of an earlier run "finished".

    Both files are written atomically (temporary file, then rename) and only by rank 0 under DDP; a kill during a
    write can leave only a hidden temporary file, which the next start removes. Put the
    unwrapped network in ``save_dict`` (``network_def``, not the DDP wrapper) so the keys have no ``module.``
    prefix.

    Args:
        ckpt_dir: folder of the two files.
        save_dict: objects with ``state_dict``/``load_state_dict``; the model under ``model_key``.
        evaluator: the validation evaluator whose ``best_metric`` decides the best model; ``None`` saves the
            model after every epoch.
        model_key: key of the model in ``save_dict``.
        best_filename: file name of the best model.
        state_filename: file name of the training state.
        data: the training datalist (dicts whose ``image``/``label`` are paths or lists of paths); ``None``
            resumes whatever state there is.
        save_interval_s: write the training state only after an epoch that ends at least this many seconds after
            the last write or the start of the run (and always after the run's last epoch), so that epochs of a second or two on a GPU do
            not each wait for a full checkpoint; a kill then loses at most this much training. ``0``: after every
            epoch. The best model is written whenever it improves, whatever this is.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        evaluator: Engine | None = None,
        model_key: str = "model",
        best_filename: str = "model.pt",
        state_filename: str = "training_state.pt",
        data: Sequence[Mapping[str, Any]] | None = None,
        save_interval_s: float = 0.0,
    ) -> None:
        if model_key not in save_dict:
            raise ValueError(f"save_dict must hold the model under {model_key!r}, got keys {list(save_dict)}")
        self.ckpt_dir = Path(ckpt_dir)
        self.save_dict = dict(save_dict)
        self.evaluator = evaluator
        self.model_key = model_key
        self.best_path = self.ckpt_dir / best_filename
        self.state_path = self.ckpt_dir / state_filename
        self.data_fingerprint = None if data is None else datalist_fingerprint(data)
        if save_interval_s < 0:
            raise ValueError(f"save_interval_s must be 0 or more seconds, got {save_interval_s}")
        self.save_interval_s = float(save_interval_s)
        self._last_state_save = -float("inf")
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files of a run killed while it wrote a checkpoint (rank 0; a temporary file is
        never read, and a run on the same ``ckpt_dir`` at the same time is not supported anyway)."""
        if not _is_main_process():
            return
        for path in (self.best_path, self.state_path):
            for tmp in path.parent.glob(f".{path.name}.tmp*"):
                tmp.unlink(missing_ok=True)
                self.logger.info(f"Removed {tmp}, a half-written checkpoint of a killed run.")

    def resume(self, engine: Engine) -> None:
        self._last_state_save = time.monotonic()  # the interval counts from the start of the run
        self.remove_stale_temporaries()
        if not self.state_path.is_file():
            self.logger.info(f"No training state at {self.state_path}: training starts at epoch 1.")
            return
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"cannot resume from {self.state_path} ({type(e).__name__}: {e}); delete it to start over"
            ) from e
        recorded = state.get("data_fingerprint")
        if self.data_fingerprint is not None and recorded is not None and recorded != self.data_fingerprint:
            self.logger.info(
                f"{self.state_path} is the state of a run on other training cases: not resumed; training starts "
                "at epoch 1 from the current weights and replaces that state."
            )
            return
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load={**self.save_dict, "trainer": engine}, checkpoint=state)
        engine.state.max_epochs = max_epochs
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = float(state["best_metric"])
            self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        done = engine.state.epoch
        if max_epochs is not None and done >= max_epochs:
            self.logger.info(f"{self.state_path} records {done} finished epochs of {max_epochs}: nothing to do.")
        else:
            self.logger.info(f"Resumed from {self.state_path}: epoch {done} was the last finished, continuing.")

    def save(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        epoch = engine.state.epoch
        model = self.save_dict[self.model_key]
        improved = self.evaluator is None or self.evaluator.state.best_metric_epoch == epoch
        if improved:
            atomic_torch_save(_to_cpu(model.state_dict()), self.best_path)
        last = engine.state.max_epochs is not None and epoch >= engine.state.max_epochs
        if not last and time.monotonic() - self._last_state_save < self.save_interval_s:
            return
        state = {name: _to_cpu(obj.state_dict()) for name, obj in self.save_dict.items()}
        state["trainer"] = engine.state_dict()
        state["epoch"] = epoch  # ignite's state dict keeps only the iteration count
        if self.data_fingerprint is not None:
            state["data_fingerprint"] = self.data_fingerprint
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        atomic_torch_save(state, self.state_path)
        self._last_state_save = time.monotonic()


class LabelledMetricsSaver(MetricsSaver):
    """:class:`monai.handlers.MetricsSaver` whose per-class columns carry the label names.

    MONAI's saver names the columns ``class0``, ``class1``, ... counted from the first channel that was scored,
    which reads as "background" for what is really label 1 when the background is excluded. ``class_labels``
    gives the names in channel order (e.g. ``["anterior", "posterior"]``). The call gathers what MONAI's does
    (file names from every rank, the selected metrics and details) and hands the names to MONAI's
    ``write_metrics_reports``, one metric at a time (it extends its label list once per metric it writes).
    """

    def __init__(self, *args: Any, class_labels: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_labels = list(class_labels) if class_labels is not None else None

    def __call__(self, engine: Engine) -> None:
        if self.class_labels is None:
            return super().__call__(engine)
        import ignite.distributed as idist
        from monai.handlers.utils import write_metrics_reports
        from monai.utils import string_list_all_gather

        world_size = idist.get_world_size()
        if self.save_rank >= world_size:
            raise ValueError("target save rank is greater than the distributed group size.")
        images = string_list_all_gather(strings=self._filenames) if world_size > 1 else self._filenames
        if idist.get_rank() != self.save_rank:
            return
        selected = lambda names, key: names is not None and (key in names or "*" in names)  # noqa: E731
        metrics = {k: v for k, v in engine.state.metrics.items() if selected(self.metrics, k)}
        details = {k: v for k, v in getattr(engine.state, "metric_details", {}).items()
                   if selected(self.metric_details, k)}
        common = dict(save_dir=self.save_dir, images=images or None, summary_ops=self.summary_ops, deli=self.deli,
                      output_type=self.output_type)
        write_metrics_reports(metrics=metrics, metric_details=None, **common)
        for name, values in details.items():
            write_metrics_reports(metrics=None, metric_details={name: values}, class_labels=list(self.class_labels),
                                  **common)


class StatsHandler(monai.handlers.StatsHandler):
    """:class:`monai.handlers.StatsHandler` that leaves a user error (a missing file, a bad dataset; see
    :func:`bundletools.errors.user_error`) to the one line it ends the command with: MONAI's handler logs the
    traceback of every exception a run raises, so a missing ``model.pt`` would show 20 lines of traceback before
    the line. Other exceptions are logged as MONAI logs them; with ``BUNDLETOOLS_TRACEBACK=1`` user errors too.
    """

    def exception_raised(self, _engine: Engine, e: Exception) -> None:
        if user_error(e) is None or traceback_wanted():
            super().exception_raised(_engine, e)
        raise e


class ValidationHandler(monai.handlers.ValidationHandler):
    """:class:`monai.handlers.ValidationHandler` (epoch level) that also validates after the run's last epoch, so
    that the best model is chosen among every ``interval``-th epoch and the last one even when the number of
    epochs is no multiple of the interval (a GPU validates every 5 epochs; a run of 8 would otherwise score only
    epoch 5)."""

    def attach(self, engine: Engine) -> None:
        if not self.epoch_level:
            return super().attach(engine)

        def due(engine: Engine, epoch: int) -> bool:
            return epoch % self.interval == 0 or epoch == engine.state.max_epochs

        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=due), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


class TimeBudget:
    """Stop training cleanly once ``seconds`` of wall-clock time have passed (``None``: no limit).

    For fixed-budget comparisons: the run ends after the iteration that crosses the budget; epochs that finished
    before it were validated and checkpointed as usual, the unfinished one is dropped.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if self.seconds is not None:
            engine.add_event_handler(Events.STARTED, self._start)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _check(self, engine: Engine) -> None:
        if time.perf_counter() - self._t0 > self.seconds:
            self.logger.info(f"Time budget of {self.seconds:.0f} s used up in epoch {engine.state.epoch}: stopping.")
            engine.terminate()


class PolyLR:
    """Learning rate fitted to the run's budget: a linear warm-up, then nnU-Net's polynomial decay to zero.

    ``lr = base_lr * min(1, progress / warmup) * (1 - progress) ** power``, set before every iteration, where
    ``progress`` is the share of the budget used so far: the iterations done of ``max_epochs`` epochs, or, under a
    wall-clock budget (``time_budget_s``, as :class:`TimeBudget`), the share of that time if it is larger. So the
    schedule ends at zero when the run ends, whichever budget ends it, and a resumed run continues where the
    schedule stopped (the iteration count is restored with the trainer's state). ``base_lr`` is each parameter
    group's learning rate when the handler is created.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, time_budget_s: float | None = None,
                 warmup: float = 0.02, power: float = 0.9) -> None:
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup must be a share of the budget in [0, 1), got {warmup}")
        self.optimizer, self.time_budget_s, self.warmup, self.power = optimizer, time_budget_s, warmup, power
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._t0 = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_lr)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def progress(self, engine: Engine) -> float:
        """The share of the budget used by the end of the current iteration, in [0, 1]."""
        state = engine.state
        done = state.iteration / max(1, state.max_epochs * state.epoch_length)
        if self.time_budget_s and self._t0 is not None:
            done = max(done, (time.perf_counter() - self._t0) / self.time_budget_s)
        return min(1.0, max(0.0, done))

    def factor(self, progress: float) -> float:
        warm = min(1.0, progress / self.warmup) if self.warmup > 0 else 1.0
        return warm * (1.0 - progress) ** self.power

    def _set_lr(self, engine: Engine) -> None:
        factor = self.factor(self.progress(engine))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor


class IterationProgress:
    """Progress inside an epoch, the ignite/MONAI way: ignite's ``ProgressBar`` (tqdm: iterations done, rate, time
    left, loss) when the output is a terminal, otherwise MONAI's ``StatsHandler`` iteration line
    (``Epoch: 1/20, Iter: 10/84 -- train_loss: 0.5123``) every ``every`` iterations, for logs, CI and MONAI Label.

    Rank 0 only under DDP (the other ranks would repeat it).

    Args:
        every: iterations between two log lines; ``None``: about ten lines per epoch (``epoch_length // 10``).
        bar: ``True``/``False`` forces the bar or the lines; ``None`` picks the bar when stderr is a terminal.
        output_transform: engine output -> the loss to show.
        tag_name: name of the value in the lines and on the bar.
    """

    def __init__(
        self,
        every: int | None = None,
        bar: bool | None = None,
        output_transform: Any = None,
        tag_name: str = "train_loss",
    ) -> None:
        from monai.handlers import from_engine

        if every is not None and every < 1:
            raise ValueError(f"every must be a positive number of iterations, got {every}")
        self.every = every
        self.bar = bar
        self.output_transform = output_transform or from_engine(["loss"], first=True)
        self.tag_name = tag_name

    def _loss(self, output: Any) -> Any:
        value = self.output_transform(output)
        value = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
        return value.item() if isinstance(value, torch.Tensor) else value

    def _due(self, engine: Engine, iteration: int) -> bool:
        length = engine.state.epoch_length or 1
        every = self.every or max(1, length // 10)
        return ((iteration - 1) % length + 1) % every == 0

    def attach(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        bar = self.bar if self.bar is not None else sys.stderr.isatty()
        if bar:
            try:
                from ignite.handlers import ProgressBar
            except ImportError:  # ignite < 0.5
                from ignite.contrib.handlers import ProgressBar

            ProgressBar(persist=False).attach(engine, output_transform=lambda out: {self.tag_name: self._loss(out)})
        else:
            # MONAI's own logger and line format, as the per-epoch lines
            StatsHandler(iteration_log=self._due, epoch_log=False, output_transform=self._loss,
                         tag_name=self.tag_name).attach(engine)
