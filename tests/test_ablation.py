# SPDX-License-Identifier: Apache-2.0
"""The ablation benchmark (``python -m benchmarks.ablation``) returns its arms' figures as data: one epoch per arm of
the CSAM ablation on synthetic data."""

from __future__ import annotations

import pytest

from benchmarks.ablation import ABLATIONS, run_ablation

pytestmark = pytest.mark.slow


def test_the_csam_ablation_trains_both_arms_and_returns_their_figures(synthetic_msd, tmp_path):
    overrides = ["--dataset_dir", str(synthetic_msd), "--num_workers", "0", "--roi_size", "[32,32,8]"]
    results = run_ablation("csam", epochs=1, overrides=overrides, work_dir=tmp_path)
    assert [r.name for r in results] == list(ABLATIONS["csam"].arms)
    with_csam, without = results
    # the bundle's widths: CSAM adds 12,671 parameters to the 535,539 of the plain U-Net (the card's figures)
    assert (with_csam.parameters, without.parameters) == (548_210, 535_539)
    for result in results:
        run = result.run
        assert len(run.epoch_s) == 1 and len(run.val_dice) == 1 and run.seconds_per_epoch > 0
        assert set(run.dice) == set(run.hd95) == {"anterior", "posterior", "mean"}
        assert 0.0 <= run.dice["mean"] <= 1.0
        assert (run.work_dir / "models" / "model.pt").is_file()
