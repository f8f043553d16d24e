# SPDX-License-Identifier: Apache-2.0
"""The shared input check transform and the millimetre Hausdorff metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric

from bundletools import HausdorffDistanceMM
from transforms import CheckImaged, InvalidImageError, SpacingMetaSafed


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


def test_spacing_meta_safe_keeps_monai_label_strings_out_of_spacingd(monkeypatch):
    """MONAI 1.6's Spacingd calls ``.update`` on every ``image_*`` entry; MONAI Label adds ``image_path`` (a str).
    Whatever the installed MONAI does, Spacingd itself must only see mapping-valued ``image_*`` entries, and the
    result must be Spacingd's, invertible, with ``image_path`` back unchanged."""
    from monai.transforms import Invertd, Spacingd

    original = Spacingd.__call__

    def strict_call(self, data, lazy=None):
        bad = [k for k, v in data.items() if str(k).startswith("image_") and not isinstance(v, dict)]
        assert not bad, f"Spacingd got non-dict image_* entries {bad} (MONAI 1.6 fails on them)"
        return original(self, data, lazy=lazy)

    monkeypatch.setattr(Spacingd, "__call__", strict_call)
    affine = torch.diag(torch.tensor([2.0, 1.0, 1.5, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.rand(1, 10, 12, 8), affine=affine, meta={"filename_or_obj": "/s/scan.nii.gz"})
    data = {"image": image, "image_path": "/s/scan.nii.gz", "image_meta_dict": {"filename_or_obj": "/s/scan.nii.gz"},
            "model": "unet_segmentation"}
    with pytest.raises(AssertionError, match="image_path"):
        Spacingd("image", pixdim=(1.0, 1.0, 1.0))(dict(data))

    transform = SpacingMetaSafed("image", pixdim=(1.0, 1.0, 1.0))
    out = transform(dict(data))
    assert out["image_path"] == "/s/scan.nii.gz" and out["model"] == "unet_segmentation"
    reference = Spacingd("image", pixdim=(1.0, 1.0, 1.0))({"image": image.clone()})["image"]
    assert out["image"].shape == reference.shape != image.shape
    torch.testing.assert_close(out["image"].as_tensor(), reference.as_tensor())
    out["pred"] = out["image"].clone()
    inverted = Invertd("pred", transform=transform, orig_keys="image")(out)
    assert inverted["pred"].shape == (1, 10, 12, 8)


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
