# SPDX-License-Identifier: Apache-2.0
"""DICOM inputs whose geometry ITK reads without complaint but wrong (issue 24): slices of different orientations,
a gantry-tilted stack. Each fails its case with a reason naming the problem; never segmented on a wrong grid.

The series are made at test time from a real Task04 volume; the runner runs in-process (the UNet bundle's
``evaluator`` with a seeded random model, as in ``test_batch_hostile.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from bundletools.images import DatasetError, check_dicom_series
from tests.conftest import BUNDLES, shared_data
from tests.test_batch_hostile import batch, by_input
from tests.test_batch_inference import UNET, random_model
from tests.test_dicomseg import AXIAL, CASE, write_mr_series

pytestmark = pytest.mark.realdata

SPACING = (0.9, 0.8, 2.0)
ORIGIN = (-12.5, 30.25, 4.0)


def hippocampus() -> np.ndarray:
    """The real case's image, x/y/z (35 x 51 x 35)."""
    data = shared_data("Task04_Hippocampus")
    return np.asarray(nib.load(data / "imagesTr" / f"{CASE}.nii.gz").dataobj)


def rotation_x(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def restack(folder: Path, positions, orientations) -> None:
    """Give slice k (InstanceNumber k + 1) of a series the position ``positions[k]`` and the orientation whose row
    and column directions are the first two columns of ``orientations[k]`` (LPS), as a scanner would write them."""
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        k = int(ds.InstanceNumber) - 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*orientations[k][:, 0], *orientations[k][:, 1])]
        ds.save_as(path, enforce_file_format=True)


def slice_positions(direction: np.ndarray, steps: int) -> list[np.ndarray]:
    return [np.asarray(ORIGIN) + direction * SPACING[2] * k for k in range(steps)]


def runner_root(tmp_path: Path) -> Path:
    """A random UNet bundle folder with the bundle's configs (their metadata.json names the SEG's segments)."""
    root = random_model(UNET, tmp_path / "bundle")
    shutil.copytree(BUNDLES / UNET / "configs", root / "configs")
    return root


# --------------------------------------------------------------------------- item 3: different orientations
def test_slices_of_different_orientations_fail_the_case_naming_them(tmp_path):
    """6 axial slices and 6 rotated 20 degrees in-plane (the same normal, so the positions are evenly spaced along
    it): ITK would give every slice the first one's orientation."""
    scans = tmp_path / "scans"
    write_mr_series(scans / "mixed", hippocampus()[:, :, :12], SPACING, ORIGIN, AXIAL)
    restack(scans / "mixed", slice_positions(AXIAL[:, 2], 12), [AXIAL] * 6 + [rotation_z(20)] * 6)
    with pytest.raises(DatasetError, match=r"mixed: inconsistent slice orientations: ImageOrientationPatient "
                                           r"\[1, 0, 0, 0, 1, 0\] in 6 slices, \[0.9397, 0.342, 0, -0.342, 0.9397, 0\] "
                                           r"in 6 slices"):
        check_dicom_series(scans / "mixed")

    case = by_input(batch(scans, tmp_path / "out", runner_root(tmp_path)))["mixed"]
    assert case["status"] == "failed" and "inconsistent slice orientations" in case["reason"]
    assert not (tmp_path / "out" / "mixed_seg.nii.gz").exists()


def test_orientations_that_differ_by_rounding_are_one_orientation(tmp_path):
    """Scanners write direction cosines to 6 or more decimals; differences at that level are not a problem."""
    oblique = rotation_z(20) @ rotation_x(10)
    jitter = [oblique + np.random.default_rng(k).uniform(-2e-6, 2e-6, (3, 3)) for k in range(12)]
    write_mr_series(tmp_path / "series", hippocampus()[:, :, :12], SPACING, ORIGIN, oblique)
    restack(tmp_path / "series", slice_positions(oblique[:, 2], 12), jitter)
    assert check_dicom_series(tmp_path / "series").shape == (35, 51, 12)


# --------------------------------------------------------------------------------------- item 4: gantry tilt
def test_a_gantry_tilted_series_fails_with_gantry_tilt_and_no_output(tmp_path):
    """Orientation tilted 15 degrees about x, positions stacked straight along z by 2 mm, as CT scanners write it:
    ITK stacks the slices along their normal, which puts source slice 11 5.7 mm from where it is. The output could
    not be on the source's grid (its axes are sheared), so the case fails and says why."""
    scans = tmp_path / "scans"
    tilted = rotation_x(15)
    write_mr_series(scans / "tilted", hippocampus()[:, :, :16], SPACING, ORIGIN, tilted)
    positions = slice_positions(AXIAL[:, 2], 16)
    restack(scans / "tilted", positions, [tilted] * 16)

    # what ITK would do: slice 11 lies where the slices' normal puts it, not at its position
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(scans / "tilted")))
    itk_slice_11 = np.asarray(reader.Execute().TransformIndexToPhysicalPoint((0, 0, 11)))
    assert np.linalg.norm(itk_slice_11 - positions[11]) > 5.0

    with pytest.raises(DatasetError, match=r"tilted: gantry tilt: the slices are stacked 15.0 degrees off the "
                                           r"normal of their orientation"):
        check_dicom_series(scans / "tilted")
    case = by_input(batch(scans, tmp_path / "out", runner_root(tmp_path)))["tilted"]
    assert case["status"] == "failed" and "gantry tilt" in case["reason"]
    assert not list((tmp_path / "out").glob("tilted*"))


def test_an_oblique_series_stacked_along_its_normal_is_no_tilt(tmp_path):
    oblique = rotation_z(-30) @ rotation_x(15)
    write_mr_series(tmp_path / "series", hippocampus()[:, :, :16], SPACING, ORIGIN, oblique)
    header = check_dicom_series(tmp_path / "series")
    assert header.shape == (35, 51, 16)
