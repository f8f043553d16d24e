# SPDX-License-Identifier: Apache-2.0
"""Batch inference for pipelines (``bundletools.BatchInference``, the ``evaluator`` of every inference.json).

End to end with the UNet bundle and a randomly initialised model (robustness does not need a trained one): a
folder mixing good NIfTI, NRRD, MetaImage and DICOM inputs with every kind of bad input is segmented by
``python -m monai.bundle run`` in a fresh process; then resuming, overwriting, the ``bundletools.infer``
command line and torchrun with two processes. In-process: every bundle's config builds the runner and survives
a bad case, extra outputs, the output-folder lock, the QC picture, DICOM folders and the failure reasons.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose, CopyItemsd, Invertd, Lambdad
from PIL import Image

from bundletools import BatchInference
from bundletools.batch import TMP_PREFIX, failure_reason
from bundletools.data import DatasetError, check_dicom_series, inference_datalist
from bundletools.model import Checkpoint
from bundletools.qc import PALETTE, render_qc
from tests.utils import (ALL_BUNDLES, BUNDLES, UNET, config_list, random_model, read_reference, run_bundle,
                         write_dicom_series)

FAST = ["--num_workers", "0"]

# good inputs: name -> case name
GOOD = {"oblique.nii.gz": "oblique", "lps.nrrd": "lps", "meta.mha": "meta", "header.mhd": "header",
        "oblique_series": "oblique_series"}
# bad inputs: name -> what the report's reason must say
BAD = {
    "truncated.nii.gz": r"truncated\.nii\.gz: cannot read the image \(EOFError",
    "cut_short.nrrd": r"cut_short\.nrrd: cannot read the image \(RuntimeError: .*NrrdImageIO",
    "twin.nii.gz": r"twin\.nii\.gz: has the same case name 'twin' as twin\.mha; rename one of them",
    "twin.mha": r"twin\.mha: has the same case name 'twin' as twin\.nii\.gz; rename one of them",
    "text_file.nii.gz": r"text_file\.nii\.gz: cannot read the image \(ImageFileError: .* is not a gzip file",
    "flat_2d.nii.gz": r"flat_2d\.nii\.gz: has 2 spatial axes \(shape \(22, 26\)\), the model needs 3D",
    "two_channels.nii.gz": r"two_channels\.nii\.gz: has 2 channel\(s\), the model expects 1",
    "nan_voxels.nii.gz": r"nan_voxels\.nii\.gz: contains NaN or Inf voxels",
    "inf_voxels.mha": r"inf_voxels\.mha: contains NaN or Inf voxels",
    "empty_axis.nii.gz": r"empty_axis\.nii\.gz: has an empty axis \(shape \(20, 0, 20\)\)",
    "broken_series": r"broken_series: 1 of its 12 DICOM files are not readable slices of the series",
}


def _case(name: str) -> str:
    return name.split(".")[0]


# ------------------------------------------------------------------------------------------------ inputs
def assert_same_grid(reference: sitk.Image, seg_path: Path) -> None:
    seg = sitk.ReadImage(str(seg_path))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert seg.GetSize() == reference.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(seg.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), reference.GetDirection(), atol=1e-5)
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}


def _sitk(array_zyx: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def make_scans(folder: Path) -> Path:
    """Every good and bad input of GOOD and BAD in one folder."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(22, 26, 14)).astype(np.float32)  # x, y, z
    affine = np.eye(4)
    angle = np.deg2rad(20)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) @ (
        np.diag([0.9, 1.1, 2.0]))
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    nib.save(nib.Nifti1Image(volume, affine), folder / "oblique.nii.gz")
    zyx = np.ascontiguousarray(volume.transpose(2, 1, 0))
    flipped = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # axes swapped, z reversed
    sitk.WriteImage(_sitk(zyx, (0.7, 0.8, 2.5), (5.0, -7.0, 12.0), flipped), str(folder / "lps.nrrd"))
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    sitk.WriteImage(_sitk(zyx, (1.2, 0.9, 1.5), (-3.0, 4.0, 0.5), identity), str(folder / "meta.mha"))
    sitk.WriteImage(_sitk(zyx, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
                    str(folder / "header.mhd"))
    c, s = np.cos(np.deg2rad(15)), np.sin(np.deg2rad(15))
    oblique_dicom = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    write_dicom_series(folder / "oblique_series", (zyx[:12] * 100), (0.8, 0.9, 2.0), (10.0, -5.0, 3.0), oblique_dicom,
                       "1.2.826.0.1.3680043.2.1125.7.1")

    raw = (folder / "oblique.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    raw = (folder / "lps.nrrd").read_bytes()
    (folder / "cut_short.nrrd").write_bytes(raw[: len(raw) - 3000])
    (folder / "text_file.nii.gz").write_text("patient list, not an image\n")
    nib.save(nib.Nifti1Image(volume[:, :, 0], affine), folder / "flat_2d.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([volume, volume], axis=-1), affine), folder / "two_channels.nii.gz")
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), folder / "nan_voxels.nii.gz")
    inf = zyx.copy()
    inf[2, 3, 4] = np.inf
    sitk.WriteImage(_sitk(inf, (1, 1, 1), (0, 0, 0), identity), str(folder / "inf_voxels.mha"))
    nib.save(nib.Nifti1Image(np.zeros((20, 0, 20), np.float32), affine), folder / "empty_axis.nii.gz")
    write_dicom_series(folder / "broken_series", zyx[:12] * 100, (1, 1, 2), (0, 0, 0), identity,
                       "1.2.826.0.1.3680043.2.1125.7.4")
    slice_5 = folder / "broken_series" / "slice_005.dcm"
    slice_5.write_bytes(slice_5.read_bytes()[:600])  # a truncated transfer: the header is cut
    shutil.copy(folder / "oblique.nii.gz", folder / "twin.nii.gz")
    shutil.copy(folder / "meta.mha", folder / "twin.mha")
    (folder / "notes.txt").write_text("not an image suffix: ignored, not a case\n")
    return folder


def report_of(out: Path) -> dict[str, dict]:
    """The report's records by input name (two inputs may share a case name)."""
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {Path(c["input"]).name: c for c in report["cases"]}


def infer_args(scans: Path, out: Path, root: Path, *extra) -> list:
    return ["run", "--config_file", config_list(UNET, "inference"), "--dataset_dir", scans, "--output_dir", out,
            "--bundle_root", root, *FAST, *extra]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    return make_scans(tmp_path_factory.mktemp("batch") / "scans")


@pytest.fixture(scope="module")
def first_run(scans, unet_root, tmp_path_factory):
    """One batch over the mixed folder, with QC pictures: (process, output folder)."""
    work = tmp_path_factory.mktemp("first_run")
    proc = run_bundle(infer_args(scans, work / "out", unet_root, "--qc", "True"), cwd=work, check=False)
    return proc, work / "out"


@pytest.mark.slow
def test_every_good_case_is_segmented_on_its_input_grid(first_run, scans):
    proc, out = first_run
    assert proc.returncode == 2, proc.output[-3000:]  # the batch finished; some cases failed
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["cases"] == len(GOOD) + len(BAD)
    assert (report["summary"]["succeeded"], report["summary"]["failed"]) == (len(GOOD), len(BAD))
    cases = report_of(out)
    for name, case in GOOD.items():
        record = cases[name]
        assert record["case"] == case and record["status"] == "succeeded" and record["reason"] == ""
        assert record["output"] == str(out / f"{case}_seg.nii.gz") and record["seconds"] > 0
        assert_same_grid(read_reference(scans / name), out / f"{case}_seg.nii.gz")
        with Image.open(out / f"{case}_qc.png") as png:
            assert png.size == (3 * 256, 256) and png.mode == "RGB"
    # outputs only for good cases; nothing temporary left
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == sorted(f"{c}_seg.nii.gz" for c in GOOD.values())
    assert not list(out.glob(f"{TMP_PREFIX}*")) and not list(out.glob(".report.rank*"))
    # report.csv says the same as report.json
    rows = (out / "report.csv").read_text().splitlines()
    assert rows[0] == "case,status,reason,output,seconds,input,qc"
    assert len(rows) == 1 + len(cases) + len(report["ignored"])  # a row per case and per ignored entry
    assert {Path(e["input"]).name: e["reason"] for e in report["ignored"]} == {
        "header.raw": "data file of header.mhd",
        "notes.txt": "not an image: inputs are .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd files and DICOM series folders"}
    assert "case(s) failed" in proc.output and "two_channels: " in proc.output


@pytest.mark.slow
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_input_fails_its_case_only(first_run, bad):
    _, out = first_run
    cases = report_of(out)
    record = cases[bad]
    assert record["status"] == "failed" and record["case"] == _case(bad)
    assert re.search(BAD[bad], record["reason"]), record["reason"]
    assert "\n" not in record["reason"] and "Traceback" not in record["reason"]
    assert record["output"] == "" and not (out / f"{_case(bad)}_seg.nii.gz").exists()
    lost = [n for n, c in GOOD.items() if cases[n]["status"] != "succeeded" or not (out / f"{c}_seg.nii.gz").is_file()]
    assert not lost, f"good cases lost next to {bad}: {lost}"


@pytest.mark.slow
def test_rerun_resumes_after_a_crash_skips_complete_cases_and_overwrite_redoes_them(first_run, scans, unet_root,
                                                                                      tmp_path):
    _, first_out = first_run
    out = Path(shutil.copytree(first_out, tmp_path / "out"))  # copies keep their mtimes
    # a crash while writing "meta": its output was never renamed into place, a half temporary file is left
    (out / "meta_seg.nii.gz").unlink()
    (out / "meta_qc.png").unlink()
    stale = out / f"{TMP_PREFIX}4242-meta_seg.nii.gz"
    stale.write_bytes((out / "lps_seg.nii.gz").read_bytes()[:100])
    done = {n: (out / f"{c}_seg.nii.gz").stat().st_mtime_ns for n, c in GOOD.items() if c != "meta"}

    # the same batch again, through the fire command line
    proc = run_bundle([UNET, scans, out, "--qc", "--bundle_root", unet_root, *FAST], cwd=tmp_path, check=False,
                      module="bundletools.infer")
    assert proc.returncode == 2, proc.output[-3000:]
    cases = report_of(out)
    assert cases["meta.mha"]["status"] == "succeeded"
    assert_same_grid(read_reference(scans / "meta.mha"), out / "meta_seg.nii.gz")
    assert not stale.exists() and not list(out.glob(f"{TMP_PREFIX}*"))
    for name, mtime in done.items():
        seg = out / f"{GOOD[name]}_seg.nii.gz"
        assert cases[name]["status"] == "skipped" and cases[name]["output"] == str(seg)
        assert seg.stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert all(cases[b]["status"] == "failed" for b in BAD)  # bad cases are tried again

    proc = run_bundle(infer_args(scans, out, unet_root, "--qc", "True", "--overwrite", "True"), cwd=tmp_path,
                      check=False)
    assert proc.returncode == 2
    cases = report_of(out)
    for name, mtime in done.items():
        assert cases[name]["status"] == "succeeded"
        assert (out / f"{GOOD[name]}_seg.nii.gz").stat().st_mtime_ns > mtime


@pytest.mark.slow
def test_torchrun_two_processes_split_the_cases(first_run, scans, unet_root, tmp_path):
    _, first_out = first_run
    out = tmp_path / "out"
    proc = run_bundle(infer_args(scans, out, unet_root), cwd=tmp_path, check=False, torchrun=2)
    assert proc.returncode != 0  # bad cases failed
    report = json.loads((out / "report.json").read_text())
    names = [c["case"] for c in report["cases"]]
    assert sorted(names) == sorted([*GOOD.values(), *map(_case, BAD)])  # every case exactly once
    assert report["summary"]["processes"] == 2
    assert {c["rank"] for c in report["cases"]} == {0, 1}
    first = report_of(first_out)
    assert {n: r["status"] for n, r in report_of(out).items()} == {n: r["status"] for n, r in first.items()}
    for case in GOOD.values():  # the same weights give the same segmentation whichever process ran it
        ours, single = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"{case}_seg.nii.gz"))) for d in (out, first_out))
        np.testing.assert_array_equal(ours, single)
    assert not list(out.glob(".report.rank*")) and not list(out.glob(f"{TMP_PREFIX}*"))


# --------------------------------------------------------------------------------------- every bundle
def _tiny_scans(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    affine = np.diag([1.2, 0.9, 1.5, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(size=(18, 22, 14)).astype(np.float32), affine), folder / "good.nii.gz")
    (folder / "bad.nii.gz").write_text("not an image")
    return folder


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_every_bundle_builds_the_runner_and_survives_a_bad_case(bundle, tmp_path):
    root = random_model(bundle, tmp_path / "root")
    scans, out = _tiny_scans(tmp_path / "scans"), tmp_path / "out"
    workflow = ConfigWorkflow(config_file=str(BUNDLES / bundle / "configs" / "inference.json"), workflow_type="infer",
                              logging_file=False, bundle_root=str(root), dataset_dir=str(scans), output_dir=str(out),
                              num_workers=0)
    workflow.initialize()
    assert workflow.check_properties() == []  # MONAI's inference properties: dataset, evaluator, inferer, ...
    runner = workflow.evaluator
    assert isinstance(runner, BatchInference)
    assert runner.dataset is workflow.dataset and runner.dataset.transform is workflow.preprocessing
    assert runner.postprocessing is workflow.parser.get_parsed_content("postprocessing")
    post = [type(t).__name__ for t in runner.postprocessing.transforms]
    assert "Invertd" in post and "SaveImaged" not in post  # MONAI Label appends its own writer
    assert runner.checkpoint.path == str(root / "models" / "model.pt")
    assert runner.checkpoint.network is workflow.parser.get_parsed_content("network_def")
    assert list(runner.outputs) == ["pred"] and runner.outputs["pred"].suffix == "_seg.nii.gz"  # no QC, no SEG
    assert (runner.overwrite, runner.execution.num_workers) == (False, 0)
    with pytest.raises(SystemExit) as exit_info:
        workflow.run()
    assert exit_info.value.code == 2
    cases = report_of(out)
    assert cases["good.nii.gz"]["status"] == "succeeded" and cases["bad.nii.gz"]["status"] == "failed"
    assert cases["bad.nii.gz"]["reason"].startswith("bad.nii.gz: cannot read the image")
    assert nib.load(out / "good_seg.nii.gz").shape == (18, 22, 14)


# ---------------------------------------------------------------------------------------- in-process
@pytest.fixture
def unet_parts(tmp_path):
    """The UNet config parsed for a folder of two good cases, with a random model."""
    root = random_model(UNET, tmp_path / "root")
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.normal(size=(16, 20, 12)).astype(np.float32), np.eye(4)),
                 scans / f"{name}.nii.gz")
    parser = ConfigParser()
    parser.read_config(BUNDLES / UNET / "configs" / "inference.json")
    parser.update({"bundle_root": str(root), "dataset_dir": str(scans), "output_dir": str(tmp_path / "out"),
                   "num_workers": 0})
    return parser


def _runner(parser: ConfigParser, ckpt_path: str | Path | None = None, **kwargs) -> BatchInference:
    """The runner built from the config's parts by hand, as a program using it from Python would."""
    network = parser.get_parsed_content("network")
    checkpoint = Checkpoint(ckpt_path or parser.get_parsed_content("ckpt_path"), network)
    args = dict(dataset=parser.get_parsed_content("dataset"), output_dir=parser.get_parsed_content("output_dir"),
                network=network, inferer=parser.get_parsed_content("inferer"),
                postprocessing=parser.get_parsed_content("postprocessing"), checkpoint=checkpoint)
    args.update(kwargs)
    return BatchInference(**args)


def test_extra_outputs_are_written_skipped_and_reported_like_the_segmentation(unet_parts):
    """A bundle declares more outputs (here a float32 'uncertainty': 1 - max probability)."""
    preprocessing = unet_parts.get_parsed_content("preprocessing")
    post = Compose([
        Lambdad("pred", lambda x: torch.softmax(x, 0)),
        Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False),
        CopyItemsd("pred", names="uncertainty"),
        Lambdad("uncertainty", lambda p: 1.0 - p.max(dim=0, keepdim=True).values),
        Lambdad("pred", lambda p: p.argmax(dim=0, keepdim=True)),
    ])
    outputs = {"pred": {"postfix": "seg", "dtype": "uint8"}, "uncertainty": {"postfix": "uncertainty",
                                                                             "dtype": "float32"}}
    report = _runner(unet_parts, postprocessing=post, outputs=outputs).run()  # no failure: no SystemExit
    out = Path(report["summary"]["output_dir"])
    assert report["summary"]["succeeded"] == 2
    for case in ("a", "b"):
        seg, unc = nib.load(out / f"{case}_seg.nii.gz"), nib.load(out / f"{case}_uncertainty.nii.gz")
        assert seg.get_data_dtype() == np.uint8 and unc.get_data_dtype() == np.float32
        assert unc.shape == seg.shape == (16, 20, 12)
        values = np.asarray(unc.dataobj)
        assert values.min() >= 0.0 and values.max() <= 2 / 3 + 1e-5 and values.max() > 0  # 3 classes
    assert report_of(out)["a.nii.gz"]["outputs"] == {"pred": str(out / "a_seg.nii.gz"),
                                              "uncertainty": str(out / "a_uncertainty.nii.gz")}
    assert (out / "report.csv").read_text().splitlines()[0] == "case,status,reason,output,seconds,input,uncertainty"

    (out / "b_uncertainty.nii.gz").unlink()  # a case is complete only with all of its outputs
    report = _runner(unet_parts, postprocessing=post, outputs=outputs).run()
    assert {c["case"]: c["status"] for c in report["cases"]} == {"a": "skipped", "b": "succeeded"}
    assert (out / "b_uncertainty.nii.gz").is_file()

    missing = {**outputs, "entropy": {"postfix": "entropy", "dtype": "float32"}}
    report = _runner(unet_parts, postprocessing=post, outputs=missing, exit_on_failure=False).run()
    assert all("postprocessing produced no 'entropy' output" in c["reason"] for c in report["cases"])
    assert not list(out.glob(f"{TMP_PREFIX}*"))


def test_a_second_batch_on_the_same_output_folder_is_refused(unet_parts):
    out = Path(unet_parts.get_parsed_content("output_dir"))
    out.mkdir(parents=True)
    with open(out / ".batch.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another batch inference is writing to this folder"):
            _runner(unet_parts).run()
    assert not list(out.glob("*_seg.nii.gz"))


def test_missing_model_is_an_error_naming_the_file(unet_parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt: no trained model"):
        _runner(unet_parts, ckpt_path=tmp_path / "nowhere.pt").run()


# --------------------------------------------------------------------------------------------- pieces
def test_qc_picture_draws_labels_through_their_centre_in_physical_proportions():
    image = np.zeros((40, 40, 10), np.float32)
    image[10:30, 10:30, :] = 100.0
    label = np.zeros(image.shape, np.uint8)
    label[15:20, 25:30, 2:4] = 1  # off-centre: the slices must go through it
    affine = np.diag([1.0, 1.0, 4.0, 1.0])  # 40 x 40 x 40 mm
    png = np.asarray(render_qc(image, label, affine, size=100))
    assert png.shape == (100, 300, 3)
    red = png[..., 0].astype(int) - png[..., 1] > 50
    assert red[:, :100].any() and red[:, 100:200].any() and red[:, 200:].any()  # the label in all three panels
    assert not (png[..., 1].astype(int) - png[..., 0] > 50).any()  # no label 2 (green)
    assert tuple(PALETTE[0]) == (230, 25, 25)
    # anisotropic voxels are shown in proportion: 40 x 20 mm fills the width and half the height
    flat = np.asarray(render_qc(image[:, :, :5], label[:, :, :5], affine, size=100))
    rows = np.nonzero(flat[:, 100:200].any(axis=(1, 2)))[0]
    assert 48 <= rows.max() - rows.min() + 1 <= 52
    empty = np.asarray(render_qc(image, np.zeros_like(label), affine, size=100))
    assert (empty[..., 0] == empty[..., 1]).all()  # nothing segmented: grey only


def test_failure_reason_is_one_line_naming_file_and_cause():
    try:
        try:
            raise EOFError("Compressed file ended\nbefore the end-of-stream marker")
        except EOFError as inner:
            raise RuntimeError("applying transform <monai.transforms.io.dictionary.LoadImaged object>") from inner
    except RuntimeError as e:
        reason = failure_reason(e, "/data/in/case_7.nii.gz", "cannot read the image")
    assert reason == ("case_7.nii.gz: cannot read the image (EOFError: Compressed file ended before the "
                      "end-of-stream marker)")
    itk = RuntimeError("/src/ITK/itkNrrdImageIO.cxx:935:\nITK ERROR: NrrdImageIO(0x55d1): Read: Error reading x")
    assert failure_reason(itk, "/in/x.nrrd") == ("x.nrrd: failed (RuntimeError: ITK ERROR: NrrdImageIO: Read: Error "
                                                 "reading x)")
    assert len(failure_reason(ValueError("y" * 2000), "/in/a.mha")) == 400


def test_dicom_series_folders_are_cases_named_after_the_folder(tmp_path):
    zyx = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)
    write_dicom_series(tmp_path / "in" / "series.001", zyx, (1, 1, 2), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                       "1.2.826.0.1.3680043.2.1125.7.10")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "in" / "scan.nii.gz")
    (tmp_path / "in" / "other").mkdir()
    (tmp_path / "in" / "other" / "readme.txt").write_text("no DICOM here")
    assert [(d["case"], Path(d["image"]).name) for d in inference_datalist(tmp_path / "in")] == [
        ("scan", "scan.nii.gz"), ("series.001", "series.001")]
    check_dicom_series(tmp_path / "in" / "series.001")
    (tmp_path / "in" / "series.001" / "slice_002.dcm").unlink()  # a missing slice leaves a gap
    with pytest.raises(DatasetError, match="slice positions are repeated or unevenly spaced"):
        check_dicom_series(tmp_path / "in" / "series.001")


def test_inputs_sharing_a_case_name_become_failed_cases_instead_of_stopping_the_batch(tmp_path):
    for name in ("x.nii.gz", "x.nrrd", "y.mha"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(DatasetError, match="same case name 'x'"):
        inference_datalist(tmp_path)
    datalist = inference_datalist(tmp_path, duplicates="fail")
    assert [(Path(d["image"]).name, d.get("error")) for d in datalist] == [
        ("x.nii.gz", "x.nii.gz: has the same case name 'x' as x.nrrd; rename one of them"),
        ("x.nrrd", "x.nrrd: has the same case name 'x' as x.nii.gz; rename one of them"),
        ("y.mha", None)]


def test_non_ascii_case_names_are_reported_under_a_c_locale(unet_parts):
    """GDCM (ITK's DICOM I/O) resets the process locale to "C" when it reads or writes a series, which makes
    Python's default text encoding ASCII; the report must still hold any case name."""
    import locale

    scans = Path(unet_parts["dataset_dir"])
    (scans / "a.nii.gz").rename(scans / "Müller_ü.nii.gz")
    saved = locale.setlocale(locale.LC_ALL, None)
    locale.setlocale(locale.LC_ALL, "C")
    try:
        assert locale.getpreferredencoding(False).upper() in ("ANSI_X3.4-1968", "ASCII", "US-ASCII")
        _runner(unet_parts, exit_on_failure=False).run()
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    out = Path(unet_parts["output_dir"])
    cases = report_of(out)
    assert cases["Müller_ü.nii.gz"]["status"] == "succeeded" and (out / "Müller_ü_seg.nii.gz").is_file()
    assert "Müller_ü" in (out / "report.csv").read_text(encoding="utf-8")
