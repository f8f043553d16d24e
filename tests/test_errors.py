# SPDX-License-Identifier: Apache-2.0
"""User errors end a bundle command in one line on stderr (issue 24 item 14): the rules in-process, then
``python -m monai.bundle run`` as users run it. No command here trains: each fails before its first epoch."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from bundletools import errors
from bundletools.data import DatasetError
from bundletools.errors import CommandLineError
from bundletools.outputs import BatchError
from tests.utils import UNET, config_list, run_bundle



def _raised(make) -> BaseException:
    try:
        make()
    except BaseException as e:  # whatever was raised
        return e
    raise AssertionError("nothing was raised")


def _wrapped(error: BaseException) -> BaseException:
    """``error`` as MONAI's config parser hands it on: the cause of a RuntimeError, itself a cause."""
    def evaluate():
        try:
            raise error
        except BaseException as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: $...") from e

    def run():
        try:
            evaluate()
        except RuntimeError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: $@trainer.run()") from e

    return _raised(run)


def test_user_errors_are_found_through_explicit_causes_only():
    for error in (DatasetError("d"), BatchError("b"), CommandLineError("c"), FileNotFoundError(2, "no file", "x")):
        assert errors.user_error(error) is error
        assert errors.user_error(_wrapped(error)) is error
    assert errors.user_error(_wrapped(ValueError("a bug"))) is None

    def bug_while_handling():  # a new problem, not caused by the missing file: it keeps its traceback
        try:
            open("/nonexistent/file")
        except FileNotFoundError:
            raise TypeError("a bug in the handler")  # implicitly chained: the point of the test

    raised = _raised(bug_while_handling)
    assert isinstance(raised.__context__, FileNotFoundError) and errors.user_error(raised) is None


def test_one_line_joins_a_list_of_problems_and_escapes_control_characters():
    report = DatasetError("/d/dataset.json lists a case more than once:\n  - case a: entry 0 and entry 3\n"
                          "  - case b: entry 1 and entry 4\n")
    assert errors.one_line(report) == "/d/dataset.json lists a case more than once: case a: entry 0 and entry 3; " \
                                      "case b: entry 1 and entry 4"
    assert errors.one_line(DatasetError("bad\tname\x1b[2J")) == "bad\\tname\\x1b[2J"
    assert errors.one_line(BatchError("")) == "BatchError"


def test_excepthook_prints_a_user_error_as_one_line_and_anything_else_with_its_traceback(capsys, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_VARIABLE, raising=False)
    error = _wrapped(DatasetError("dataset_dir '/x' does not exist or is not a folder"))
    errors.excepthook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert err.endswith(": error: dataset_dir '/x' does not exist or is not a folder\n") and err.count("\n") == 1

    bug = _wrapped(ZeroDivisionError("division by zero"))
    errors.excepthook(type(bug), bug, bug.__traceback__)
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ZeroDivisionError: division by zero" in err and ": error: " not in err

    monkeypatch.setenv(errors.TRACEBACK_VARIABLE, "1")
    errors.excepthook(type(error), error, error.__traceback__)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "DatasetError" in "\n".join(lines)
    assert lines[-1].endswith(": error: dataset_dir '/x' does not exist or is not a folder")


def test_the_hook_is_installed_only_over_python_s_default(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    errors.install_excepthook()
    assert sys.excepthook is errors.excepthook

    def someone_elses_hook(*args):  # IPython's, a debugger's, an error reporter's
        pass

    monkeypatch.setattr(sys, "excepthook", someone_elses_hook)
    errors.install_excepthook()
    assert sys.excepthook is someone_elses_hook


def test_stats_handler_logs_no_traceback_for_a_user_error(caplog, monkeypatch):
    """MONAI's StatsHandler logs the traceback of whatever an engine run raises; the bundles' one does not for a
    user error, which then ends the command in one line."""
    from ignite.engine import Engine

    from bundletools.handlers import StatsHandler

    monkeypatch.delenv(errors.TRACEBACK_VARIABLE, raising=False)
    for error, logged in ((FileNotFoundError(2, "No such file or directory", "model.pt"), False),
                          (ZeroDivisionError("a bug"), True)):
        def step(engine, batch, error=error):
            raise error

        engine = Engine(step)
        handler = StatsHandler(name="bundletools.tests.stats")
        handler.attach(engine)
        handler.logger.addHandler(caplog.handler)  # MONAI's logger does not propagate to caplog's
        try:
            with pytest.raises(type(error)):
                engine.run([0])
        finally:
            handler.logger.removeHandler(caplog.handler)
        assert any(r.exc_info for r in caplog.records) is logged
        caplog.clear()


# ------------------------------------------------------------------------ python -m monai.bundle run, for real
def _assert_one_line_error(proc, line: str) -> None:
    """Exit status 1, ``line`` the last line on stderr, no traceback anywhere, nothing else on stderr but the
    few warnings MONAI prints while it reads the configs."""
    stderr = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.output[-3000:]
    assert stderr[-1] == line, proc.output[-3000:]
    assert "Traceback" not in proc.output and "Failed to evaluate" not in proc.output, proc.output[-3000:]
    assert len(stderr) < 5, proc.stderr


def _training(dataset: Path, root: Path, *configs: str) -> list:
    return ["run", "training", "--config_file", config_list(UNET, "train", *configs), "--dataset_dir", dataset,
            "--bundle_root", root, "--epochs", "1", "--num_workers", "0"]


def _listing(msd: Path, *entries: dict) -> None:
    spec = json.loads((msd / "dataset.json").read_text())
    spec["training"] += list(entries)
    (msd / "dataset.json").write_text(json.dumps(spec))


def test_training_without_its_dataset_ends_in_one_line(tmp_path):
    missing = tmp_path / "data" / "Task04_Hippocampus"
    proc = run_bundle(_training(missing, tmp_path / "bundle"), cwd=tmp_path, check=False)
    _assert_one_line_error(proc, f"monai.bundle: error: dataset_dir '{missing}' does not exist or is not a folder")


def test_training_with_a_bad_or_repeated_dataset_entry_ends_in_one_line(tmp_path, synthetic_msd):
    bad = Path(shutil.copytree(synthetic_msd, tmp_path / "bad"))
    _listing(bad, {"image": "./imagesTr/synthetic_009.nii.gz", "label": "./labelsTr/synthetic_000.nii.gz"})
    proc = run_bundle(_training(bad, tmp_path / "bundle"), cwd=tmp_path, check=False)
    _assert_one_line_error(proc, f"monai.bundle: error: {bad / 'dataset.json'} lists files that are missing: case "
                                 "synthetic_009: image file './imagesTr/synthetic_009.nii.gz' does not exist")

    repeated = Path(shutil.copytree(synthetic_msd, tmp_path / "repeated"))
    _listing(repeated, {"image": "imagesTr//synthetic_001.nii.gz", "label": "labelsTr/synthetic_001.nii.gz"})
    proc = run_bundle(_training(repeated, tmp_path / "bundle"), cwd=tmp_path, check=False)
    _assert_one_line_error(proc, f"monai.bundle: error: {repeated / 'dataset.json'} lists a case more than once; "
                                 "remove the repeated entries: case synthetic_001: entry 1 "
                                 "('./imagesTr/synthetic_001.nii.gz') and entry 6 ('imagesTr//synthetic_001.nii.gz')"
                                 " are the same image file")


def test_evaluation_without_a_model_ends_in_one_line(tmp_path, synthetic_msd):
    """The error comes from inside the evaluator's ignite run, where MONAI's StatsHandler used to log its
    traceback (on stdout) before the process printed it again."""
    root = tmp_path / "bundle"
    proc = run_bundle(["run", "--config_file", config_list(UNET, "train", "evaluate"), "--dataset_dir",
                       synthetic_msd, "--bundle_root", root, "--num_workers", "0"], cwd=tmp_path, check=False)
    _assert_one_line_error(proc, f"monai.bundle: error: [Errno 2] No such file or directory: "
                                 f"'{root / 'models' / 'model.pt'}'")


def test_inference_of_a_missing_folder_ends_in_one_line(tmp_path):
    missing = tmp_path / "scans"
    proc = run_bundle(["run", "--config_file", config_list(UNET, "inference"), "--dataset_dir", missing,
                       "--output_dir", tmp_path / "out", "--bundle_root", tmp_path / "bundle"], cwd=tmp_path,
                      check=False)
    _assert_one_line_error(proc, f"monai.bundle: error: dataset_dir '{missing}' does not exist or is not a folder")


@pytest.mark.slow  # two processes and a rendezvous: about 17 s
def test_every_torchrun_process_prints_the_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_bundle(_training(missing, tmp_path / "bundle", "multi_gpu_train"), cwd=tmp_path, check=False,
                      torchrun=2)
    assert proc.returncode != 0
    line = f"monai.bundle: error: dataset_dir '{missing}' does not exist or is not a folder"
    # torchrun prefixes each process's lines with its rank ("[rank1]: "); its own failure summary follows them
    assert len([ln for ln in proc.stderr.splitlines() if ln.endswith(line)]) == 2, proc.output[-3000:]
    assert "Failed to evaluate" not in proc.output and "bundletools/data.py" not in proc.output
