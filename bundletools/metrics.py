# SPDX-License-Identifier: Apache-2.0
"""Metrics in physical units for the bundles' evaluation workflows."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric

__all__ = ["HausdorffDistanceMM"]


class HausdorffDistanceMM(HausdorffDistanceMetric):
    """Hausdorff distance (95th percentile by default) in millimetres, with each case's own voxel spacing.

    MONAI's metric handlers call a metric with ``(y_pred, y)`` only, so the spacing never reaches
    :class:`~monai.metrics.HausdorffDistanceMetric` and the distance comes out in voxels. This subclass reads
    the spacing from the ``MetaTensor`` affine of each prediction (after ``Invertd``, the original scan's
    spacing), so anisotropic scans are measured correctly. A ``spacing`` passed explicitly still wins.
    """

    def __init__(self, include_background: bool = False, percentile: float | None = 95.0, **kwargs: Any) -> None:
        super().__init__(include_background=include_background, percentile=percentile, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if kwargs.get("spacing") is None and isinstance(y_pred, MetaTensor):
            spatial_dims = y_pred.ndim - 2
            pixdim = y_pred.pixdim
            # batched MetaTensors carry one affine per case; a single case has a 2D affine
            if isinstance(pixdim, list):
                kwargs["spacing"] = [[float(s) for s in p[:spatial_dims]] for p in pixdim]
            else:
                kwargs["spacing"] = [float(s) for s in pixdim[:spatial_dims]]
        return super()._compute_tensor(y_pred, y, **kwargs)
