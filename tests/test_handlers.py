# SPDX-License-Identifier: Apache-2.0
"""ResumableCheckpoint on a toy ignite engine: resuming the same run, and not resuming a run on other cases
(what MONAI Label's training requests need)."""

from __future__ import annotations

import logging
import re
import sys
import time

import pytest
import torch
from ignite.engine import Engine

from bundletools.handlers import IterationProgress, PolyLR, ResumableCheckpoint, datalist_fingerprint

CASES = [{"image": f"/data/imagesTr/case_{i}.nii.gz", "label": f"/data/labelsTr/case_{i}.nii.gz"} for i in range(4)]


def _train(ckpt_dir, data, epochs, seed=0, **checkpoint_args):
    """Train a linear layer for ``epochs`` with a ResumableCheckpoint; return (trainer, model)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()

    trainer = Engine(step)
    ResumableCheckpoint(ckpt_dir, {"model": model, "optimizer": optimizer}, data=data, **checkpoint_args).attach(trainer)
    trainer.run([0, 1], max_epochs=epochs)
    return trainer, model


def test_fingerprint_ignores_folders_and_order_but_not_cases():
    moved = [{k: v.replace("/data/", "/elsewhere/") for k, v in c.items()} for c in reversed(CASES)]
    assert datalist_fingerprint(moved) == datalist_fingerprint(CASES)
    assert datalist_fingerprint(CASES[:3]) != datalist_fingerprint(CASES)
    relabelled = [dict(CASES[0], label="/data/labelsTr/other.nii.gz")] + CASES[1:]
    assert datalist_fingerprint(relabelled) != datalist_fingerprint(CASES)
    multichannel = [{"image": ["/a/t1.nii.gz", "/a/t2.nii.gz"], "label": "/a/seg.nii.gz"}]
    assert datalist_fingerprint(multichannel) != datalist_fingerprint([{"image": "/a/t1.nii.gz",
                                                                        "label": "/a/seg.nii.gz"}])


def test_same_cases_resume_other_cases_start_a_new_run(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _train(tmp_path, CASES, 2)
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["data_fingerprint"] == datalist_fingerprint(CASES)

    trainer, _ = _train(tmp_path, CASES, 3)  # same cases: continues with epoch 3
    assert "epoch 2 was the last finished, continuing" in caplog.text
    assert trainer.state.epoch == 3

    caplog.clear()
    trainer, model = _train(tmp_path, CASES + [{"image": "/new/case_9.nii.gz", "label": "/new/case_9.nii.gz"}], 2,
                            seed=1)
    assert "run on other training cases: not resumed" in caplog.text
    assert trainer.state.epoch == 2  # two epochs trained, not "3 finished epochs of 2: nothing to do"
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["data_fingerprint"] != datalist_fingerprint(CASES)
    torch.testing.assert_close(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], model.weight)


def test_save_interval_writes_the_state_after_the_interval_and_after_the_last_epoch(tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 10))  # each call of time.monotonic is 10 s after the previous one
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    writes = []
    monkeypatch.setattr("bundletools.handlers.atomic_torch_save",
                        lambda obj, path: writes.append((path.name, obj.get("epoch") if "epoch" in obj else None)))
    _train(tmp_path, CASES, 6, save_interval_s=25)
    states = [epoch for name, epoch in writes if name == "training_state.pt"]
    # only when 25 s have passed since the start or the last write, and always after the last epoch
    assert states == [3, 6]
    assert [name for name, _ in writes].count("model.pt") == 6  # no evaluator: the model after every epoch

    writes.clear()
    _train(tmp_path / "every", CASES, 3)  # the default: the state after every epoch
    assert [epoch for name, epoch in writes if name == "training_state.pt"] == [1, 2, 3]
    with pytest.raises(ValueError, match="save_interval_s"):
        ResumableCheckpoint(tmp_path, {"model": torch.nn.Linear(1, 1)}, save_interval_s=-1)


def test_without_data_any_state_is_resumed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _train(tmp_path, CASES, 2)
    _train(tmp_path, None, 2)
    assert "records 2 finished epochs of 2: nothing to do" in caplog.text


def test_start_removes_half_written_checkpoints_of_a_killed_run_and_resumes(tmp_path):
    _train(tmp_path, CASES, 2)
    stale = [tmp_path / ".training_state.pt.tmp4242", tmp_path / ".model.pt.tmp4242"]
    for path in stale:  # what a SIGKILL during torch.save leaves
        path.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.tmp"
    other.write_text("not ours")
    trainer, _ = _train(tmp_path, CASES, 3)
    assert trainer.state.epoch == 3
    assert not any(path.exists() for path in stale)
    assert other.exists()


def _toy_trainer(iterations: int, epochs: int = 1):
    """A trainer whose output is a decollated batch with a decreasing loss, as MONAI's SupervisedTrainer's."""
    from ignite.engine import Engine

    losses = iter(torch.linspace(1.0, 0.1, iterations * epochs))  # one per iteration of the run

    def step(engine, batch):
        return [{"loss": next(losses)}]

    engine = Engine(step)
    return engine, list(range(iterations))


@pytest.fixture
def monai_log(caplog):
    """Records of MONAI's StatsHandler logger (it does not propagate to the root logger)."""
    logger = logging.getLogger("monai.handlers.StatsHandler")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_iteration_progress_logs_every_n_iterations_without_a_terminal(monai_log):
    caplog = monai_log
    engine, data = _toy_trainer(20)
    IterationProgress(every=5, bar=False).attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run(data, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if "Iter:" in r.getMessage()]
    assert [line.split(" --")[0] for line in lines] == [f"Epoch: 1/1, Iter: {i}/20" for i in (5, 10, 15, 20)]
    assert re.fullmatch(r"Epoch: 1/1, Iter: 5/20 -- train_loss: 0\.\d+ ", lines[0])


def test_iteration_progress_default_is_about_ten_lines_per_epoch(monai_log):
    caplog = monai_log
    engine, data = _toy_trainer(35, epochs=2)
    IterationProgress(bar=False).attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run(data, max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if "Iter:" in r.getMessage()]
    assert len(lines) == 2 * 11  # every 3rd of 35 iterations
    assert lines[11].startswith("Epoch: 2/2, Iter: 3/35")


def test_iteration_progress_shows_a_bar_on_a_terminal(monkeypatch, capsys, monai_log):
    caplog = monai_log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    engine, data = _toy_trainer(8)
    IterationProgress().attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run(data, max_epochs=1)
    err = capsys.readouterr().err
    assert re.search(r"Iteration: \[\d/8\]", err) and "train_loss=0.1" in err  # ignite/tqdm bar, with the loss
    assert not [r for r in caplog.records if "Iter:" in r.getMessage()]
    with pytest.raises(ValueError, match="every must be a positive number"):
        IterationProgress(every=0)


def test_labelled_metrics_saver_names_the_class_columns(tmp_path):
    import csv

    from bundletools.handlers import LabelledMetricsSaver

    engine = Engine(lambda e, b: None)
    saver = LabelledMetricsSaver(save_dir=str(tmp_path), metrics=["val_mean_dice"], metric_details="*",
                                 batch_transform=lambda x: [{"filename_or_obj": f"case_{i}.nii.gz"} for i in x],
                                 summary_ops="*", class_labels=["anterior", "posterior"])
    saver.attach(engine)
    engine.state.metrics = {"val_mean_dice": 0.75, "other": 1.0}
    engine.state.metric_details = {"val_mean_dice": torch.tensor([[0.5, 1.0], [0.7, 0.8]]),
                                   "val_hd95_mm": torch.tensor([[2.0, 3.0], [1.0, 4.0]])}
    engine.state.batch = [0, 1]
    saver._started(engine)
    saver._get_filenames(engine)
    saver(engine)
    for name in ("val_mean_dice", "val_hd95_mm"):
        with open(tmp_path / f"{name}_raw.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "anterior", "posterior", "mean"]
        assert rows[1][0] == "case_0.nii.gz"
        assert [float(v) for v in rows[2][1:]] == ([0.7, 0.8, 0.75] if name == "val_mean_dice" else [1.0, 4.0, 2.5])
    with open(tmp_path / "metrics.csv") as f:
        assert dict(csv.reader(f)) == {"val_mean_dice": "0.75"}


def _lr_trace(schedule_kwargs, epochs=5, epoch_length=10, base_lr=0.5, sleep=0.0):
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr)
    lrs = []

    def step(engine, batch):
        lrs.append(optimizer.param_groups[0]["lr"])
        if sleep:
            time.sleep(sleep)

    trainer = Engine(step)
    PolyLR(optimizer, **schedule_kwargs).attach(trainer)
    trainer.run(range(epoch_length), max_epochs=epochs)
    return lrs


def test_poly_lr_warms_up_then_decays_to_zero_over_the_epochs():
    lrs = _lr_trace({"warmup": 0.1}, epochs=5, epoch_length=10, base_lr=0.5)
    assert len(lrs) == 50
    assert lrs[0] == pytest.approx(0.5 * 0.2 * (1 - 1 / 50) ** 0.9)  # first of 5 warm-up iterations
    assert lrs[4] == pytest.approx(0.5 * (1 - 5 / 50) ** 0.9)  # warm-up done
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))
    assert all(a > b for a, b in zip(lrs[4:-1], lrs[5:]))
    assert lrs[-1] == 0.0
    assert lrs[25] == pytest.approx(0.5 * (1 - 26 / 50) ** 0.9)


def test_poly_lr_follows_a_wall_clock_budget_when_it_ends_first():
    # 40 iterations of at least 5 ms take at least 0.2 s, twice the budget: the schedule follows the clock, which
    # reaches zero by the 20th iteration, while the epoch count alone would still be at half the rate
    lrs = _lr_trace({"warmup": 0.0, "time_budget_s": 0.1}, epochs=2, epoch_length=20, base_lr=1.0, sleep=0.005)
    by_epochs = [(1 - (i + 1) / 40) ** 0.9 for i in range(40)]
    assert all(a <= b + 1e-9 for a, b in zip(lrs, by_epochs))
    assert lrs[21:] == [0.0] * 19 and by_epochs[20] > 0.4


def test_poly_lr_refuses_a_warmup_outside_the_budget():
    with pytest.raises(ValueError, match="warmup"):
        PolyLR(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), warmup=1.5)


def test_validation_every_interval_and_after_the_last_epoch():
    from bundletools.handlers import ValidationHandler

    class Recorded(ValidationHandler):
        def __call__(self, engine):
            validated.append(engine.state.epoch)

    for interval, epochs, expected in [(5, 8, [5, 8]), (5, 10, [5, 10]), (1, 3, [1, 2, 3]), (4, 2, [2])]:
        validated = []
        trainer = Engine(lambda engine, batch: None)
        Recorded(interval=interval).attach(trainer)
        trainer.run([0, 1], max_epochs=epochs)
        assert validated == expected, (interval, epochs)
