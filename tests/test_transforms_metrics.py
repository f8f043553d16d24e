# SPDX-License-Identifier: Apache-2.0
"""The shared input check transform and the millimetre Hausdorff metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric

from bundletools import HausdorffDistanceMM
from transforms import CheckImaged, InvalidImageError


def _image(shape, value=1.0, name="/data/scan_007.nii.gz"):
    return MetaTensor(torch.full(shape, value), meta={"filename_or_obj": name})


def test_check_imaged_passes_good_images_through_unchanged():
    img = _image((1, 8, 9, 10))
    out = CheckImaged("image", num_channels=1)({"image": img})
    assert out["image"] is img


@pytest.mark.parametrize(
    "shape, value, message",
    [
        ((1, 8, 9), 1.0, r"scan_007.nii.gz: has 2 spatial axes \(shape \(8, 9\)\), the model needs 3D"),
        ((2, 8, 9, 10), 1.0, r"scan_007.nii.gz: has 2 channel\(s\), the model expects 1"),
        ((1, 8, 0, 10), 1.0, r"scan_007.nii.gz: has an empty axis"),
        ((1, 8, 9, 10), float("nan"), r"scan_007.nii.gz: contains NaN or Inf"),
        ((1, 8, 9, 10), float("inf"), r"scan_007.nii.gz: contains NaN or Inf"),
    ],
)
def test_check_imaged_names_file_and_problem(shape, value, message):
    with pytest.raises(InvalidImageError, match=message):
        CheckImaged("image", num_channels=1)({"image": _image(shape, value)})


def _sphere(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return ((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2


def _onehot(mask):
    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


def test_hausdorff_uses_each_cases_spacing_in_mm():
    shape = (20, 20, 20)
    pred, label = _onehot(_sphere(shape, (10, 10, 10), 4)), _onehot(_sphere(shape, (10, 10, 13), 4))
    spacing = (0.5, 0.5, 3.0)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    pred_meta = MetaTensor(pred, affine=affine)
    label_meta = MetaTensor(label, affine=affine)

    in_mm = HausdorffDistanceMM(include_background=False)(pred_meta, label_meta)
    reference = HausdorffDistanceMetric(include_background=False, percentile=95)(pred, label, spacing=spacing)
    in_voxels = HausdorffDistanceMetric(include_background=False, percentile=95)(pred, label)
    assert torch.allclose(in_mm, reference)
    assert in_mm.item() > 1.5 * in_voxels.item()  # the 3 mm axis dominates: voxels would understate it

    # a batch of two cases, each with its own spacing
    iso = torch.eye(4, dtype=torch.float64)
    batch_pred = MetaTensor(torch.cat([pred, pred]), affine=torch.stack([affine, iso]))
    batch_label = MetaTensor(torch.cat([label, label]), affine=torch.stack([affine, iso]))
    batch_pred.is_batch = batch_label.is_batch = True
    per_case = HausdorffDistanceMM(include_background=False, reduction="none")(batch_pred, batch_label)
    assert per_case[0].item() == pytest.approx(reference.item())
    assert per_case[1].item() == pytest.approx(in_voxels.item())
