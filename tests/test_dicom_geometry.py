# SPDX-License-Identifier: Apache-2.0
"""DICOM inputs whose geometry ITK reads without complaint but wrong (issue 24): slices of different orientations,
a gantry-tilted stack, a multi-frame file. Each is either read onto its true grid, with a DICOM SEG whose frames lie
on the source planes, or fails its case with a reason naming the problem; never segmented on a wrong grid. Also a
SEG of a series that lacks attributes a SEG copies (item 10).

The series are made at test time from a real Task04 volume; the runner runs in-process (the UNet bundle's
``evaluator`` with a seeded random model, as in ``test_batch_hostile.py``)."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from bundletools.dicomseg import AlgorithmInfo, build_segmentation, read_series, segmentation_writer
from bundletools.images import DatasetError, check_dicom_series
from tests.utils import AXIAL, BUNDLES, CASE, UNET, batch, by_input, random_model, shared_data, write_mr_series

pytestmark = pytest.mark.realdata

SPACING = (0.9, 0.8, 2.0)
ORIGIN = (-12.5, 30.25, 4.0)
NAMES = {1: "anterior", 2: "posterior"}
ALGORITHM = AlgorithmInfo(UNET, "0.1.0", "ab" * 32)


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
    """A UNet bundle folder with a random model."""
    return random_model(UNET, tmp_path / "bundle")


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


# ------------------------------------------------------------------------------------- item 5: multi-frame
def write_multiframe(folder: Path, source: Path, top_level_geometry: bool = False, order=None,
                     drop_positions: bool = False, classic: bool = False, measures_per_frame: bool = False,
                     drop_functional_groups: bool = False) -> Path:
    """The single-frame series ``source`` as one Legacy Converted Enhanced MR Image (per-frame positions in
    PlanePositionSequence, the orientation and spacing shared), in ``folder/multiframe.dcm``.

    Args:
        top_level_geometry: also write the first frame's position, orientation and spacing as top-level
            attributes, as some converters do (a reader that ignores the functional groups sees one plane).
        order: store the frames in this order of the converter's (the pixel data and the per-frame groups alike).
        drop_positions: leave out PlanePositionSequence (a multi-frame file whose frames have no positions).
        classic: the SOP class of the single-frame slices (MR Image Storage, whose IOD has no frames), with the
            first frame's geometry at the top level, as some exporters write multi-frame files.
        measures_per_frame: the pixel spacing in each frame's functional groups instead of the shared ones.
        drop_functional_groups: leave out the per-frame and shared functional groups.
    """
    slices = [pydicom.dcmread(f) for f in sorted(source.iterdir())]
    logging.getLogger("highdicom").setLevel(logging.ERROR)  # attributes a test series lacks (FrameType, windows)
    ds = highdicom.legacy.LegacyConvertedEnhancedMRImage(slices, series_instance_uid=highdicom.UID(),
                                                         series_number=2, sop_instance_uid=highdicom.UID(),
                                                         instance_number=1)
    frames = ds.pixel_array
    if order is not None:
        ds.PerFrameFunctionalGroupsSequence = [copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[i]) for i in order]
        ds.PixelData = np.ascontiguousarray(frames[list(order)]).tobytes()
    shared = ds.SharedFunctionalGroupsSequence[0]
    if measures_per_frame:
        for item in ds.PerFrameFunctionalGroupsSequence:
            item.PixelMeasuresSequence = copy.deepcopy(shared.PixelMeasuresSequence)
        del shared.PixelMeasuresSequence
    if classic:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    if top_level_geometry:
        ds.ImagePositionPatient = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
        ds.ImageOrientationPatient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        ds.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing
    if drop_positions:
        for item in ds.PerFrameFunctionalGroupsSequence:
            del item.PlanePositionSequence
    if drop_functional_groups:
        del ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence
    folder.mkdir(parents=True)
    ds.save_as(folder / "multiframe.dcm", enforce_file_format=True)
    return folder / "multiframe.dcm"


def frame_positions(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return np.array([[float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
                     for item in ds.PerFrameFunctionalGroupsSequence])


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    """The real case as an oblique single-frame series (2 mm slices, the frames of the multi-frame files)."""
    folder = tmp_path_factory.mktemp("slices") / "series"
    write_mr_series(folder, hippocampus(), SPACING, ORIGIN, rotation_z(20) @ rotation_x(15))
    return folder


def test_a_multiframe_file_is_read_on_the_grid_of_its_per_frame_positions(slices, tmp_path):
    """The header of a one-file series counts its frames (``max_voxels`` sees them all) and its affine puts voxel
    plane k on frame k's position; the voxels read are the slices' voxels."""
    from transforms import LoadImageSeriesd

    path = write_multiframe(tmp_path / "mf", slices)
    header = check_dicom_series(tmp_path / "mf")
    assert header.shape == (35, 51, 35)
    positions_ras = frame_positions(path) * [-1, -1, 1]
    np.testing.assert_allclose([header.affine @ [0, 0, k, 1] for k in range(35)], np.c_[positions_ras, np.ones(35)],
                               atol=1e-4)

    image = LoadImageSeriesd(keys="image", image_only=True)({"image": str(tmp_path / "mf")})["image"]
    np.testing.assert_allclose(np.asarray(image.affine), header.affine, atol=1e-4)
    reference = LoadImageSeriesd(keys="image", image_only=True)({"image": str(slices)})["image"]
    reference_positions = np.array([np.asarray(reference.affine)[:3] @ [0, 0, k, 1] for k in range(35)])
    order = [int(np.argmin(np.linalg.norm(reference_positions - p, axis=1))) for p in positions_ras]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(reference)[:, :, order])


@pytest.mark.parametrize("variant, reason", [
    ({"order": np.random.default_rng(1).permutation(35)}, "the frames of multiframe.dcm are not stored in slice order"),
    ({"drop_positions": True}, "a multi-frame file, but its frames have no PlanePositionSequence"),
    ({"classic": True, "top_level_geometry": True},
     r"ITK reads multiframe.dcm onto a grid that puts frame \d+ [\d.]+ mm from where its functional groups place it"),
    ({"classic": True, "top_level_geometry": True, "drop_functional_groups": True},
     "multiframe.dcm holds 35 frames but no per-frame functional groups"),
], ids=["frames_out_of_order", "no_positions", "classic_sop_class", "no_functional_groups"])
def test_a_multiframe_file_whose_geometry_cannot_be_read_fails_with_the_reason(slices, tmp_path, variant, reason):
    """Frames not stored in slice order would be stacked in file order by ITK; frames without positions have no
    known geometry; GDCM ignores the functional groups of an MR Image Storage file (a single-frame IOD) and stacks
    its frames 1 mm apart; without functional groups nothing says where the frames after the first lie."""
    write_multiframe(tmp_path / "mf", slices, **variant)
    with pytest.raises(DatasetError, match=reason):
        check_dicom_series(tmp_path / "mf")


def test_a_multiframe_file_directly_in_the_input_folder_makes_that_folder_its_series(slices, tmp_path):
    """Discovery takes a folder that holds DICOM files as one series, whatever else it holds: a multi-frame file
    beside a NIfTI file in ``IN`` is the case named after ``IN``, read on its frames' grid."""
    from bundletools.data import inference_datalist

    scans = tmp_path / "scans"
    write_multiframe(scans, slices)
    shutil.copy(shared_data("Task04_Hippocampus") / "imagesTr" / f"{CASE}.nii.gz", scans)
    assert [(d["case"], Path(d["image"]).name) for d in inference_datalist(scans)] == [
        (CASE, f"{CASE}.nii.gz"), ("scans", "scans")]
    assert check_dicom_series(scans).shape == (35, 51, 35)


def test_two_multiframe_files_of_one_series_in_a_folder_fail(slices, tmp_path):
    path = write_multiframe(tmp_path / "mf", slices)
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = highdicom.UID()
    ds.save_as(tmp_path / "mf" / "another.dcm", enforce_file_format=True)
    with pytest.raises(DatasetError, match="its series is 2 files, 2 of them multi-frame; a multi-frame file is a "
                                           "series of its own"):
        check_dicom_series(tmp_path / "mf")


@pytest.mark.parametrize("top_level_geometry", [False, True], ids=["enhanced", "with_top_level_geometry"])
def test_runner_segments_a_multiframe_file_and_its_seg_covers_every_labelled_frame(slices, tmp_path,
                                                                                   top_level_geometry):
    """The NIfTI output is on the frames' grid, and every (frame, segment) with labels in it is a SEG frame that
    references that source frame, lies on its plane and holds its labels."""
    scans = tmp_path / "scans"
    source = write_multiframe(scans / "multiframe", slices, top_level_geometry=top_level_geometry)
    out = tmp_path / "out"
    case = by_input(batch(scans, out, runner_root(tmp_path), dicom_seg=True))["multiframe"]
    assert case["status"] == "succeeded", case["reason"]

    nifti = sitk.ReadImage(str(out / "multiframe_seg.nii.gz"))
    labels_zyx = sitk.GetArrayFromImage(nifti)
    positions = frame_positions(source)
    for k, position in enumerate(positions):  # voxel plane k of the output is frame k
        np.testing.assert_allclose(nifti.TransformIndexToPhysicalPoint((0, 0, k)), position, atol=1e-4)
    labelled = {(k, n) for k in range(len(labels_zyx)) for n in (1, 2) if np.any(labels_zyx[k] == n)}
    assert len({k for k, _ in labelled}) > 10, "the random model labels too few frames for the test to mean much"

    seg = pydicom.dcmread(out / "multiframe_seg.dcm")
    source_uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    seen = set()
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source_uid
        k = int(reference.ReferencedFrameNumber) - 1
        np.testing.assert_allclose(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float),
                                   positions[k], atol=1e-4)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame.astype(bool), labels_zyx[k] == number)
        seen.add((k, number))
    assert seen == labelled, "a labelled frame is missing from the SEG"
    highdicom.seg.segread(out / "multiframe_seg.dcm")


# -------------------------------------------------------------------------- item 10: attributes a SEG copies
def _labels_on(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from transforms import LoadImageSeriesd

    image = LoadImageSeriesd(keys="image", image_only=True)({"image": str(folder)})["image"]
    labels = (np.asarray(image) > np.percentile(np.asarray(image), 90)).astype(np.uint8)
    return labels, np.asarray(image.affine)


def _without(folder: Path, *keywords: str) -> None:
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        for keyword in keywords:
            delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)


def test_a_series_without_patient_id_gets_a_seg_with_an_empty_one(tmp_path):
    """Patient ID, the patient's name and the study's date are type 2 in a SEG as in its source: present, and
    empty when unknown. A missing slice thickness (type 2 in MR images) becomes the distance between the slices."""
    write_mr_series(tmp_path / "series", hippocampus()[:, :, :12], SPACING, ORIGIN, AXIAL)
    _without(tmp_path / "series", "PatientID", "PatientName", "StudyDate", "AccessionNumber", "SliceThickness")
    labels, affine = _labels_on(tmp_path / "series")
    datasets = read_series(tmp_path / "series")
    seg = build_segmentation(datasets, labels, affine, {1: "anterior"}, ALGORITHM)
    assert seg.PatientID == "" and seg.PatientName == "" and seg.StudyDate == ""
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == SPACING[2]
    assert "PatientID" not in datasets[0] and "SliceThickness" not in datasets[0]  # the caller's headers stay as read


def test_a_series_without_study_instance_uid_is_a_value_error_naming_it(tmp_path):
    write_mr_series(tmp_path / "series", hippocampus()[:, :, :12], SPACING, ORIGIN, AXIAL)
    _without(tmp_path / "series", "StudyInstanceUID")
    labels, affine = _labels_on(tmp_path / "series")
    with pytest.raises(ValueError, match=r"series: its slices lack StudyInstanceUID \(type 1\); a SEG belongs to the "
                                         r"study of its source"):
        build_segmentation(read_series(tmp_path / "series"), labels, affine, NAMES, ALGORITHM)

    from monai.data import MetaTensor

    write = segmentation_writer(MetaTensor(labels[None], meta={"affine": affine}), NAMES, ALGORITHM,
                                source=tmp_path / "series")
    with pytest.raises(ValueError, match="lack StudyInstanceUID"):
        write(tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_a_multiframe_source_without_shared_pixel_spacing_is_a_value_error(slices, tmp_path):
    """highdicom takes a multi-frame source's pixel spacing from its shared functional groups only."""
    write_multiframe(tmp_path / "mf", slices, measures_per_frame=True)
    labels, affine = _labels_on(tmp_path / "mf")
    with pytest.raises(ValueError, match="mf: its frames' pixel spacing is not in the shared functional groups"):
        build_segmentation(read_series(tmp_path / "mf"), labels, affine, NAMES, ALGORITHM)
