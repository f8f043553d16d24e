# SPDX-License-Identifier: Apache-2.0
"""Datalists and the checks that stop bad training data before training starts."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundletools.data import (
    DatasetError,
    case_name,
    check_training_data,
    inference_datalist,
    msd_training_datalist,
    scoring_split,
    split_datalist,
    training_split,
)
from tests.utils import shared_data


@pytest.fixture
def msd(tmp_path, synthetic_msd) -> Path:
    """A private, writable copy of the synthetic MSD folder that a test may damage."""
    return Path(shutil.copytree(synthetic_msd, tmp_path / "msd"))


@pytest.mark.parametrize(
    "path, name",
    [("a/hippocampus_001.nii.gz", "hippocampus_001"), ("b.nii", "b"), ("brain1_image.nrrd", "brain1_image"),
     ("x.y.mha", "x.y"), ("ct.MHD", "ct")],
)
def test_case_name_strips_image_extensions(path, name):
    assert case_name(path) == name


def test_training_split_is_reproducible_and_disjoint(msd):
    first = training_split(msd, num_classes=3, val_fraction=0.34, seed=3)
    again = training_split(msd, num_classes=3, val_fraction=0.34, seed=3)
    other = training_split(msd, num_classes=3, val_fraction=0.34, seed=4)
    assert first == again
    assert len(first["validation"]) == 2 and len(first["training"]) == 4
    images = [d["image"] for d in first["training"] + first["validation"]]
    assert len(set(images)) == 6
    assert first["validation"] != other["validation"]
    assert all(Path(d["image"]).is_absolute() and Path(d["label"]).is_file() for d in first["training"])


def test_scoring_split_scores_every_labelled_case(msd):
    split = scoring_split(msd, num_classes=3)
    assert split["training"] == []
    assert [d["image"] for d in split["validation"]] == sorted(d["image"] for d in msd_training_datalist(msd))
    with pytest.raises(DatasetError, match="declares 3 labels.*--num_classes 3"):
        scoring_split(msd, num_classes=2)
    (msd / "labelsTr" / "synthetic_002.nii.gz").write_text("not a label")
    with pytest.raises(DatasetError, match=r"case synthetic_002: cannot read label"):
        scoring_split(msd, num_classes=3)


def test_max_cases_limits_the_split(msd):
    split = training_split(msd, num_classes=3, val_fraction=0.5, max_cases=4)
    assert len(split["training"]) + len(split["validation"]) == 4


def test_split_needs_two_cases():
    with pytest.raises(ValueError, match="cannot split"):
        split_datalist([{"image": "a"}], val_fraction=0.2)


def test_missing_dataset_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DatasetError, match="no_such_dataset.*does not exist"):
        training_split(missing, num_classes=3)
    with pytest.raises(DatasetError, match="no_such_dataset"):
        inference_datalist(missing)


def test_listed_file_missing(msd):
    (msd / "labelsTr" / "synthetic_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case synthetic_002: label file .*synthetic_002.nii.gz.* does not exist"):
        msd_training_datalist(msd)


def test_shape_mismatch(msd):
    label = nib.load(msd / "labelsTr" / "synthetic_001.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:, :, :-2], label.affine), msd / "labelsTr" / "synthetic_001.nii.gz")
    with pytest.raises(DatasetError, match=r"case synthetic_001: label shape \(32, 40, 30\) differs from image shape"):
        training_split(msd, num_classes=3)


def test_label_value_outside_declared_labels(msd):
    path = msd / "labelsTr" / "synthetic_004.nii.gz"
    label = nib.load(path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, label.affine), path)
    with pytest.raises(DatasetError, match=r"case synthetic_004: label .* value\(s\) \[7\] outside the declared labels"):
        training_split(msd, num_classes=3)


def test_truncated_nifti_is_reported_with_the_case(msd):
    path = msd / "imagesTr" / "synthetic_003.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DatasetError, match=r"case synthetic_003: cannot read image .*synthetic_003.nii.gz"):
        training_split(msd, num_classes=3)


def test_not_an_image_is_reported(msd):
    (msd / "imagesTr" / "synthetic_000.nii.gz").write_text("not an image")
    with pytest.raises(DatasetError, match=r"case synthetic_000: cannot read image"):
        training_split(msd, num_classes=3)


def test_every_bad_case_is_listed_at_once(msd):
    (msd / "imagesTr" / "synthetic_000.nii.gz").write_text("not an image")
    (msd / "labelsTr" / "synthetic_005.nii.gz").write_text("not a label")
    with pytest.raises(DatasetError, match=r"2 problem\(s\)(.|\n)*synthetic_000(.|\n)*synthetic_005"):
        training_split(msd, num_classes=3)


def test_num_classes_and_channels_must_match_dataset_json(msd):
    with pytest.raises(DatasetError, match="declares 3 labels.*--num_classes 3"):
        training_split(msd, num_classes=5)
    with pytest.raises(DatasetError, match="declares 1 modalities.*--in_channels 1"):
        training_split(msd, num_classes=3, in_channels=2)


def test_wrong_channel_count_in_image(msd):
    spec = json.loads((msd / "dataset.json").read_text())
    spec["modality"] = {"0": "a", "1": "b"}
    (msd / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match="has 1 channel\\(s\\), the bundle expects 2"):
        training_split(msd, num_classes=3, in_channels=2)


def test_check_accepts_4d_multichannel_images(tmp_path):
    image = np.random.rand(8, 9, 10, 2).astype(np.float32)
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:4] = 4
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "lab.nii.gz")
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    check_training_data([item], labels=range(5), in_channels=2)
    with pytest.raises(DatasetError, match="outside the declared labels"):
        check_training_data([item], labels=range(3), in_channels=2)


def test_inference_datalist_of_flat_folder_and_msd_folder(tmp_path, msd):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.nii.gz", "a.nrrd", "c.mha", "notes.txt", ".hidden.nii.gz"):
        (flat / name).write_bytes(b"x")
    assert [case_name(d["image"]) for d in inference_datalist(flat)] == ["a", "b", "c"]
    (msd / "imagesTs").mkdir()
    shutil.copy(msd / "imagesTr" / "synthetic_000.nii.gz", msd / "imagesTs" / "test_000.nii.gz")
    names = [case_name(d["image"]) for d in inference_datalist(msd)]
    assert names == ["synthetic_000", "synthetic_001", "synthetic_002", "synthetic_003", "synthetic_004",
                     "synthetic_005", "test_000"]


def test_inference_datalist_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        inference_datalist(empty)
    (empty / "x.nii.gz").write_bytes(b"x")
    (empty / "x.nrrd").write_bytes(b"x")
    with pytest.raises(DatasetError, match="same case name 'x'"):
        inference_datalist(empty)


@pytest.mark.realdata
def test_real_hippocampus_and_brats_pass_the_checks():
    hippo = training_split(shared_data("Task04_Hippocampus"), num_classes=3, max_cases=40)
    assert len(hippo["training"]) == 32 and len(hippo["validation"]) == 8
    brats = training_split(shared_data("BraTS2015_deepmedic_subset"), num_classes=5, in_channels=2)
    assert len(brats["training"]) + len(brats["validation"]) == 6
    with pytest.raises(DatasetError, match="declares 5 labels"):
        training_split(shared_data("BraTS2015_deepmedic_subset"), num_classes=3, in_channels=2)


# ------------------------------------------------------------------ issue 14: label grid, declared labels, size
def _rewrite_label(msd: Path, case: str, affine=None, data=None) -> Path:
    path = msd / "labelsTr" / f"{case}.nii.gz"
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj) if data is None else data,
                             label.affine if affine is None else affine), path)
    return path


@pytest.mark.parametrize("change, problem", [
    (np.diag([1.0, 1.0, 2.0, 1.0]), r"label spacing \(1, 1, 2\) differs from image spacing \(1, 1, 1\) mm"),
    (np.diag([-1.0, 1.0, 1.0, 1.0]), r"label direction .* differs from image direction .* \(flipped or rotated axes\)"),
    (np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 5.0], [0, 0, 0, 1]]),
     r"label origin \(0, 0, 5\) differs from image origin \(0, 0, 0\) mm"),
])
def test_image_and_label_geometry_are_compared_naming_the_case(msd, change, problem):
    """Issue 14 item 8: a label with the image's shape but another spacing, a flipped axis or another origin is
    reported before training, naming the case (it used to crash in epoch 1, or train on mirrored masks)."""
    _rewrite_label(msd, "synthetic_002", affine=change)
    with pytest.raises(DatasetError, match=r"case synthetic_002: " + problem):
        training_split(msd, num_classes=3)


def test_a_label_within_the_geometry_tolerance_passes(msd):
    image = nib.load(msd / "imagesTr" / "synthetic_002.nii.gz")
    _rewrite_label(msd, "synthetic_002", affine=image.affine + np.diag([1e-5, -1e-5, 0.0, 0.0]))
    training_split(msd, num_classes=3)


def _declare(msd: Path, labels) -> None:
    spec = json.loads((msd / "dataset.json").read_text())
    if labels is None:
        del spec["labels"]
    else:
        spec["labels"] = labels
    (msd / "dataset.json").write_text(json.dumps(spec))


def test_label_values_are_checked_against_dataset_json(msd):
    """Issue 14 item 9: the labels declared in dataset.json are what the label values are checked against;
    declared {0, 1, 4} are not labels a bundle can train on (it used to flag 4 and let an undeclared 2 through),
    a missing or malformed ``labels`` is reported."""
    _declare(msd, {"0": "background", "1": "anterior", "4": "posterior"})  # the label files hold 0, 1 and 2
    with pytest.raises(DatasetError, match=r"declares the label values \[0, 1, 4\] \(background, anterior, "
                                           r"posterior\); the bundles train on consecutive values 0\.\.2"):
        training_split(msd, num_classes=3)
    _declare(msd, None)
    with pytest.raises(DatasetError, match=r"dataset.json: has no 'labels'"):
        training_split(msd, num_classes=3)
    _declare(msd, ["background", "anterior"])
    with pytest.raises(DatasetError, match=r"declares 2 labels \['background', 'anterior'\] but the bundle is "
                                           r"configured for num_classes=3"):
        training_split(msd, num_classes=3)
    _declare(msd, "background, anterior, posterior")
    with pytest.raises(DatasetError, match=r"'labels' must map each label value to its name"):
        training_split(msd, num_classes=3)
    _declare(msd, {"background": 0, "anterior": 1, "posterior": 2})  # nnU-Net's form is fine
    assert len(training_split(msd, num_classes=3)["training"]) == 5


def test_check_training_data_flags_undeclared_values_and_accepts_declared_ones(tmp_path):
    """Issue 14 item 9 (the check itself): with labels {0, 1, 4} declared, 4 passes and 2 is reported."""
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    label = np.zeros((6, 6, 6), np.uint8)
    label[1, 1, 1] = 4
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "lab.nii.gz")
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    check_training_data([item], labels=[0, 1, 4])
    label[2, 2, 2] = 2
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "lab.nii.gz")
    with pytest.raises(DatasetError, match=r"value\(s\) \[2\] outside the declared labels \[0, 1, 4\]"):
        check_training_data([item], labels=[0, 1, 4])


def test_training_check_reads_the_size_from_the_header_first(msd):
    """Issue 14 item 11 (size, training side): an image whose header claims 1000³ voxels is reported without
    being read; the limit is ``max_voxels``."""
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.uint8)
    header.set_data_offset(352)
    (msd / "imagesTr" / "synthetic_001.nii.gz").write_bytes(
        gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1000))
    with pytest.raises(DatasetError, match=r"case synthetic_001: image .*synthetic_001\.nii\.gz: its header "
                                           r"declares 1000x1000x1000 = 1e\+09 voxels, more than max_voxels"):
        training_split(msd, num_classes=3)
    with pytest.raises(DatasetError, match=r"case synthetic_000: image .* more than max_voxels=1e\+03"):
        training_split(msd, num_classes=3, max_voxels=1000)


def _add_training_entries(msd: Path, *entries: tuple[str, str]) -> None:
    spec = json.loads((msd / "dataset.json").read_text())
    spec["training"] += [{"image": image, "label": label} for image, label in entries]
    (msd / "dataset.json").write_text(json.dumps(spec))


def test_a_case_listed_twice_under_any_spelling_is_an_error_naming_each_pair(msd):
    """Issue 24 item 6: the same image listed again, under another spelling, by absolute path or through a
    link, would let a case be trained and validated on; each repeated entry is named with its first entry."""
    (msd / "imagesTr" / "link_to_003.nii.gz").symlink_to("synthetic_003.nii.gz")
    _add_training_entries(
        msd,
        ("./imagesTr/synthetic_000.nii.gz", "./labelsTr/synthetic_000.nii.gz"),  # entry 6: the same spelling
        ("imagesTr/synthetic_001.nii.gz", "labelsTr/synthetic_001.nii.gz"),  # 7
        ("imagesTr//synthetic_002.nii.gz", "labelsTr/synthetic_002.nii.gz"),  # 8
        ("imagesTr/link_to_003.nii.gz", "labelsTr/synthetic_003.nii.gz"),  # 9
        (str(msd / "imagesTr" / "synthetic_004.nii.gz"), "labelsTr/synthetic_004.nii.gz"),  # 10
    )
    pairs = [(0, "./imagesTr/synthetic_000.nii.gz", 6, "./imagesTr/synthetic_000.nii.gz"),
             (1, "./imagesTr/synthetic_001.nii.gz", 7, "imagesTr/synthetic_001.nii.gz"),
             (2, "./imagesTr/synthetic_002.nii.gz", 8, "imagesTr//synthetic_002.nii.gz"),
             (3, "./imagesTr/synthetic_003.nii.gz", 9, "imagesTr/link_to_003.nii.gz"),
             (4, "./imagesTr/synthetic_004.nii.gz", 10, str(msd / "imagesTr" / "synthetic_004.nii.gz"))]
    for split in (training_split, scoring_split):
        with pytest.raises(DatasetError) as raised:
            split(msd, num_classes=3)
        message = str(raised.value)
        assert message.startswith(f"{msd / 'dataset.json'} lists a case more than once")
        for first, first_path, again, again_path in pairs:
            assert f"entry {first} ({first_path!r}) and entry {again} ({again_path!r}) are the same image file" \
                in message
        assert message.count(" are the same image file") == len(pairs)


def test_the_split_never_puts_a_case_in_both_sets(msd):
    """Issue 24 item 6: a datalist that names a case twice (here: through a path with ``..`` in it) is refused
    by the split itself, whatever made the list."""
    cases = msd_training_datalist(msd)
    again = dict(cases[0], image=str(Path(cases[0]["image"]).parent / ".." / "imagesTr" /
                                     Path(cases[0]["image"]).name))
    with pytest.raises(DatasetError, match=r"lists a case more than once:\n  - case synthetic_000: "):
        split_datalist([*cases, again], val_fraction=0.5)
    train, val = split_datalist(cases, val_fraction=0.5)
    assert not {d["image"] for d in train} & {d["image"] for d in val}


def test_entries_outside_the_dataset_folder_need_allow_outside_dataset_dir(msd, tmp_path):
    """Issue 24 item 6: ``../`` entries, absolute paths elsewhere and links out of the folder are an error
    naming each, unless ``allow_outside_dataset_dir`` (given as Fire passes it from a command line, too)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("synthetic_000", "synthetic_001", "synthetic_002"):
        for kind in ("images", "labels"):
            shutil.copy(msd / f"{kind}Tr" / f"{name}.nii.gz", elsewhere / f"{kind}_{name}.nii.gz")
    (msd / "imagesTr" / "link_out.nii.gz").symlink_to(elsewhere / "images_synthetic_002.nii.gz")
    _add_training_entries(
        msd,
        ("../elsewhere/images_synthetic_000.nii.gz", "../elsewhere/labels_synthetic_000.nii.gz"),
        (str(elsewhere / "images_synthetic_001.nii.gz"), str(elsewhere / "labels_synthetic_001.nii.gz")),
        ("imagesTr/link_out.nii.gz", str(elsewhere / "labels_synthetic_002.nii.gz")),
    )
    for split in (training_split, scoring_split):
        for refused in (False, "false"):
            with pytest.raises(DatasetError) as raised:
                split(msd, num_classes=3, allow_outside_dataset_dir=refused)
            message = str(raised.value)
            assert message.startswith(f"{msd / 'dataset.json'} lists files outside the dataset folder (pass "
                                      "--allow_outside_dataset_dir True to use them):")
            assert f"image '../elsewhere/images_synthetic_000.nii.gz' is outside {msd}" in message
            assert f"label '{elsewhere / 'labels_synthetic_001.nii.gz'}' is outside {msd}" in message
            assert f"image 'imagesTr/link_out.nii.gz' is outside {msd}" in message
            assert message.count(" is outside ") == 6
    split = training_split(msd, num_classes=3, allow_outside_dataset_dir=True)
    assert len(split["training"]) + len(split["validation"]) == 9
    assert len(scoring_split(msd, num_classes=3, allow_outside_dataset_dir="True")["validation"]) == 9
    with pytest.raises(DatasetError, match=r"allow_outside_dataset_dir must be true or false, got 'yes'"):
        training_split(msd, num_classes=3, allow_outside_dataset_dir="yes")
