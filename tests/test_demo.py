# SPDX-License-Identifier: Apache-2.0
"""The quick-start demo, run as ``demo.sh`` runs it: every bundle's demo must learn its synthetic task (a mean
validation Dice of at least 0.85), end with the table of per-label Dice and HD95 and the seconds per case, point
to the QC pictures, and print no third-party deprecation warnings."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from bundletools.demo import DEMO_OVERRIDES
from tests.utils import run_bundle

pytestmark = pytest.mark.slow


def _dice(out: str) -> dict[str, float]:
    """The demo's closing table: mean validation Dice per label and over labels."""
    rows = dict(re.findall(r"^  (anterior|posterior|mean) +([0-9.]+) +[0-9.]+$", out, re.M))
    assert set(rows) == {"anterior", "posterior", "mean"}, out[-3000:]
    dice = {k: float(v) for k, v in rows.items()}
    assert np.isclose(dice["mean"], (dice["anterior"] + dice["posterior"]) / 2, atol=2e-3)
    return dice


def test_demo_learns_its_task_and_prints_the_table_without_warnings(tmp_path):
    # 12 cases (10 train, 2 validate) and 8 epochs instead of 16 and 8: about a minute on 2 cores
    proc = run_bundle(["--data_dir", tmp_path / "data", "--work_dir", tmp_path / "runs", "--num_cases", "12",
                       "--num_test", "2"], cwd=tmp_path, module="bundletools.demo")
    out = proc.output
    assert "Synthetic demo dataset" in out

    dice = _dice(out)
    assert dice["mean"] >= 0.85, f"demo's mean validation Dice {dice['mean']:.3f} < 0.85"
    assert re.search(r"Demo finished in \d+ s \(8 training epochs, [0-9.]+ s per epoch\)", out)
    assert re.search(r"Segmented 2 new synthetic scans in [0-9.]+ s per case", out)

    segmentations = tmp_path / "runs" / "unet_segmentation" / "segmentations"
    assert "QC pictures:    runs/unet_segmentation/segmentations/*_qc.png" in out  # relative to where it ran
    pictures = sorted(segmentations.glob("*_qc.png"))
    assert [p.name for p in pictures] == ["synthetic_test_000_qc.png", "synthetic_test_001_qc.png"]
    assert Image.open(pictures[0]).size == (768, 256)

    noise = [line for line in out.splitlines() if re.search(r"warning|deprecat", line, re.I)]
    assert not noise, "third-party warnings in the demo's output:\n" + "\n".join(noise[:5])


@pytest.mark.parametrize("bundle", sorted(set(DEMO_OVERRIDES) - {"unet_segmentation"}))
def test_every_bundles_demo_learns_its_task(tmp_path, bundle):
    """``demo.sh --bundle <name>`` as a new user runs it (16 cases, the bundle's demo recipe), with 1 new scan to
    segment instead of 4."""
    proc = run_bundle(["--bundle", bundle, "--data_dir", tmp_path / "data", "--work_dir", tmp_path / "runs",
                       "--num_test", "1"], cwd=tmp_path, module="bundletools.demo")
    out = proc.output
    dice = _dice(out)
    assert dice["mean"] >= 0.85, f"{bundle} demo's mean validation Dice {dice['mean']:.3f} < 0.85"
    epochs = DEMO_OVERRIDES[bundle][0]
    assert re.search(rf"Demo finished in \d+ s \({epochs} training epochs, [0-9.]+ s per epoch\)", out)
    assert re.search(r"Segmented 1 new synthetic scan in [0-9.]+ s per case", out)
    assert (tmp_path / "runs" / bundle / "segmentations" / "synthetic_test_000_qc.png").is_file()
    noise = [line for line in out.splitlines() if re.search(r"warning|deprecat", line, re.I)]
    assert not noise, "third-party warnings in the demo's output:\n" + "\n".join(noise[:5])
