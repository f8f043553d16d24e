# SPDX-License-Identifier: Apache-2.0
"""benchmarks.gpu_check runs end to end (on the CPU, in its quick mode) and writes every figure the docs quote.

The GPU machine is lent for minutes at a time; the check must work at its first call there. This runs each of its
parts on the real data with tiny epochs and inputs (the authors' code is not available here, so the comparison
part is left out) and checks the CSV's columns and metrics; the figures themselves mean nothing on a CPU.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest

from tests.utils import ALL_BUNDLES, REPO, UNET, shared_data, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

PER_BUNDLE = ("epoch_s", "network_s", "epoch_over_network", "amp_over_fp32_step", "validation_s", "overhead_share",
              "precision", "cases_per_min_task04", "large_scan_s")


def test_the_gpu_check_writes_every_figure(tmp_path):
    data = shared_data("Task04_Hippocampus").parent
    shared_data("Task04_Hippocampus_thick3mm")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--epochs", "2",
         "--data", str(data), "--out", str(tmp_path), "--log_dir", str(tmp_path / "logs")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "gpu.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"bundle", "metric", "value", "gpu", "date"}
    errors = [r for r in rows if r["metric"].endswith("_error")]
    assert not errors, errors
    values = {(r["bundle"], r["metric"]): r["value"] for r in rows}
    for bundle in ALL_BUNDLES:
        for metric in PER_BUNDLE:
            assert (bundle, metric) in values, f"{bundle} has no {metric}"
        assert math.isfinite(float(values[(bundle, "epoch_over_network")]))
    assert float(values[("unet_segmentation", "deterministic_epoch_s")]) > 0
    for metric in ("default_run_s", "default_run_dice"):
        assert 0 <= float(values[(UNET, metric)]) < math.inf
    assert float(values[("dnet", "dnet_bf16_depthwise_step_s")]) > 0
    table = (tmp_path / "gpu.md").read_text(encoding="utf-8")
    assert "torch" in table and all(f"| {bundle} |" in table for bundle in ALL_BUNDLES)
