# SPDX-License-Identifier: Apache-2.0
"""DICOM study folders: a folder holding several series, as a DICOM listener writes a study (a T1, a T2, a
localizer, a CT of the same visit, all mixed), made at test time from a real Task04 case.

Every series is found from its files' headers and becomes its own case, named after its patient, study and
series, unless the series rules (the bundle's modality, ImageType ORIGINAL and PRIMARY, no localizer, at least
``min_slices`` images; ``series_rules`` overrides them) pass over it: then it is an ``ignored`` entry of the
report with the rule. A series that passes the rules but is corrupt fails alone. A folder of one series is one
case named after the folder, as before.
"""

from __future__ import annotations

import json
import pickle
import re

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from bundletools.data import inference_datalist
from bundletools.images import DatasetError, SeriesPath, check_dicom_series, input_files
from bundletools.series import DicomSeries, SeriesRules, case_names
from bundletools.settings import ConfigError
from tests.utils import (ALL_BUNDLES, AXIAL, BUNDLES, CASE, UNET, batch, random_model, shared_data,
                         write_mr_series)

SPACING, ORIGIN = (1.0, 1.0, 1.5), (-12.5, 30.25, 4.0)
METADATA = {"network_data_format": {"inputs": {"image": {"modality": "MR"}}}}
BUNDLE_RULES = SeriesRules.from_metadata(METADATA)
# the two series of the study that the bundles' rules take
T1, T2 = "study_HIPPO-001_1_2-T1-MPRAGE", "study_HIPPO-001_1_3-T2-SPACE"
IGNORED = {  # series description -> (rule, what the reason says)
    "localizer": ("localizers", r"a localizer \(ImageType ORIGINAL\\PRIMARY\\LOCALIZER\)"),
    "CT head": ("Modality", r"Modality CT, not MR"),
    "scout": ("min_slices", r"2 images, fewer than min_slices 5 \(a localizer\?\)"),
    "MPR": ("ImageType", r"ImageType DERIVED\\SECONDARY, without ORIGINAL and PRIMARY"),
}


def hippocampus() -> np.ndarray:
    return np.asarray(nib.load(shared_data("Task04_Hippocampus") / "imagesTr" / f"{CASE}.nii.gz").dataobj)


def write_study(folder, image: np.ndarray) -> str:
    """The series of one study, their files mixed in ``folder``; returns the StudyInstanceUID."""
    study = pydicom.uid.generate_uid()

    def series(number, description, volume, **kwargs):
        write_mr_series(folder, volume, SPACING, ORIGIN, AXIAL, study_uid=study, patient_id="HIPPO/001",
                        series_number=number, description=description, prefix=f"S{number}_", **kwargs)

    series(1, "localizer", image[:, :, 15:18], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    series(2, "T1 MPRAGE", image)
    series(3, "T2 SPACE", image[:, :, 5:29])
    series(4, "CT head", image, modality="CT")
    series(5, "scout", image[:, :, 10:12])
    series(6, "MPR", image[::-1], image_type=("DERIVED", "SECONDARY"))
    return study


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    """``scans/study``: the study; ``scans/t1_only``: a folder of one series; ``scans/ct_only``: a CT series."""
    scans = tmp_path_factory.mktemp("studies") / "scans"
    image = hippocampus()
    write_study(scans / "study", image)
    write_mr_series(scans / "t1_only", image, SPACING, ORIGIN, AXIAL, description="T1")
    write_mr_series(scans / "ct_only", image, SPACING, ORIGIN, AXIAL, modality="CT")
    return scans


def _series_of(folder, description: str) -> str:
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("SeriesDescription") == description:
            return ds.SeriesInstanceUID
    raise AssertionError(description)


# ------------------------------------------------------------------------------------------- found, named
@pytest.mark.realdata
def test_every_series_of_a_study_folder_is_a_case_or_ignored_with_its_rule(study_folder):
    datalist = inference_datalist(study_folder, series_rules=BUNDLE_RULES)
    cases = {d["case"]: d["image"] for d in datalist}
    assert sorted(cases) == [T1, T2, "t1_only"]
    for name, description, slices in ((T1, "T1 MPRAGE", 35), (T2, "T2 SPACE", 24)):
        image = cases[name]
        assert isinstance(image, SeriesPath) and str(image) == str(study_folder / "study")
        assert image.series_uid == _series_of(study_folder / "study", description)
        assert len(image.files) == slices and input_files(image) == sorted(image.files)
        assert check_dicom_series(image).shape == (35, 51, slices)  # ITK's reading of that series alone
    assert type(cases["t1_only"]) is str and cases["t1_only"] == str(study_folder / "t1_only")  # as before

    ignored = {e["reason"].split(": ")[0]: e for e in datalist.ignored}
    for description, (rule, why) in IGNORED.items():
        (entry,) = [e for key, e in ignored.items() if f'"{description}"' in key]
        assert entry["input"] == str(study_folder / "study") and entry["rule"] == rule
        assert re.search(why + rf" \(series_rules: {rule}\)$", entry["reason"]), entry
    (ct_only,) = [e for e in datalist.ignored if e["input"] == str(study_folder / "ct_only")]
    assert ct_only["rule"] == "Modality" and "Modality CT, not MR" in ct_only["reason"]
    assert datalist.series_rules == {"Modality": ["MR"], "ImageType": ["ORIGINAL", "PRIMARY"],
                                     "localizers": False, "min_slices": 5}


@pytest.mark.realdata
def test_the_rules_can_be_overridden(study_folder):
    def selected(overrides) -> list[str]:
        rules = SeriesRules.from_metadata(METADATA, overrides)
        return sorted(d["case"] for d in inference_datalist(study_folder, series_rules=rules))

    assert selected({"Modality": ["MR", "CT"], "min_slices": 30}) == sorted([
        T1, "study_HIPPO-001_1_4-CT-head", "ct_only", "t1_only"])  # the CT series; T2 has 24 slices
    assert selected({"localizers": True, "min_slices": 1, "ImageType": []}) == sorted([
        "study_HIPPO-001_1_1-localizer", T1, T2, "study_HIPPO-001_1_5-scout", "study_HIPPO-001_1_6-MPR", "t1_only"])
    assert selected({"Modality": []}) == sorted([T1, T2, "study_HIPPO-001_1_4-CT-head", "ct_only", "t1_only"])
    # without rules (the Python API's default), every series is a case
    assert len(inference_datalist(study_folder)) == 6 + 2


@pytest.mark.parametrize("overrides, message", [
    ({"Modalty": ["MR"]}, r"series_rules: unknown rule 'Modalty'; the rules are Modality, ImageType, localizers, "
                          r"min_slices"),
    ({"min_slices": "5"}, r"min_slices takes a whole number"),
    ({"Modality": [1]}, r"Modality takes a list of strings"),
    ({"localizers": "maybe"}, r"localizers takes true or false"),
    (["MR"], r"series_rules must be a mapping"),
    ("{'Modality': 'MR'", r"series_rules: not JSON"),
])
def test_a_bad_rule_is_a_config_error_naming_it(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SeriesRules.from_metadata(METADATA, overrides)


def test_rules_given_as_json_text_are_read():
    rules = SeriesRules.from_metadata(METADATA, '{"Modality": ["mr", "CT"], "localizers": true}')
    assert (rules.modalities, rules.localizers, rules.min_slices) == (("MR", "CT"), True, 5)


def test_case_names_are_safe_for_any_file_system_and_unique():
    def series(uid, number="7", description="T2 / AX:*?", patient="../../etc", study="") -> DicomSeries:
        return DicomSeries(uid, patient_id=patient, study=study, number=number, description=description)

    assert case_names([series("1.2.3.44")], ("dump",)) == ["dump_etc_study_7-T2-AX"]
    names = case_names([series("1.2.3.44", study="20240101"), series("1.2.3.55", study="20240101"),
                        series("1.2.3.66", number="", description="", patient="")])
    assert names == ["etc_20240101_7-T2-AX-1.2.3.44", "etc_20240101_7-T2-AX-1.2.3.55", "patient_study_1.2.3.66"]
    assert case_names([series("1.2", description="x" * 300)])[0] == "etc_study_7-" + "x" * 48  # 48 characters a part


def test_a_series_path_keeps_its_series_through_pickling(tmp_path):
    """DataLoader workers started by spawn get the cases pickled; ``str``'s own pickling would drop the series."""
    path = SeriesPath(tmp_path, "1.2.3", [tmp_path / "b", tmp_path / "a"])
    again = pickle.loads(pickle.dumps(path))
    assert isinstance(again, SeriesPath) and again == str(tmp_path)
    assert (again.series_uid, again.files) == ("1.2.3", (str(tmp_path / "a"), str(tmp_path / "b")))


# --------------------------------------------------------------------------------------------- segmented
@pytest.mark.realdata
def test_a_study_folder_is_segmented_series_by_series_and_a_corrupt_series_fails_alone(tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    image = hippocampus()
    study = write_study(scans / "study", image)
    write_mr_series(scans / "study", image[:, :, :20], SPACING, ORIGIN, AXIAL, study_uid=study, series_number=7,
                    description="T1 repeat", patient_id="HIPPO/001", prefix="S7_")
    broken = sorted((scans / "study").glob("S7_*"))[3]
    broken.write_bytes(broken.read_bytes()[:-1000])  # a transfer cut short inside the pixel data
    root = random_model(UNET, tmp_path / "bundle")

    report = batch(scans, out, root, dicom_seg=True)
    cases = {c["case"]: c for c in report["cases"]}
    assert sorted(cases) == [T1, T2, "study_HIPPO-001_1_7-T1-repeat"]
    assert cases["study_HIPPO-001_1_7-T1-repeat"]["status"] == "failed", cases
    assert {cases[T1]["status"], cases[T2]["status"]} == {"succeeded"}, cases
    assert not list(out.glob("study_HIPPO-001_1_7-T1-repeat*"))
    for name, description in ((T1, "T1 MPRAGE"), (T2, "T2 SPACE")):
        uid = _series_of(scans / "study", description)
        assert cases[name]["series"] == uid and cases[name]["input"] == str(scans / "study")
        # the labels on the grid of that series, as SimpleITK reads its files
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(scans / "study"), uid))
        reference, seg = reader.Execute(), sitk.ReadImage(str(out / f"{name}_seg.nii.gz"))
        assert seg.GetSize() == reference.GetSize()
        np.testing.assert_allclose(seg.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg.GetSpacing(), reference.GetSpacing(), atol=1e-5)
        dicom_seg = pydicom.dcmread(out / f"{name}_seg.dcm", stop_before_pixels=True)
        assert dicom_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        assert len(dicom_seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == reference.GetSize()[2]
    assert {e["rule"] for e in report["ignored"]} == {"localizers", "Modality", "min_slices", "ImageType"}
    assert report["run"]["settings"]["series_rules"]["Modality"] == ["MR"]

    again = batch(scans, out, root, dicom_seg=True)  # resumed: each series' files make its checksum
    assert {c["case"]: c["status"] for c in again["cases"]} == {
        T1: "skipped", T2: "skipped", "study_HIPPO-001_1_7-T1-repeat": "failed"}


@pytest.mark.realdata
def test_series_rules_of_the_config_are_honoured(tmp_path):
    """The config key ``series_rules``, which ``--series_rules '{"Modality": ["MR", "CT"]}'`` sets."""
    scans = tmp_path / "scans"
    write_mr_series(scans / "ct", hippocampus()[:, :, :12], SPACING, ORIGIN, AXIAL, modality="CT")
    root = random_model(UNET, tmp_path / "bundle")
    with pytest.raises(DatasetError, match=r"no image files .* \(1 other entries ignored, e.g. ct: series 1 "
                                           r"\(.*\): Modality CT, not MR \(series_rules: Modality\)\)"):
        inference_datalist(scans, series_rules=SeriesRules.from_metadata(_metadata(UNET)))
    report = batch(scans, tmp_path / "out", root, series_rules={"Modality": ["MR", "CT"]})
    assert [(c["case"], c["status"]) for c in report["cases"]] == [("ct", "succeeded")]
    assert report["run"]["settings"]["series_rules"]["Modality"] == ["MR", "CT"]


def _metadata(bundle: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_every_bundle_takes_the_modality_of_its_metadata(bundle):
    assert SeriesRules.from_metadata(_metadata(bundle)).modalities == ("MR",)
