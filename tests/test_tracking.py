# SPDX-License-Identifier: Apache-2.0
"""Experiment tracking with MONAI's own switch, ``--tracking mlflow`` (``bundletools.tracking``): where MONAI puts its
MLflow handlers in each config, what the bundles hand them, and (with MLflow installed: ``pip install
'.[mlflow]'``) a tracked training, evaluation and batch inference end to end."""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

from bundletools.tracking import check_handlers, default_uri, notify, prepare_training
from tests.utils import ALL_BUNDLES, BUNDLES, UNET, batch, config_list, run_bundle, skip_or_fail


def _patched(bundle: str, *names: str) -> ConfigParser:
    """The bundle's config as ``python -m monai.bundle run ... --tracking mlflow`` leaves it (its patch, as such)."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names])
    ConfigWorkflow.patch_bundle_tracking(parser, {**DEFAULT_MLFLOW_SETTINGS,
                                                  "configs": {**DEFAULT_MLFLOW_SETTINGS["configs"],
                                                              "save_execute_config": False}})
    return parser


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_monai_puts_its_handlers_where_the_bundles_take_them(bundle):
    train = _patched(bundle, "train")
    assert train["train#handlers"][-1]["_target_"] == "MLFlowHandler"
    assert train["validate#handlers"][-1]["_target_"] == "MLFlowHandler"
    # the bundle's own settings win over MONAI's defaults: a SQLite store MLflow 3.13+ accepts, the bundle's name
    assert train["tracking_uri"] == "$bundletools.tracking.default_uri(@output_dir)"
    assert train["experiment_name"] == bundle and "learning_rate" in train["tracking_params"]
    run = train["run"]
    assert run.index("$bundletools.tracking.prepare_training(@train#handlers, @tracking_params)") < run.index(
        "$@train#trainer.run()")
    # the batch runner takes MONAI's evaluator handler in its own list (MONAI would otherwise add val_handlers to it)
    inference = _patched(bundle, "inference")
    assert [h["_target_"] for h in inference["handlers"]] == ["MLFlowHandler"]
    assert inference["evaluator#handlers"] == "@handlers" and "val_handlers" not in inference["evaluator"]
    # evaluation ends its run (MONAI's validator handler leaves it open)
    evaluate = _patched(bundle, "train", "evaluate")
    assert evaluate["run"][-1] == "$bundletools.tracking.finish(@validate#handlers)"
    multi_gpu = _patched(bundle, "train", "multi_gpu_train")
    assert "$bundletools.tracking.prepare_training(@train#handlers, @tracking_params)" in multi_gpu["run"]


def test_the_default_store_is_a_sqlite_database_in_output_dir(tmp_path):
    uri = default_uri(tmp_path / "eval dir")
    assert uri == f"sqlite:///{tmp_path.as_posix()}/eval%20dir/mlruns.db" and (tmp_path / "eval dir").is_dir()


def test_prepare_training_leaves_a_run_without_tracking_alone():
    handlers = [object()]
    assert prepare_training(handlers, {"learning_rate": 0.1}) is handlers


def test_batch_handlers_get_the_report_and_a_failing_one_is_only_a_warning(unet_root, tmp_path, caplog):
    from bundletools.demo import make_synthetic_dataset

    scans = make_synthetic_dataset(tmp_path / "data", num_cases=1, shape=(24, 24, 24)) / "imagesTr"
    reports = []

    def broken(report):
        raise RuntimeError("tracking server unreachable")

    with caplog.at_level(logging.WARNING, logger="bundletools.tracking"):
        report = batch(scans, tmp_path / "out", unet_root, handlers=[reports.append, broken])
    assert reports == [report] and report["summary"]["succeeded"] == 1
    assert "could not record the batch: tracking server unreachable" in caplog.text
    with pytest.raises(ValueError, match="neither MONAI's MLFlowHandler nor a callable"):
        check_handlers(["mlflow"])
    notify([], report)  # nothing to tell


# ----------------------------------------------------------------------------------- end to end, with MLflow
def _mlflow():
    try:
        import mlflow
    except ImportError:
        skip_or_fail("mlflow is not installed (pip install '.[mlflow]': mlflow-skinny, SQLAlchemy and Alembic, "
                     "about 150 MB)", "REQUIRE_MLFLOW")
    return mlflow


@pytest.mark.slow
def test_tracked_training_evaluation_and_inference(tmp_path, synthetic_msd):
    """One tiny epoch, its evaluation and two batch inferences with ``--tracking mlflow``, into a store of its own:
    each is a finished run with its parameters and metrics, and the outputs are as without tracking."""
    mlflow = _mlflow()
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    root, out = tmp_path / "root", tmp_path / "segmentations"
    common = ["--tracking", "mlflow", "--tracking_uri", uri, "--bundle_root", root, "--num_workers", "0"]
    run_bundle(["run", "training", "--config_file", config_list(UNET, "train"), "--dataset_dir", synthetic_msd,
                "--epochs", "1", "--roi_size", "[32,32,32]", *common], cwd=tmp_path)
    run_bundle(["run", "--config_file", config_list(UNET, "train", "evaluate"), "--dataset_dir", synthetic_msd,
                *common], cwd=tmp_path)
    run_bundle(["run", "--config_file", config_list(UNET, "inference"), "--dataset_dir", synthetic_msd / "imagesTr",
                "--output_dir", out, *common], cwd=tmp_path)
    run_bundle([UNET, synthetic_msd / "imagesTr", tmp_path / "again", "--tracking", "mlflow", "--tracking_uri", uri,
                "--run_name", "nightly", "--bundle_root", root, "--num_workers", "0"], cwd=tmp_path,
               module="bundletools.infer")

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(UNET)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED"] * 4
    training, evaluation, inference, nightly = runs
    version = json.loads((BUNDLES / UNET / "configs" / "metadata.json").read_text())["version"]

    params = training.data.params
    assert params["bundle"] == UNET and params["bundle_version"] == version and params["network"] == "UNet"
    assert (params["learning_rate"], params["roi_size"], params["max_epochs"]) == ("0.001", "[32, 32, 32]", "1")
    assert len(client.get_metric_history(training.info.run_id, "train_loss")) >= 2  # iterations and the epoch
    assert 0 <= training.data.metrics["val_mean_dice"] <= 1
    assert any(a.path.startswith("config_") for a in client.list_artifacts(training.info.run_id))

    assert {"val_mean_dice", "val_hd95_mm"} <= set(evaluation.data.metrics)
    assert (root / "eval" / "metrics.csv").is_file()

    cases = len(list((synthetic_msd / "imagesTr").glob("*.nii.gz")))
    for run, folder in ((inference, out), (nightly, tmp_path / "again")):
        assert len(list(folder.glob("*_seg.nii.gz"))) == cases and (folder / "report.json").is_file()
        assert run.data.metrics["succeeded"] == cases and run.data.metrics["failed"] == 0
        assert run.data.params["bundle_version"] == version and len(run.data.params["model_sha256"]) == 64
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.json"]
    assert nightly.info.run_name == "nightly"
    # everything went into the store named: the bundle's default one was never made
    assert not (root / "eval" / "mlruns.db").exists()
    with sqlite3.connect(tmp_path / "store" / "mlruns.db") as db:
        assert db.execute("select count(*) from runs").fetchone() == (4,)
