# SPDX-License-Identifier: Apache-2.0
"""DICOM SEG of a label volume over a real multi-slice DICOM series (made at test time from a Task04 volume, axial
and oblique): read back with pydicom and highdicom, every frame must lie on the source slice it references and
hold that slice's labels of the NIfTI output; highdicom's reader must open it. The batch runner writes one per
case read from a DICOM series (``--dicom_seg True``), resumes and reports it like the NIfTI output."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from bundletools.dicomseg import (
    AlgorithmInfo,
    build_segmentation,
    labels_on_source_frames,
    read_series,
    segment_names,
    segmentation_writer,
    write_segmentation,
)
from tests.utils import (AXIAL, BUNDLES, CASE, config_list, random_model, run_bundle, shared_data, strip_preamble,
                         write_mr_series)

def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    a, b = np.deg2rad(z_deg), np.deg2rad(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


OBLIQUE = _rotation(20.0, 15.0)


@pytest.fixture(scope="module", params=["axial", "oblique"])
def series(request, tmp_path_factory):
    """(series folder, NIfTI labels on its grid as the batch runner writes them, label volume x/y/z)."""
    data = shared_data("Task04_Hippocampus")
    image = np.asarray(nib.load(data / "imagesTr" / f"{CASE}.nii.gz").dataobj)
    label = np.asarray(nib.load(data / "labelsTr" / f"{CASE}.nii.gz").dataobj).astype(np.uint8)
    folder = tmp_path_factory.mktemp(request.param) / CASE
    direction = AXIAL if request.param == "axial" else OBLIQUE
    write_mr_series(folder, image, (0.9, 0.8, 1.5), (-12.5, 30.25, 4.0), direction)

    # the runner's NIfTI output: labels in the order and with the affine of MONAI's (ITK) reading of the series
    from monai.transforms import LoadImage

    loaded = LoadImage(image_only=True, reader="ITKReader")(str(folder))
    assert tuple(loaded.shape) == label.shape
    nifti = folder.parent / f"{CASE}_seg.nii.gz"
    nib.save(nib.Nifti1Image(label, np.asarray(loaded.affine, dtype=np.float64)), nifti)
    return folder, nifti, label


def _sitk_order(folder: Path) -> list[str]:
    """SOP Instance UIDs of the series in SimpleITK's slice order (the k of its arrays)."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    return [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]


def _build(folder: Path, nifti: Path) -> tuple[object, list]:
    image = nib.load(nifti)
    datasets = read_series(folder)
    names = segment_names(BUNDLES / "unet_segmentation" / "configs" / "metadata.json")
    algorithm = AlgorithmInfo("unet_segmentation", "0.1.0", "ab" * 32)
    return build_segmentation(datasets, np.asarray(image.dataobj), image.affine, names, algorithm), datasets


def assert_seg_matches(path: Path, folder: Path, nifti: Path, algorithm: tuple[str, str, str]) -> None:
    """The SEG at ``path`` references the series in ``folder``, has the bundle's segments, and each of its frames
    lies on the source slice it references and holds that slice's labels of the NIfTI output ``nifti``; every
    slice with labels has its frames."""
    # the NIfTI output as an independent reader sees it, slice k of SimpleITK's reading of the series
    labels_zyx = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    assert labels_zyx.shape == sitk.GetArrayFromImage(reference).shape
    uids = _sitk_order(folder)
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir())}

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    first = next(iter(sources.values()))
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.PatientID == first.PatientID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(uids)

    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert [segments[n].SegmentLabel for n in sorted(segments)] == ["anterior", "posterior"]
    for number, modifier in ((1, "Anterior"), (2, "Posterior")):
        kind = segments[number].SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("5366008", "SCT", "Hippocampus")
        assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == modifier
        assert segments[number].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert segments[number].SegmentAlgorithmType == "AUTOMATIC"
        identification = segments[number].SegmentationAlgorithmIdentificationSequence[0]
        assert (identification.AlgorithmName, identification.AlgorithmVersion) == algorithm[:2]
        assert algorithm[2] in identification.AlgorithmParameters

    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    seen = set()
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = uids.index(uid)
        np.testing.assert_allclose(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float),
                                   np.asarray(sources[uid].ImagePositionPatient, dtype=float), atol=1e-4)
        np.testing.assert_array_equal(frame.astype(bool), labels_zyx[k] == number)
        seen.add((k, number))
    expected = {(k, n) for k in range(labels_zyx.shape[0]) for n in (1, 2) if np.any(labels_zyx[k] == n)}
    assert seen == expected, "a slice with labels has no frame"
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float),
                               np.asarray(first.ImageOrientationPatient, dtype=float), atol=1e-5)
    np.testing.assert_allclose(np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float),
                               np.asarray(first.PixelSpacing, dtype=float), atol=1e-5)


@pytest.mark.realdata
def test_seg_frames_lie_on_their_source_slices_and_hold_the_nifti_labels(series, tmp_path):
    folder, nifti, label = series
    seg, _ = _build(folder, nifti)
    write_segmentation(seg, tmp_path / "seg.dcm")
    assert_seg_matches(tmp_path / "seg.dcm", folder, nifti, ("unet_segmentation", "0.1.0", "ab" * 32))
    labels_zyx = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    assert sum(labels_zyx[k].any() for k in range(len(labels_zyx))) > 5  # the check covered many slices


@pytest.mark.realdata
def test_highdicom_reader_opens_it_and_gives_the_labels_per_source_instance(series, tmp_path):
    folder, nifti, label = series
    seg, _ = _build(folder, nifti)
    write_segmentation(seg, tmp_path / "seg.dcm")
    read = highdicom.seg.segread(tmp_path / "seg.dcm")
    assert read.get_segment_numbers() == [1, 2]
    assert [read.get_segment_description(n).segment_label for n in (1, 2)] == ["anterior", "posterior"]
    uids = _sitk_order(folder)
    labels_zyx = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    with_labels = [k for k in range(len(uids)) if labels_zyx[k].any()]
    pixels = read.get_pixels_by_source_instance(source_sop_instance_uids=[uids[k] for k in with_labels],
                                                combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, labels_zyx[with_labels])


@pytest.mark.realdata
def test_labels_off_the_source_grid_are_an_error_naming_the_slice(series):
    folder, nifti, label = series
    image = nib.load(nifti)
    datasets = read_series(folder)
    shifted = image.affine.copy()
    shifted[:3, 3] += image.affine[:3, 2] * 0.5  # half a slice off
    with pytest.raises(ValueError, match=r"source slice .* is not a plane of the labels' voxel grid"):
        labels_on_source_frames(np.asarray(image.dataobj), shifted, datasets)
    with pytest.raises(ValueError, match=r"is not a plane of the labels' voxel grid"):
        labels_on_source_frames(np.asarray(image.dataobj)[:, :, :-2], image.affine, datasets)  # slices missing


def test_segment_names_come_from_the_bundle_metadata(tmp_path):
    assert segment_names(BUNDLES / "unet_segmentation" / "configs" / "metadata.json") == {1: "anterior",
                                                                                       2: "posterior"}
    (tmp_path / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {}}}))
    with pytest.raises(ValueError, match="channel_def"):
        segment_names(tmp_path / "metadata.json")


@pytest.mark.realdata
def test_label_value_the_bundle_does_not_name_is_an_error(series):
    folder, nifti, _ = series
    image = nib.load(nifti)
    labels = np.asarray(image.dataobj).copy()
    labels[labels == 2] = 7
    with pytest.raises(ValueError, match=r"values \[7\]"):
        build_segmentation(read_series(folder), labels, image.affine, {1: "anterior", 2: "posterior"},
                           AlgorithmInfo("unet_segmentation", "0.1.0", "0" * 64))


@pytest.mark.realdata
def test_writer_takes_the_runner_s_labels_with_their_metadata(series, tmp_path):
    """The runner hands the writer a channel-first MetaTensor whose metadata (affine, filename_or_obj) come from
    MONAI's reading of the series; the SEG must equal the one built from the NIfTI output."""
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    folder, nifti, label = series
    loaded = LoadImage(image_only=True, reader="ITKReader", ensure_channel_first=True)(str(folder))
    labels = MetaTensor(np.asarray(nib.load(nifti).dataobj)[None].astype(np.float32), meta=dict(loaded.meta))
    algorithm = AlgorithmInfo("unet_segmentation", "0.1.0", "cd" * 32)
    segmentation_writer(labels, {1: "anterior", 2: "posterior"}, algorithm)(tmp_path / "seg.dcm")
    read = highdicom.seg.segread(tmp_path / "seg.dcm")
    uids = _sitk_order(folder)
    labels_zyx = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    with_labels = [k for k in range(len(uids)) if labels_zyx[k].any()]
    pixels = read.get_pixels_by_source_instance(source_sop_instance_uids=[uids[k] for k in with_labels],
                                                combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, labels_zyx[with_labels])

    with pytest.raises(ValueError, match="needs a DICOM series folder"):
        segmentation_writer(MetaTensor(labels.as_tensor(), meta={**loaded.meta, "filename_or_obj": str(nifti)}),
                            {1: "anterior", 2: "posterior"}, algorithm)


@pytest.mark.realdata
def test_nothing_segmented_still_gives_a_readable_seg_with_every_segment(series, tmp_path):
    folder, nifti, _ = series
    image = nib.load(nifti)
    seg = build_segmentation(read_series(folder), np.zeros(image.shape, np.uint8), image.affine,
                             {1: "anterior", 2: "posterior"}, AlgorithmInfo("unet_segmentation", "0.1.0", "0" * 64))
    write_segmentation(seg, tmp_path / "empty.dcm")
    read = highdicom.seg.segread(tmp_path / "empty.dcm")
    assert read.get_segment_numbers() == [1, 2]
    assert not np.any(pydicom.dcmread(tmp_path / "empty.dcm").pixel_array)


# ------------------------------------------------------------------------------------------------ the runner
def _scans_with_series(folder: Path) -> dict[str, Path]:
    """An input folder: the case as an axial and as an oblique MR series, and as a NIfTI file."""
    data = shared_data("Task04_Hippocampus")
    image = np.asarray(nib.load(data / "imagesTr" / f"{CASE}.nii.gz").dataobj)
    write_mr_series(folder / "axial_series", image, (0.9, 0.8, 1.5), (-12.5, 30.25, 4.0), AXIAL)
    write_mr_series(folder / "oblique_series", image, (0.9, 0.8, 1.5), (-12.5, 30.25, 4.0), OBLIQUE)
    shutil.copy(data / "imagesTr" / f"{CASE}.nii.gz", folder / "plain.nii.gz")
    return {"axial_series": folder / "axial_series", "oblique_series": folder / "oblique_series"}


@pytest.mark.realdata
def test_runner_writes_a_seg_per_dicom_case_resumes_and_reports_it(tmp_path):

    series = _scans_with_series(tmp_path / "in")
    root = random_model("unet_segmentation", tmp_path / "bundle")
    model_sha256 = hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest()
    out = tmp_path / "out"
    args = ["run", "--config_file", config_list("unet_segmentation", "inference"), "--dataset_dir", tmp_path / "in",
            "--output_dir", out, "--bundle_root", root, "--num_workers", "0"]

    run_bundle(args[:-2] + ["--output_dir", tmp_path / "off", "--num_workers", "0"], cwd=tmp_path)  # off by default
    assert not list((tmp_path / "off").glob("*.dcm"))

    run_bundle(args + ["--dicom_seg", "True"], cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.suffix != ".json"
                  and not p.name.endswith(".csv")) == [
        "axial_series_seg.dcm", "axial_series_seg.nii.gz", "oblique_series_seg.dcm", "oblique_series_seg.nii.gz",
        "plain_seg.nii.gz"]
    version = json.loads((BUNDLES / "unet_segmentation" / "configs" / "metadata.json").read_text())["version"]
    for case, folder in series.items():
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_seg.nii.gz")))
        assert len(np.unique(labels)) == 3 and any(len(np.unique(s)) > 1 for s in labels), "labels too uniform"
        assert_seg_matches(out / f"{case}_seg.dcm", folder, out / f"{case}_seg.nii.gz",
                           ("unet_segmentation", version, model_sha256))
        highdicom.seg.segread(out / f"{case}_seg.dcm")

    report = json.loads((out / "report.json").read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert cases["axial_series"]["outputs"]["dicom_seg"] == str(out / "axial_series_seg.dcm")
    assert "dicom_seg" not in cases["plain"]["outputs"]
    with open(out / "report.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert rows["oblique_series"]["dicom_seg"] == str(out / "oblique_series_seg.dcm")
    assert rows["plain"]["dicom_seg"] == ""

    # resume: everything is complete; a missing SEG makes its case incomplete, and only that case is redone
    uid = pydicom.dcmread(out / "oblique_series_seg.dcm", stop_before_pixels=True).SOPInstanceUID
    (out / "axial_series_seg.dcm").unlink()
    run_bundle(args + ["--dicom_seg", "True"], cwd=tmp_path)
    status = {c["case"]: c["status"] for c in json.loads((out / "report.json").read_text())["cases"]}
    assert status == {"axial_series": "succeeded", "oblique_series": "skipped", "plain": "skipped"}
    assert pydicom.dcmread(out / "oblique_series_seg.dcm", stop_before_pixels=True).SOPInstanceUID == uid
    assert_seg_matches(out / "axial_series_seg.dcm", series["axial_series"], out / "axial_series_seg.nii.gz",
                       ("unet_segmentation", version, model_sha256))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.realdata
def test_a_series_without_the_preamble_gets_the_same_seg(series, tmp_path):
    """The runner reads slices without the 128-byte preamble and "DICM" (GDCM does); so must the SEG builder."""

    folder, nifti, _ = series
    stripped = tmp_path / folder.name
    shutil.copytree(folder, stripped)
    strip_preamble(stripped)
    seg, _ = _build(stripped, nifti)
    write_segmentation(seg, tmp_path / "seg.dcm")
    assert_seg_matches(tmp_path / "seg.dcm", folder, nifti, ("unet_segmentation", "0.1.0", "ab" * 32))
