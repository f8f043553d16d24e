# SPDX-License-Identifier: Apache-2.0
"""Experiment tracking with MONAI's own switch: ``python -m monai.bundle run ... --tracking mlflow``
(``pip install '.[mlflow]'``).

MONAI then adds its ``MLFlowHandler`` to three lists of a config: ``train#handlers`` (the trainer: the loss of
every iteration, the epoch's ``train_loss`` and learning rate, the run's parameters, the executed config as an
artifact), ``validate#handlers`` (the validation metrics, ``val_mean_dice``, after each validation) and
``handlers`` (a standalone evaluator: in ``inference.json`` the batch runner, which records one run per batch,
:func:`notify`). It also adds the keys the handlers use unless the config has them; the bundles have:

- ``tracking_uri``: a SQLite database in ``output_dir`` (:func:`default_uri`), since MLflow 3.13 no longer takes
  a folder (the file store MONAI 1.5 defaulted to); a server (``http://host:5000``) or another database is an
  override (``--tracking_uri``), as is the ``MLFLOW_TRACKING_URI`` environment variable;
- ``experiment_name``: the bundle's name (``--experiment_name`` to group runs otherwise; ``--run_name`` names a run);
- ``tracking_params`` (train.json): what a training run is compared by (learning rate, batch and patch size,
  epochs, network, the bundle's version, ...), handed to the trainer's handler by :func:`prepare_training`.

Without ``--tracking`` nothing here runs and MLflow is not needed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["default_uri", "prepare_training", "finish", "notify", "check_handlers"]

logger = logging.getLogger(__name__)


def default_uri(output_dir: str | os.PathLike) -> str:
    """``sqlite:///<output_dir>/mlruns.db`` (absolute; the folder is created, as the database needs it). MONAI's
    handler keeps the artifacts in ``mlruns/`` next to it."""
    folder = Path(output_dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + quote((folder / "mlruns.db").as_posix(), safe="/:")


def _mlflow_handlers(handlers: Sequence[Any] | None) -> list:
    from monai.handlers import MLFlowHandler

    return [h for h in handlers or () if isinstance(h, MLFlowHandler)]


def _artifact_location(uri: str) -> str | None:
    """Where the artifacts of a local SQLite store go: ``mlruns/`` next to the database (as MONAI 1.6 does)."""
    if not uri.startswith("sqlite:///"):
        return None
    from urllib.parse import unquote

    return (Path(unquote(uri[len("sqlite:///"):])).parent / "mlruns").absolute().as_uri()


def _experiment(handler: Any) -> Any:
    """The handler's experiment, created with its artifacts next to a local database (MONAI 1.5's handler would
    leave them in ``./mlruns`` of the working directory)."""
    client, name = handler.client, handler.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = _artifact_location(str(getattr(client, "tracking_uri", "") or ""))
        experiment = client.get_experiment(client.create_experiment(name, artifact_location=location))
    return experiment


def prepare_training(handlers: Sequence[Any] | None, params: Mapping[str, Any]) -> Sequence[Any] | None:
    """Ready the MONAI ``MLFlowHandler`` among a trainer's ``handlers`` (those ``--tracking mlflow`` added) for the
    bundles' trainer; returns ``handlers``. Each gets ``params`` as its ``experiment_param`` (logged when the run
    starts) and its experiment (see :func:`_experiment`); and its ``output_transform`` takes the loss out of the
    one-item tuple MONAI's ``from_engine(['loss'], first=True)`` gives for a batch the trainer does not decollate
    (``decollate: false``), where MLflow would refuse the tuple. Without such a handler it does nothing."""
    for handler in _mlflow_handlers(handlers):
        handler.experiment_param = {**dict(handler.experiment_param or {}), **_flat(params)}
        handler.output_transform = _unwrap_one(handler.output_transform)
        _experiment(handler)
    return handlers


def _unwrap_one(transform: Callable) -> Callable:
    def output_transform(output: Any) -> Any:
        value = transform(output)
        return value[0] if isinstance(value, tuple) and len(value) == 1 else value

    return output_transform


def finish(handlers: Sequence[Any] | None) -> None:
    """End the runs of the ``MLFlowHandler`` among ``handlers`` (an evaluation's, which MONAI leaves open)."""
    for handler in _mlflow_handlers(handlers):
        handler.close()


def _flat(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow parameters are strings (at most 6000 characters): lists as JSON, others as ``str``."""
    out = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        out[str(key)] = text[:6000]
    return out


def check_handlers(handlers: Sequence[Any] | None) -> list:
    """The batch runner's ``handlers``: MONAI ``MLFlowHandler`` objects or callables that take the report."""
    from .settings import ConfigError

    handlers = list(handlers or [])
    for handler in handlers:
        if not (_mlflow_handlers([handler]) or callable(handler)):
            raise ConfigError(f"handlers: {type(handler).__name__} is neither MONAI's MLFlowHandler nor a callable "
                              "that takes the batch report")
    return handlers


def notify(handlers: Sequence[Any | Callable[[dict], Any]], report: Mapping[str, Any]) -> None:
    """Hand a finished batch's report to each handler: a callable is called with it; a MONAI ``MLFlowHandler``
    records a run (parameters: bundle, version, model, runtime, device, folders; metrics: the cases by status,
    seconds, cases per minute; artifacts: report.json and the executed config). A handler that fails is logged as
    a warning: the segmentations and the report are written by then, and the exit status stays theirs."""
    for handler in handlers:
        try:
            if _mlflow_handlers([handler]):
                _record_batch(handler, report)
            else:
                handler(report)
        except Exception as e:  # noqa: BLE001 - tracking must not undo a finished batch
            logger.warning(f"experiment tracking: {type(handler).__name__} could not record the batch: {e}",
                           exc_info=logger.isEnabledFor(logging.DEBUG))


def _record_batch(handler: Any, report: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunStatus

    run, summary = report.get("run", {}), report.get("summary", {})
    bundle, model, settings = run.get("bundle", {}), run.get("model", {}), run.get("settings", {})
    client = handler.client
    experiment = _experiment(handler)
    name = str(handler.run_name) if handler.run_name is not None else f"batch_{time.strftime('%Y%m%d_%H%M%S')}"
    mlflow_run = client.create_run(experiment.experiment_id, run_name=name)
    run_id = mlflow_run.info.run_id
    try:
        params = {"bundle": bundle.get("name", ""), "bundle_version": bundle.get("version", ""),
                  "bundle_root": bundle.get("root", ""), "model_sha256": model.get("sha256", ""),
                  "model_path": model.get("path", ""), "runtime": settings.get("runtime", ""),
                  "device": settings.get("device", ""), "processes": run.get("processes", ""),
                  "output_dir": summary.get("output_dir", ""), **dict(handler.experiment_param or {})}
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(summary[key]), now, 0) for key in
                   ("cases", "succeeded", "skipped", "partial", "failed", "ignored", "seconds", "cases_per_minute")
                   if isinstance(summary.get(key), (int, float)) and not isinstance(summary.get(key), bool)]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in _flat(params).items()], tags=[])
        report_dir = summary.get("report_dir") or summary.get("output_dir")
        artifacts = [Path(str(report_dir)) / "report.json"] if report_dir else []
        artifacts += [Path(str(a)) for a in getattr(handler, "artifacts", ()) or () if a]
        for path in artifacts:
            if path.is_file():
                client.log_artifact(run_id, str(path))
    finally:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        handler.close()
