# SPDX-License-Identifier: Apache-2.0
"""Score segmentation files the way the bundles' ``evaluate.json`` scores a model, for segmentations made elsewhere.

``evaluate.json`` scores each case in its original grid with MONAI's ``MeanDice`` (``DiceMetric``, background
excluded) and ``bundletools.HausdorffDistanceMM`` (95th percentile, in mm) on one-hot labels, and writes per-case
and summary CSVs with ``bundletools.handlers.LabelledMetricsSaver`` (MONAI's ``write_metrics_reports``). A
segmentation file on the scan's own grid (nnU-Net's predictor writes one; so does the bundles' batch inference)
gets the same numbers from :func:`score_segmentations`: the same metric classes, the same reports, so the summary's
``mean`` is computed the same way (the mean over classes per case, then over cases, NaNs left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["score_segmentations"]


def score_segmentations(pairs: Sequence[tuple[str | Path, str | Path]], save_dir: str | Path, num_classes: int,
                        class_labels: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Dice and HD95 (mm) of each ``(segmentation, label)`` pair of label files on the same grid.

    Writes ``val_mean_dice_raw.csv``, ``val_hd95_mm_raw.csv`` and their ``_summary.csv`` into ``save_dir``, as
    ``evaluate.json`` does, and returns ``(dice, hd95)``, each ``{class label: mean over cases, "mean": ...}``.
    A segmentation whose shape or affine differs from its label's is an error (it would be scored off its grid).
    """
    import torch
    from monai.handlers.utils import write_metrics_reports
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot
    from monai.transforms import LoadImage

    from bundletools import HausdorffDistanceMM

    load = LoadImage(image_only=True, ensure_channel_first=True)
    dice = DiceMetric(include_background=False)
    hd95 = HausdorffDistanceMM(include_background=False, percentile=95)
    names = []
    for segmentation, label in pairs:
        pred, truth = load(segmentation), load(label)
        if pred.shape != truth.shape or not np.allclose(pred.affine, truth.affine, atol=1e-3):
            raise ValueError(f"{segmentation}: shape {tuple(pred.shape[1:])} and affine {pred.affine.tolist()} differ "
                             f"from its label's ({tuple(truth.shape[1:])}, {truth.affine.tolist()})")
        pred, truth = (one_hot(x[None].round().long(), num_classes, dim=1) for x in (pred, truth))
        dice(y_pred=pred, y=truth)
        spacing = [float(s) for s in torch.as_tensor(truth.pixdim)[: truth.ndim - 2]]
        hd95(y_pred=pred, y=truth, spacing=spacing)
        names.append(str(label))
    details = {"val_mean_dice": dice.get_buffer(), "val_hd95_mm": hd95.get_buffer()}
    save_dir = Path(save_dir)
    common = dict(save_dir=save_dir, images=names, summary_ops="*")
    write_metrics_reports(metrics={name: float(np.nanmean(v.cpu().numpy())) for name, v in details.items()},
                          metric_details=None, **common)
    for name, values in details.items():
        write_metrics_reports(metrics=None, metric_details={name: values}, class_labels=list(class_labels), **common)
    return _summary(save_dir / "val_mean_dice_summary.csv"), _summary(save_dir / "val_hd95_mm_summary.csv")


def _summary(path: Path) -> dict[str, float]:
    """The ``mean`` column of a summary CSV, by class."""
    rows = [line.split(",") for line in path.read_text(encoding="utf-8").splitlines()]
    column = rows[0].index("mean")
    return {row[0]: float(row[column]) for row in rows[1:]}
