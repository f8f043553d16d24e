# SPDX-License-Identifier: Apache-2.0
"""The batch runner against hostile folders and command lines (issues 14 and 24): every promise holds.

In-process runs build the UNet bundle's ``evaluator`` from its ``inference.json`` (a randomly initialised model:
robustness does not need a trained one) over small folders made for each promise; the lock and the command line
are also tested in fresh processes, as a pipeline runs them. Each test names the promise it checks.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser

from bundletools.batch import TMP_PREFIX
from bundletools.data import inference_datalist
from tests.utils import (AXIAL, BUNDLES, UNET, batch, by_input, evaluator, read_reference, strip_preamble,
                         subprocess_env, write_dicom_series, write_mr_series)

SHAPE = (16, 20, 12)
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def volume(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def save_nifti(path: str | os.PathLike, data: np.ndarray | None = None, affine=None) -> None:
    nib.save(nib.Nifti1Image(volume() if data is None else data, np.eye(4) if affine is None else affine),
             os.fsdecode(path))


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ 1: names that are not UTF-8
def test_a_file_name_that_is_not_utf8_is_segmented_reported_escaped_and_resumed(tmp_path, unet_root, caplog):
    """Item 1: a latin-1 ``Müller.nii.gz`` is segmented, report.csv/json are valid UTF-8 with the byte escaped, a
    rerun skips it; a name ITK cannot open fails its case alone (SimpleITK would abort the process)."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(os.fsencode(scans) + b"/M\xfcller.nii.gz")
    save_nifti(scans / "plain.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(volume()), str(tmp_path / "x.nrrd"))
    os.rename(tmp_path / "x.nrrd", os.fsencode(scans) + b"/Gr\xf6\xdfe.nrrd")
    caplog.set_level(logging.INFO)

    report = batch(scans, out, unet_root)
    cases = by_input(report)
    assert cases["M\\xfcller.nii.gz"]["status"] == "succeeded" and cases["M\\xfcller.nii.gz"]["case"] == "M\\xfcller"
    assert os.path.isfile(os.fsencode(out) + b"/M\xfcller_seg.nii.gz")  # the output keeps the input's bytes
    assert cases["plain.nii.gz"]["status"] == "succeeded"
    itk = cases["Gr\\xf6\\xdfe.nrrd"]
    assert itk["status"] == "failed" and "the file name is not valid UTF-8" in itk["reason"]
    rows = list(csv.DictReader((out / "report.csv").read_bytes().decode("utf-8").splitlines()))
    assert {r["case"] for r in rows} == {"M\\xfcller", "plain", "Gr\\xf6\\xdfe"}
    json.loads((out / "report.json").read_bytes().decode("utf-8"))
    assert all("\udcfc" not in r.getMessage() for r in caplog.records)
    assert any("M\\xfcller" in r.getMessage() for r in caplog.records)

    again = by_input(batch(scans, out, unet_root))  # a rerun works and skips what is complete
    assert again["M\\xfcller.nii.gz"]["status"] == again["plain.nii.gz"]["status"] == "skipped"


def test_newlines_in_names_cannot_forge_log_lines(tmp_path, unet_root, caplog):
    """Item 11 (log forging): a newline in a file name is escaped in every log line and in the report."""
    scans = tmp_path / "scans"
    scans.mkdir()
    save_nifti(scans / "x\nINFO forged: segmented.nii.gz")
    caplog.set_level(logging.DEBUG)
    report = batch(scans, tmp_path / "out", unet_root)
    assert report["cases"][0]["case"] == "x\\nINFO forged: segmented"
    lines = [line for r in caplog.records for line in r.getMessage().splitlines()]
    assert not [line for line in lines if line.startswith("INFO forged")]
    assert any("x\\nINFO forged: segmented" in line for line in lines)


# ------------------------------------------------------------------------------------ 2: one-voxel axes
def test_a_one_voxel_trailing_axis_is_kept_with_the_exact_geometry(tmp_path, unet_root):
    """Item 2: a (20, 24, 1) NIfTI and a one-file DICOM series stay 3D with their origin, spacing, direction."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    affine = np.array([[0.0, -0.9, 0.0, 12.0], [1.1, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.5], [0, 0, 0, 1]])
    save_nifti(scans / "one_slice.nii.gz", volume(1, (20, 24, 1)), affine)
    write_dicom_series(scans / "one_file_series", (volume(2, (1, 18, 22)) * 100), (0.8, 0.7, 2.0),
                       (3.0, -2.0, 41.0), IDENTITY, "1.2.826.0.1.3680043.2.1125.14.1")
    # a series of one slice is taken for a localizer unless the series rules allow it
    cases = by_input(batch(scans, out, unet_root, series_rules={"min_slices": 1}))
    assert {c["status"] for c in cases.values()} == {"succeeded"}, cases
    seg = nib.load(out / "one_slice_seg.nii.gz")
    assert seg.shape == (20, 24, 1)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    reference = read_reference(scans / "one_file_series")
    dicom = sitk.ReadImage(str(out / "one_file_series_seg.nii.gz"))
    assert dicom.GetDimension() == 3 and dicom.GetSize() == reference.GetSize() == (22, 18, 1)
    np.testing.assert_allclose(dicom.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(dicom.GetOrigin()[2], 41.0, atol=1e-4)
    np.testing.assert_allclose(dicom.GetSpacing()[:2], reference.GetSpacing()[:2], atol=1e-5)
    np.testing.assert_allclose(dicom.GetDirection(), reference.GetDirection(), atol=1e-5)


def test_a_scan_stored_with_permuted_axes_keeps_its_layout_and_affine(tmp_path, unet_root):
    """Item 10: an affine whose diagonal is zero (the slice axis stored first) is written back as it was, with
    no resampling (MONAI 1.6's writers resample even when asked not to, and fail on such an affine)."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    affine = np.array([[0.0, 1.0, 0.0, -5.0], [0.0, 0.0, 1.2, 3.0], [3.0, 0.0, 0.0, 2.0], [0, 0, 0, 1]])
    save_nifti(scans / "slices_first.nii.gz", volume(3, (6, 20, 16)), affine)
    cases = by_input(batch(scans, out, unet_root))
    assert cases["slices_first.nii.gz"]["status"] == "succeeded", cases
    seg = nib.load(out / "slices_first_seg.nii.gz")
    assert seg.shape == (6, 20, 16)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)


# ---------------------------------------------------------------------------------------- 3: long names
def test_long_case_names_get_short_temporary_names_or_fail_with_the_length(tmp_path, unet_root):
    """Item 3: a 240-character case is segmented (its temporary name stays within 255 bytes); one whose output
    name would pass 255 bytes fails with that reason, not "cannot find a suitable writer"."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    fits, too_long = "a" * 240, "b" * 246  # outputs: 251 and 257 bytes
    save_nifti(scans / f"{fits}.nii.gz")
    save_nifti(scans / f"{too_long}.nii.gz")
    cases = {c["case"]: c for c in batch(scans, out, unet_root)["cases"]}
    assert cases[fits]["status"] == "succeeded" and (out / f"{fits}_seg.nii.gz").is_file()
    assert cases[too_long]["status"] == "failed"
    assert "is 257 bytes long and the file system allows 255" in cases[too_long]["reason"]
    assert not list(out.glob(f"{TMP_PREFIX}*"))


# ------------------------------------------------------------------------------------------ 4, 5: the lock
def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path, unet_root):
    """Item 4: ``OUT/.batch.lock`` pointing at another file: the run stops naming the link; the file keeps its
    content (the old runner truncated it)."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    victim = tmp_path / "victim.conf"
    victim.write_text("precious settings\n")
    out.mkdir()
    (out / ".batch.lock").symlink_to(victim)
    with pytest.raises(RuntimeError, match=r"\.batch\.lock: is a symbolic link"):
        batch(scans, out, unet_root)
    assert victim.read_text() == "precious settings\n"
    assert not (out / "a_seg.nii.gz").exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.slow
def test_the_lock_dies_with_a_killed_runner_while_its_loader_workers_live(tmp_path, unet_root):
    """Item 5: ``kill -9`` of a runner with DataLoader workers: the folder can be locked again at once (the
    workers used to inherit the lock and hold it for about 40 s)."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for i in range(40):
        save_nifti(scans / f"case_{i:02d}.nii.gz", volume(i, (32, 32, 24)))
    command = [sys.executable, "-m", "bundletools.infer", UNET, str(scans), str(out), "--bundle_root",
               str(unet_root), "--num_workers", "2"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # wait until the workers have delivered a case
            if "[2/40]" in line or time.monotonic() > deadline:
                break
        workers = _children(proc.pid)
        assert workers, "the runner has no worker processes"
        proc.kill()
        proc.wait()
        assert any(_alive(w) for w in workers), "the workers died with the runner; nothing was tested"
        with open(out / ".batch.lock", "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a worker still holds it
        assert any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------- 6: command line
@pytest.fixture
def captured_run(monkeypatch, tmp_path):
    """``python -m bundletools.infer`` in-process with ``monai.bundle.run`` replaced by a recorder."""
    calls: list[dict] = []
    monkeypatch.setattr(monai.bundle, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.chdir(tmp_path)

    def infer(*args) -> dict:
        from bundletools.infer import main

        monkeypatch.setattr(sys, "argv", ["bundletools.infer", *map(str, args)])
        main()
        return calls[-1]

    return infer


def test_the_command_line_takes_paths_and_flags_as_typed(captured_run, tmp_path, unet_root):
    """Item 6: ``2024.10``, ``1e3`` and ``out,v2`` stay strings; ``false`` in any case is false; numbers and
    lists are parsed for keys whose default is one."""
    (tmp_path / "1e3").mkdir()
    args = captured_run(UNET, "1e3", "2024.10", "--overwrite", "false", "--qc", "FALSE", "--bundle_root", unet_root,
                        "--num_workers", "0", "--sw_overlap", "0.25", "--roi_size", "[32,32,16]")
    assert (args["dataset_dir"], args["output_dir"]) == ("1e3", "2024.10")
    assert args["overwrite"] is False and args["qc"] is False
    assert args["num_workers"] == 0 and args["sw_overlap"] == 0.25 and args["roi_size"] == [32, 32, 16]
    args = captured_run(UNET, "1e3", "out,v2", "--overwrite", "--qc", "True", "--amp", "false", "--bundle_root",
                        unet_root)
    assert args["output_dir"] == "out,v2" and args["overwrite"] is True and args["qc"] is True
    assert args["amp"] is False


@pytest.mark.parametrize("args, message", [
    (["IN", "OUT", "--ovewrite", "True"], r"the bundle unet_segmentation has no config key 'ovewrite'; its keys are "
                                          r"amp, bundle_root, .*overwrite, .*qc"),
    (["nowhere", "OUT"], r"the input folder 'nowhere' does not exist"),
    (["IN", "OUT", "--ckpt_path", "none.pt"], r"no trained model at none\.pt"),
    (["IN", "OUT", "--overwrite", "maybe"], r"--overwrite takes true or false, not 'maybe'"),
])
def test_command_line_mistakes_are_one_line_naming_them_exit_1(captured_run, tmp_path, unet_root, capsys, args,
                                                                message):
    """Item 6: a misspelled key, a missing folder or model: one line on stderr naming it, exit status 1."""
    (tmp_path / "IN").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        captured_run(UNET, *args, "--bundle_root", unet_root)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_an_unknown_bundle_is_one_line_exit_1(captured_run, tmp_path, capsys):
    (tmp_path / "IN").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        captured_run("unet_segmentaton", "IN", "OUT")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown bundle 'unet_segmentaton'" in err and "unet_segmentation" in err


def test_false_strings_from_monai_bundle_run_are_false(tmp_path, unet_root):
    """Item 6 / README: ``python -m monai.bundle run ... --overwrite false --qc false`` passes the strings
    ``"false"``; the runner takes them as false (they used to be true)."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    batch(scans, out, unet_root, qc="false")
    assert not (out / "a_qc.png").exists()
    mtime = (out / "a_seg.nii.gz").stat().st_mtime_ns
    assert batch(scans, out, unet_root, overwrite="False", qc="false")["cases"][0]["status"] == "skipped"
    assert (out / "a_seg.nii.gz").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_the_command_line_end_to_end(tmp_path, unet_root):
    """Item 6 end to end: the output folder is named as typed, ``--qc false`` writes no picture, a rerun with
    ``--overwrite FALSE`` skips, and a misspelled key is one line on stderr with exit status 1."""
    (tmp_path / "1e3").mkdir()
    save_nifti(tmp_path / "1e3" / "a.nii.gz")
    env = subprocess_env()

    def infer(*args):
        return subprocess.run([sys.executable, "-m", "bundletools.infer", UNET, *map(str, args), "--bundle_root",
                               unet_root, "--num_workers", "0"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, errors="replace", timeout=600)

    proc = infer("1e3", "2024.10", "--qc", "false")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "2024.10" / "a_seg.nii.gz").is_file() and not (tmp_path / "2024.10" / "a_qc.png").exists()
    assert not (tmp_path / "2024.1").exists()
    proc = infer("1e3", "2024.10", "--overwrite", "FALSE")
    assert proc.returncode == 0
    assert json.loads((tmp_path / "2024.10" / "report.json").read_text())["cases"][0]["status"] == "skipped"
    proc = infer("1e3", "2024.10", "--ovewrite", "True")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "no config key 'ovewrite'" in proc.stderr
    # the README's quoting for python -m monai.bundle (Fire): --output_dir "'out,v2'" and --qc false
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(BUNDLES / UNET / "configs" / "inference.json"), "--dataset_dir", "'1e3'",
                           "--output_dir", "'out,v2'", "--qc", "false", "--bundle_root", str(unet_root),
                           "--num_workers", "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "out,v2" / "a_seg.nii.gz").is_file() and not (tmp_path / "out,v2" / "a_qc.png").exists()


# ---------------------------------------------------------------------------- 7: DICOM discovery, accounting
def accounted(report: dict, path: Path) -> list[str]:
    """How the report accounts for ``path``: the statuses of its records, or of the records below it."""
    inside = [*((c["input"], c["status"]) for c in report["cases"]),
              *((e["input"], "ignored: " + e["reason"]) for e in report["ignored"])]
    return [status for p, status in inside if p == str(path) or p.startswith(str(path) + os.sep)]


def test_dicom_series_are_found_and_every_entry_of_the_input_folder_is_accounted_for(tmp_path, unet_root):
    """Item 7 and "every entry of IN is accounted for": slices without the preamble, a series folder where 25
    other files sort first, a nested patient/study/series layout, dangling and looping links, an empty folder and
    a text file: each is a case or an ignored entry with its reason; the series are segmented."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    zyx = volume(3, (6, 18, 22)) * 100
    write_dicom_series(scans / "no_preamble", zyx, (0.8, 0.9, 2.0), (1.0, 2.0, 3.0), IDENTITY,
                       "1.2.826.0.1.3680043.2.1125.14.2")
    strip_preamble(scans / "no_preamble")
    write_dicom_series(scans / "crowded", zyx, (1, 1, 2), (0, 0, 0), IDENTITY, "1.2.826.0.1.3680043.2.1125.14.3")
    for i in range(25):
        (scans / "crowded" / f"a_thumbnail_{i:02d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not DICOM")
    write_dicom_series(scans / "patient1" / "study1" / "series1", zyx, (1, 1, 2), (0, 0, 0), IDENTITY,
                       "1.2.826.0.1.3680043.2.1125.14.4")
    save_nifti(scans / "scan.nii.gz")
    (scans / "notes.txt").write_text("not an image")
    (scans / "empty").mkdir()
    (scans / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (scans / "loop.nii.gz").symlink_to(scans / "loop.nii.gz")
    (scans / "patient1" / "back_to_top").symlink_to(scans)

    datalist = inference_datalist(scans, duplicates="fail")
    assert sorted(d["case"] for d in datalist) == ["crowded", "no_preamble", "patient1_study1_series1", "scan"]
    report = batch(scans, out, unet_root)
    assert {c["case"]: c["status"] for c in report["cases"]} == dict.fromkeys(
        ["crowded", "no_preamble", "patient1_study1_series1", "scan"], "succeeded")
    seg = sitk.ReadImage(str(out / "no_preamble_seg.nii.gz"))  # the geometry written into the slices
    assert seg.GetSize() == (22, 18, 6)
    np.testing.assert_allclose(seg.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-4)
    np.testing.assert_allclose(seg.GetSpacing(), (0.8, 0.9, 2.0), atol=1e-4)
    ignored = {Path(e["input"]).name: e["reason"] for e in report["ignored"]}
    assert ignored["dangling.nii.gz"].startswith("dangling symbolic link")
    assert ignored["loop.nii.gz"] == "symbolic link loop"
    assert "symbolic link loop" in ignored["back_to_top"]
    assert ignored["empty"] == "empty folder" and ignored["notes.txt"].startswith("not an image")
    assert ignored["a_thumbnail_00.jpg"] == "not a DICOM file (in the series folder crowded)"
    for entry in scans.iterdir():  # every entry of IN
        assert accounted(report, entry), f"{entry.name} is not in the report"
    rows = (out / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + len(report["cases"]) + len(report["ignored"])


# ----------------------------------------------------------------------------- 10: geometry that cannot be kept
def _nifti_with_header(path: Path, sform=None, sform_code=1, qform_nan=False) -> None:
    """A gzipped NIfTI whose sform/qform fields are written as given (nibabel would recompute them)."""
    image = nib.Nifti1Image(volume(), np.diag([1.0, 1.0, 2.0, 1.0]))
    image.header.set_data_offset(352)
    header = bytearray(image.header.binaryblock)
    header[254:256] = struct.pack("<h", sform_code)
    if sform is not None:
        header[280:328] = np.asarray(sform, "<f4")[:3].tobytes()
    if qform_nan:
        header[252:254] = struct.pack("<h", 1)  # qform_code
        header[254:256] = struct.pack("<h", 0)  # sform_code
        header[256:260] = struct.pack("<f", float("nan"))  # quatern_b
    path.write_bytes(gzip.compress(bytes(header) + b"\0" * 4 + volume().tobytes()))


def test_geometry_that_cannot_be_kept_fails_the_case_naming_it(tmp_path, unet_root):
    """Item 10: NaN sform, NaN qform, a sheared NRRD direction, a singular affine: each case fails saying which
    geometry cannot be kept; never an output with a made-up geometry reported as success."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "good.nii.gz")
    _nifti_with_header(scans / "nan_sform.nii.gz", sform=np.full((4, 4), np.nan))
    _nifti_with_header(scans / "nan_qform.nii.gz", qform_nan=True)
    _nifti_with_header(scans / "singular.nii.gz", sform=np.diag([1.0, 1.0, 0.0, 1.0]))
    (scans / "shear.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 12 20 16\n"
        "space directions: (1,0,0) (0.5,1,0) (0,0,2)\nkinds: domain domain domain\nendian: little\n"
        "encoding: raw\nspace origin: (1,2,3)\ndata file: shear.raw\n")
    volume().tofile(scans / "shear.raw")
    cases = by_input(batch(scans, out, unet_root))
    assert cases["good.nii.gz"]["status"] == "succeeded"
    expected = {"nan_sform.nii.gz": r"nan_sform\.nii\.gz: the header's affine \(NIfTI sform/qform.*NaN",
                "nan_qform.nii.gz": r"nan_qform\.nii\.gz: the header's affine \(NIfTI sform/qform.*NaN",
                "singular.nii.gz": r"singular\.nii\.gz: the header's affine is singular",
                "shear.nhdr": r"shear\.nhdr: the header's axes are not orthogonal"}
    for name, reason in expected.items():
        assert cases[name]["status"] == "failed" and re.search(reason, cases[name]["reason"]), cases[name]
        assert "geometry cannot be kept" in cases[name]["reason"] or "cannot keep" in cases[name]["reason"]
        assert not list(out.glob(f"{name.split('.')[0]}_seg*"))


# ------------------------------------------------------------------------- 11: size, detached headers, resume
def test_size_is_checked_from_the_header_before_any_voxel_is_read(tmp_path, unet_root):
    """Item 11 (size): a header claiming 1000³ voxels fails without being read; the limit is the config's
    ``max_voxels``."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.uint8)
    header.set_data_offset(352)
    (scans / "huge.nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)  # a header and 1 kB
    save_nifti(scans / "small.nii.gz")
    cases = by_input(batch(scans, out, unet_root))
    assert cases["small.nii.gz"]["status"] == "succeeded"
    assert cases["huge.nii"]["status"] == "failed"
    assert re.search(r"huge\.nii: its header declares 1000x1000x1000 = 1e\+09 voxels, more than max_voxels=2\.68e\+08;"
                     r" it was not read", cases["huge.nii"]["reason"]), cases["huge.nii"]["reason"]
    small = by_input(batch(scans, tmp_path / "out2", unet_root, max_voxels=1000))["small.nii.gz"]
    assert small["status"] == "failed" and "more than max_voxels=1e+03" in small["reason"]


def test_a_detached_header_cannot_read_data_outside_the_input_folder(tmp_path, unet_root):
    """Item 11 (detached headers): ``.mhd``/``.nhdr`` naming a data file outside IN fail without reading it;
    one whose data file is inside IN is segmented."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    volume().tofile(tmp_path / "secret.raw")
    volume().tofile(scans / "inside.raw")
    mhd = "ObjectType = Image\nNDims = 3\nDimSize = 16 20 12\nElementType = MET_FLOAT\nElementDataFile = {}\n"
    (scans / "inside.mhd").write_text(mhd.format("inside.raw"))
    (scans / "relative.mhd").write_text(mhd.format("../secret.raw"))
    (scans / "absolute.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 16 20 12\nencoding: raw\nendian: little\n"
        f"data file: {tmp_path / 'secret.raw'}\n")
    cases = by_input(batch(scans, out, unet_root))
    assert cases["inside.mhd"]["status"] == "succeeded"
    for name in ("relative.mhd", "absolute.nhdr"):
        assert cases[name]["status"] == "failed", cases[name]
        assert "outside the input folder" in cases[name]["reason"]


def test_resume_redoes_changed_inputs_and_other_models_and_records_checksums(tmp_path, unet_root, monkeypatch):
    """Item 11 (resume, audit): the report records each case's input and model SHA-256 and the run's bundle,
    config and software; a corrected scan under the same name and outputs of another model are redone."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    config = BUNDLES / UNET / "configs" / "inference.json"
    monkeypatch.setattr(sys, "argv", ["monai/bundle/__main__.py", "run", "--config_file", str(config)])
    save_nifti(scans / "a.nii.gz", volume(1))
    save_nifti(scans / "b.nii.gz", volume(2))
    model = unet_root / "models" / "model.pt"
    report = batch(scans, out, unet_root, config_files=[str(config)])
    cases = by_input(report)
    assert cases["a.nii.gz"]["input_sha256"] == sha256(scans / "a.nii.gz")
    assert cases["a.nii.gz"]["model_sha256"] == sha256(model)
    run = report["run"]
    assert run["model"]["sha256"] == sha256(model)
    assert run["bundle"]["config_files"] == {str(config): sha256(config)} and run["bundle"]["name"] == UNET
    assert run["command"] == f"monai/bundle/__main__.py run --config_file {config}"
    assert {"torch", "monai", "python"} <= set(run["software"])

    save_nifti(scans / "a.nii.gz", volume(5))  # a corrected scan under the same name
    cases = by_input(batch(scans, out, unet_root))
    assert (cases["a.nii.gz"]["status"], cases["b.nii.gz"]["status"]) == ("succeeded", "skipped")
    assert cases["a.nii.gz"]["input_sha256"] == sha256(scans / "a.nii.gz")

    other = tmp_path / "other.pt"
    torch.manual_seed(7)
    parser = ConfigParser()
    parser.read_config(BUNDLES / UNET / "configs" / "inference.json")
    torch.save(parser.get_parsed_content("network_def").state_dict(), other)
    cases = by_input(batch(scans, out, unet_root, ckpt_path=str(other)))
    assert {c["status"] for c in cases.values()} == {"succeeded"}
    assert cases["b.nii.gz"]["model_sha256"] == sha256(other)
    os.utime(scans / "b.nii.gz")  # touched, same content: still complete
    cases = by_input(batch(scans, out, unet_root, ckpt_path=str(other)))
    assert {c["status"] for c in cases.values()} == {"skipped"}


def test_outputs_are_synced_to_disk_before_they_are_renamed(tmp_path, unet_root, monkeypatch):
    """Item 11 (fsync): every output and report file is fsync'ed under its temporary name before the rename,
    and the folder after it."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def spy_replace(src, dst, **kwargs):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    batch(scans, out, unet_root, qc=True)
    renamed = {e[2]: i for i, e in enumerate(events) if e[0] == "replace"}
    for name in ("a_seg.nii.gz", "a_qc.png", "report.json", "report.csv"):
        target = os.path.realpath(out / name)
        assert target in renamed, f"{name} was not renamed into place"
        i = renamed[target]
        source = events[i][1]
        assert ("fsync", source) in events[:i], f"{name} was renamed before it was synced"
        assert ("fsync", os.path.realpath(out)) in events[i:], f"the folder was not synced after {name}"



# ==================================================================================================== issue 24
# Each test names the item of issue 24 it checks.
def batch_exits(scans: Path, out: Path, root: Path, **overrides) -> tuple[int, dict | None]:
    """The evaluator run as a pipeline runs it (exiting on failure): (exit status, the report it returned)."""
    try:
        return 0, evaluator(scans, out, root, **overrides).run()
    except SystemExit as e:
        return e.code, None


class FakeDisk:
    """Writes under ``folder`` fail as they would on a read-only mount or, once ``budget`` bytes are written, on a
    full disk: in-process, so that the test also holds as root (whom chmod stops from nothing) and needs no
    mount. Files are opened through ``open`` (nibabel's gzip, PIL, the runner's text files) and ``os.open``;
    renames, removals and new folders go through ``os``."""

    def __init__(self, monkeypatch, folder: Path, read_only: bool = False, budget: int | None = None) -> None:
        self.folder, self.read_only, self.left = os.path.realpath(folder), read_only, budget
        self._open, self._os_open = open, os.open
        for module in (__import__("builtins"), __import__("io")):
            monkeypatch.setattr(module, "open", self.open)
        monkeypatch.setattr(os, "open", self.os_open)
        for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir"):
            monkeypatch.setattr(os, name, self._guarded(getattr(os, name)))

    def inside(self, path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == self.folder or path.startswith(self.folder + os.sep)

    def _refuse(self, path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def _guarded(self, function):
        def guarded(*paths, **kwargs):
            if self.read_only and any(self.inside(p) for p in paths[:2] if isinstance(p, (str, bytes, os.PathLike))):
                self._refuse(paths[0])
            return function(*paths, **kwargs)
        return guarded

    def os_open(self, path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC) or (flags & os.O_CREAT and not os.path.lexists(path))
        if self.read_only and writes and self.inside(path):
            self._refuse(path)
        return self._os_open(path, flags, *args, **kwargs)

    def open(self, file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
        if not any(c in mode for c in "wax+") or not self.inside(file):
            return self._open(file, mode, buffering, encoding, errors, newline, closefd, opener)
        if self.read_only:
            self._refuse(file)
        disk = self

        class Limited(io.FileIO):
            def write(self, data) -> int:
                size = memoryview(data).nbytes
                if disk.left is not None and size > disk.left:
                    disk.left = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(file))
                if disk.left is not None:
                    disk.left -= size
                return super().write(data)

        raw = Limited(file, mode.replace("b", "").replace("t", ""))
        buffered = io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding or "utf-8", errors, newline)


# ---------------------------------------------------------------------------- 1: the ONNX cache is bound
class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_changed_foreign_or_linked_onnx_cache_is_exported_again_never_used(tmp_path, caplog):
    """Item 1 (unit): the cached export is used only when its bytes match its manifest, which names the
    checkpoint, the structure and the exporter's versions; a changed file, a link in its place and another
    model's file under its name are exported again (the link's target untouched); a junk ``onnx_path`` is one
    line naming it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bundletools.outputs import BatchError
    from bundletools.runtime import OnnxRuntimeNetwork

    torch.manual_seed(0)
    network = _TinyNet().eval()
    x = torch.randn(2, 1, 6, 6, 6)
    expected = network(x).detach()
    cache = tmp_path / "cache"

    def run(model_sha256: str = "a" * 64) -> torch.Tensor:
        return OnnxRuntimeNetwork(network, SimpleNamespace(sha256=model_sha256), cache)(x)

    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-5)
    (onnx_file,) = cache.glob("model-*.onnx")
    manifest = json.loads(onnx_file.with_suffix(".json").read_text())
    assert manifest["model_sha256"] == "a" * 64 and manifest["sha256"] == sha256(onnx_file)
    assert {"torch", "onnx", "onnxscript", "structure"} <= set(manifest)
    good = onnx_file.read_bytes()

    caplog.set_level(logging.WARNING)
    raw = bytearray(good)
    raw[-8] ^= 0xFF  # one changed byte in the weights
    onnx_file.write_bytes(bytes(raw))
    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-5)
    assert onnx_file.read_bytes() == good and "does not match its manifest" in caplog.text

    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(bytes(raw))
    onnx_file.unlink()
    onnx_file.symlink_to(elsewhere)
    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-5)
    assert not onnx_file.is_symlink() and onnx_file.read_bytes() == good
    assert elsewhere.read_bytes() == bytes(raw)

    run("b" * 64)  # another checkpoint: its own file; copied over ours with its manifest, it is not ours
    (other,) = [p for p in cache.glob("model-*.onnx") if p != onnx_file]
    shutil.copy(other, onnx_file)
    shutil.copy(other.with_suffix(".json"), onnx_file.with_suffix(".json"))
    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-5)
    assert json.loads(onnx_file.with_suffix(".json").read_text())["model_sha256"] == "a" * 64

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for path, message in ((junk, r"junk\.onnx: onnx_path is not an ONNX model ONNX Runtime can load"),
                          (tmp_path / "none.onnx", r"none\.onnx: onnx_path cannot be read"),
                          (tmp_path, r"onnx_path is not a regular file")):
        with pytest.raises(BatchError, match=message):
            OnnxRuntimeNetwork(network, SimpleNamespace(sha256="a" * 64), cache, onnx_path=path)


def _add_to_bias(path: Path, value: float) -> None:
    """Add ``value`` to the bias of the network's last layer for class 0, in place (as a tampered file would)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    biases = [t for t in model.graph.initializer if len(t.dims) == 1 and t.dims[0] == 3]
    bias = numpy_helper.to_array(biases[-1]).copy()
    bias[0] += value
    biases[-1].CopyFrom(numpy_helper.from_array(bias, biases[-1].name))
    onnx.save(model, str(path))


@pytest.mark.slow
def test_a_tampered_or_linked_onnx_cache_never_segments(tmp_path, unet_root):
    """Item 1: 1000 added to a bias of the cached export (every voxel would be label 0) and then a link in its
    place: each rerun with ``--overwrite`` exports again and writes the first run's labels; report.json names the
    ONNX file that ran and its SHA-256."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz", volume(1, (24, 24, 20)))
    first = batch(scans, out, unet_root, runtime="onnxruntime")
    labels = np.asarray(nib.load(out / "a_seg.nii.gz").dataobj)
    assert first["cases"][0]["status"] == "succeeded" and len(np.unique(labels)) > 1
    (cached,) = (out / ".batch").glob("model-*.onnx")
    exported = sha256(cached)

    _add_to_bias(cached, 1000.0)
    tampered = cached.read_bytes()
    report = batch(scans, out, unet_root, runtime="onnxruntime", overwrite=True)
    assert report["cases"][0]["status"] == "succeeded"
    np.testing.assert_array_equal(np.asarray(nib.load(out / "a_seg.nii.gz").dataobj), labels)
    assert cached.read_bytes() != tampered
    assert first["run"]["model"]["onnx"] == report["run"]["model"]["onnx"] == {str(cached): exported}

    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(tampered)
    cached.unlink()
    cached.symlink_to(elsewhere)
    batch(scans, out, unet_root, runtime="onnxruntime", overwrite=True)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "a_seg.nii.gz").dataobj), labels)
    assert not cached.is_symlink() and elsewhere.read_bytes() == tampered


# ------------------------------------------------------------------------- 2: nothing followed out of OUT
def test_a_state_folder_that_is_a_link_stops_the_run_and_its_target_is_untouched(tmp_path, unet_root):
    """Item 2: ``OUT/.batch`` linking to another folder: the run stops naming the link; the target keeps its
    ``.tmp-important`` and gets no records."""
    scans, out, target = tmp_path / "scans", tmp_path / "out", tmp_path / "important"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    target.mkdir()
    (target / ".tmp-important").write_text("keep me")
    out.mkdir()
    (out / ".batch").symlink_to(target)
    with pytest.raises(RuntimeError, match=r"\.batch: is a symbolic link"):
        batch(scans, out, unet_root)
    assert sorted(p.name for p in target.iterdir()) == [".tmp-important"]
    assert not (out / "a_seg.nii.gz").exists()


def test_links_in_place_of_records_outputs_and_temporary_files_are_never_written_through(tmp_path, unet_root,
                                                                                           monkeypatch):
    """Item 2: an output replaced by a link to a file outside OUT is not taken as complete and is replaced, not
    written through; a record that is a link is not read; a link planted under the next temporary name is not
    written through."""
    from bundletools import outputs

    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    save_nifti(scans / "b.nii.gz", volume(2))
    batch(scans, out, unet_root)
    victim = tmp_path / "victim.nii.gz"
    shutil.copy(out / "a_seg.nii.gz", victim)
    (out / "a_seg.nii.gz").unlink()
    (out / "a_seg.nii.gz").symlink_to(victim)  # same bytes, but outside OUT
    (record,) = [p for p in (out / ".batch").glob("*.json") if json.loads(p.read_text())["case"] == "b"]
    forged = tmp_path / "forged.json"
    shutil.copy(record, forged)
    record.unlink()
    record.symlink_to(forged)
    before = victim.read_bytes(), forged.read_bytes()

    cases = by_input(batch(scans, out, unet_root))
    assert cases["a.nii.gz"]["status"] == cases["b.nii.gz"]["status"] == "succeeded"
    assert not (out / "a_seg.nii.gz").is_symlink() and not record.is_symlink()
    assert (victim.read_bytes(), forged.read_bytes()) == before

    monkeypatch.setattr(outputs, "_COUNTER", itertools.count(1000))
    planted = out / f"{TMP_PREFIX}{os.getpid()}-1000.json"
    planted.symlink_to(victim)
    outputs.write_text_atomic(out / "notes.json", "{}")
    assert victim.read_bytes() == before[0] and (out / "notes.json").read_text() == "{}"


# ------------------------------------------------------------------------------ 7: disk full, read-only OUT
def test_a_full_disk_leaves_no_output_of_a_failed_case_and_the_report_elsewhere(tmp_path, unet_root, monkeypatch,
                                                                                 capsys):
    """Item 7 (disk full): the disk fills just as case a's record is written (its outputs fitted): a fails and
    its renamed outputs are removed, b fails, and the report goes to a temporary folder named in one line on
    stderr, exit status 3."""
    scans, out, spare = tmp_path / "scans", tmp_path / "out", tmp_path / "reference"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    save_nifti(scans / "b.nii.gz", volume(2))
    settings = {"qc": True, "parallel_cases": 1}
    batch(scans, spare, unet_root, **settings)
    fits = sum((spare / name).stat().st_size for name in ("a_seg.nii.gz", "a_qc.png"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    FakeDisk(monkeypatch, out, budget=fits)

    status, _ = batch_exits(scans, out, unet_root, **settings)
    assert status == 3
    assert not [p.name for p in out.iterdir() if not p.name.startswith(".")]  # no output, no report in OUT
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the report cannot be written there (No space left on device)" in err[0], err
    folder = re.search(r"the report is in (\S+);", err[0]).group(1)
    report = json.loads((Path(folder) / "report.json").read_text())
    assert Path(folder).parent == tmp_path and (Path(folder) / "report.csv").is_file()
    assert report["summary"]["report_dir"] == folder and "No space left" in report["summary"]["report_error"]
    for case in report["cases"]:
        assert case["status"] == "failed" and "No space left on device" in case["reason"], case


def test_a_read_only_output_folder_still_gives_a_report_and_an_exit_status(tmp_path, unet_root, monkeypatch,
                                                                            capsys):
    """Item 7 (read-only OUT, in-process so that it holds as root): every case fails with the reason, the report
    is written to a temporary folder named on stderr, exit status 3; nothing is written in OUT."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    save_nifti(scans / "b.nii.gz", volume(2))
    batch(scans, out, unet_root)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    FakeDisk(monkeypatch, out, read_only=True)

    status, _ = batch_exits(scans, out, unet_root, overwrite=True)
    assert status == 3
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and "exit status 3" in err[0], err
    assert "report.json is an earlier run's" in err[0]
    report = json.loads((Path(re.search(r"the report is in (\S+);", err[0]).group(1)) / "report.json").read_text())
    assert [(c["case"], c["status"]) for c in report["cases"]] == [("a", "failed"), ("b", "failed")]
    assert all("Read-only file system" in c["reason"] for c in report["cases"])


def test_a_case_whose_write_fails_midway_keeps_none_of_its_outputs(tmp_path, unet_root, monkeypatch):
    """Item 7: a rename that fails after the first output was renamed into place (a full directory): the case
    fails and the output already renamed is removed; an earlier run's outputs of a failed case are removed too."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    batch(scans, out, unet_root)
    replace = os.replace

    def full_directory(src, dst, **kwargs):
        if str(dst).endswith("_qc.png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", full_directory)
    (case,) = batch(scans, out, unet_root, qc=True, overwrite=True)["cases"]
    assert case["status"] == "failed" and "No space left on device" in case["reason"]
    assert not (out / "a_seg.nii.gz").exists() and not (out / "a_qc.png").exists()
    assert not list(out.glob(f"{TMP_PREFIX}*"))


# --------------------------------------------------------------------------- 8: outputs checked on resume
def test_truncated_changed_or_swapped_outputs_are_redone_on_resume(tmp_path, unet_root):
    """Item 8: the record holds each output's size and SHA-256: an output truncated to 100 bytes, one changed in
    place (same size, times restored) and two outputs swapped are redone; the intact one is skipped."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for i, name in enumerate("abcde"):
        save_nifti(scans / f"{name}.nii.gz", volume(i, (16, 20, 12 + i)))
    batch(scans, out, unet_root)
    good = {n: (out / f"{n}_seg.nii.gz").read_bytes() for n in "abcde"}
    record = json.loads(next(p for p in (out / ".batch").glob("*.json")
                             if json.loads(p.read_text())["case"] == "a").read_text())
    assert record["outputs"]["pred"]["sha256"] == hashlib.sha256(good["a"]).hexdigest()
    assert record["outputs"]["pred"]["size"] == len(good["a"])

    with open(out / "a_seg.nii.gz", "r+b") as f:
        f.truncate(100)
    changed = out / "b_seg.nii.gz"
    times = changed.stat()
    raw = bytearray(good["b"])
    raw[-5] ^= 0xFF
    changed.write_bytes(bytes(raw))
    os.utime(changed, ns=(times.st_atime_ns, times.st_mtime_ns))
    os.rename(out / "c_seg.nii.gz", tmp_path / "swap")
    os.rename(out / "d_seg.nii.gz", out / "c_seg.nii.gz")
    os.rename(tmp_path / "swap", out / "d_seg.nii.gz")

    cases = {c["case"]: c["status"] for c in batch(scans, out, unet_root)["cases"]}
    assert cases == {"a": "succeeded", "b": "succeeded", "c": "succeeded", "d": "succeeded", "e": "skipped"}
    assert {n: (out / f"{n}_seg.nii.gz").read_bytes() for n in "abcde"} == good


# ---------------------------------------------------------------------------------------- 9: CSV formulas
def test_case_names_that_look_like_formulas_are_neutralised_in_the_csv_only(tmp_path, unet_root):
    """Item 9: names starting with ``=``, ``+``, ``-`` and ``@`` reach report.csv prefixed with ``'`` (so that a
    spreadsheet shows them as text) and report.json as they are."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    names = ["=1+2", "+cmd", "-2+3", "@SUM(A1)", "plain"]
    for name in names:
        save_nifti(scans / f"{name}.nii.gz")
    (scans / "=HYPERLINK(x).txt").write_text("not an image")
    report = batch(scans, out, unet_root)
    assert sorted(c["case"] for c in report["cases"]) == sorted(names)
    with open(out / "report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows if r["status"] == "succeeded") == sorted(
        ["'=1+2", "'+cmd", "'-2+3", "'@SUM(A1)", "plain"])
    for row in rows:
        assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r")) for v in row.values() if v), row


# ----------------------------------------------------------------------- 10: a SEG that cannot be made
@pytest.fixture
def dicom_seg_scans(tmp_path) -> Path:
    """A folder with an MR series and a NIfTI."""
    pytest.importorskip("highdicom")

    scans = tmp_path / "scans"
    write_mr_series(scans / "series", volume(4, (20, 16, 8)) * 100, (0.9, 0.8, 1.5), (-5.0, 3.0, 4.0), AXIAL)
    save_nifti(scans / "plain.nii.gz")
    return scans


def _strip_patient_and_study(folder: Path) -> None:
    import pydicom

    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PatientID
        del ds.StudyInstanceUID
        ds.save_as(path)


def test_a_dicom_seg_that_cannot_be_made_fails_only_the_seg(dicom_seg_scans, tmp_path, unet_root):
    """Item 10: a series without PatientID and StudyInstanceUID: its NIfTI is written, the case is ``partial``
    with the SEG's problem, its earlier SEG is removed, exit status 2 unless ``dicom_seg_required`` is false; a
    rerun does the case again (it is incomplete without its SEG)."""
    out = tmp_path / "out"
    assert batch_exits(dicom_seg_scans, out, unet_root, dicom_seg=True)[0] == 0
    assert (out / "series_seg.dcm").is_file()

    _strip_patient_and_study(dicom_seg_scans / "series")
    status, _ = batch_exits(dicom_seg_scans, out, unet_root, dicom_seg=True)
    assert status == 2
    report = json.loads((out / "report.json").read_text())
    cases = by_input(report)
    series = cases["series"]
    assert series["status"] == "partial" and series["reason"].startswith("series: the DICOM SEG was not written (")
    assert series["outputs"] == {"pred": str(out / "series_seg.nii.gz")} and series["output"]
    assert (out / "series_seg.nii.gz").is_file() and not (out / "series_seg.dcm").exists()
    assert cases["plain.nii.gz"]["status"] == "skipped" and report["summary"]["partial"] == 1
    with open(out / "report.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["case"] == "series")
    assert row["status"] == "partial" and row["dicom_seg"] == "" and row["output"]

    status, report = batch_exits(dicom_seg_scans, out, unet_root, dicom_seg=True, dicom_seg_required=False)
    assert status == 0 and by_input(report)["series"]["status"] == "partial"


def test_a_seg_writer_that_cannot_even_start_fails_only_the_seg(dicom_seg_scans, tmp_path, unet_root,
                                                                monkeypatch):
    """Item 10: any exception of the SEG writer, also while it is made from the labels, fails only the SEG."""
    import bundletools.dicomseg

    def broken(*args, **kwargs):
        raise AttributeError("'Dataset' object has no attribute 'PatientID'")

    monkeypatch.setattr(bundletools.dicomseg, "segmentation_writer", broken)
    cases = by_input(batch(dicom_seg_scans, tmp_path / "out", unet_root, dicom_seg=True))
    assert cases["series"]["status"] == "partial" and "AttributeError" in cases["series"]["reason"]
    assert (tmp_path / "out" / "series_seg.nii.gz").is_file()


# ---------------------------------------------------------------------- 11: max_voxels after resampling
def test_max_voxels_applies_to_the_resampled_volume_before_it_is_made(tmp_path, unet_root):
    """Item 11: a 16 KB file of 16³ voxels of 50 mm would become 751³ at the bundle's 1 mm: it fails at once,
    naming the resampled size (with the default max_voxels); 40 mm voxels fail against a lower max_voxels; the
    CSAM bundle keeps the slice spacing (``pixdim`` 0), so a thick-slice scan is not blown up there."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "huge_voxels.nii", volume(0, (16, 16, 16)), np.diag([50.0, 50.0, 50.0, 1.0]))
    save_nifti(scans / "coarse.nii.gz", volume(1, (16, 16, 16)), np.diag([40.0, 40.0, 40.0, 1.0]))
    save_nifti(scans / "normal.nii.gz")
    assert (scans / "huge_voxels.nii").stat().st_size < 17000
    cases = by_input(batch(scans, out, unet_root, max_voxels=100_000_000))
    assert cases["normal.nii.gz"]["status"] == "succeeded"
    for name, mm, size in (("huge_voxels.nii", 50, "751x751x751 = 4.24e+08"),
                           ("coarse.nii.gz", 40, "601x601x601 = 2.17e+08")):
        assert cases[name]["status"] == "failed"
        assert (f"{name}: its 16x16x16 voxels of {mm}x{mm}x{mm} mm, resampled to the bundle's pixdim (1x1x1 mm), "
                f"would be {size} voxels, more than max_voxels=1e+08; it was not read") in cases[name]["reason"]
    (scans / "coarse.nii.gz").unlink()  # within the default max_voxels: it would be resampled
    default = by_input(batch(scans, tmp_path / "default", unet_root))
    assert default["huge_voxels.nii"]["status"] == "failed" and "751x751x751" in default["huge_voxels.nii"]["reason"]

    from bundletools.images import ImageHeader, resampled_shape

    thick = ImageHeader((16, 16, 16), np.diag([1.0, 40.0, 1.0, 1.0]))  # the slice axis is y
    assert resampled_shape(thick, (1.0, 1.0, 0.0), slice_axis_last=True) == (16, 16, 16)  # CSAM
    assert resampled_shape(thick, (1.0, 1.0, 1.0)) == (16, 601, 16)
    parser = ConfigParser()
    parser.read_config(BUNDLES / "csam_unet_segmentation" / "configs" / "inference.json")
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(scans), "output_dir": str(tmp_path / "csam")})
    limits = parser.get_parsed_content("evaluator").input_limits
    assert limits.pixdim == (1.0, 1.0, 0.0) and limits.slice_axis_last


# ------------------------------------------------------------------- 12: bad values of real keys, one line
@pytest.fixture
def infer_here(monkeypatch, tmp_path, capsys):
    """``python -m bundletools.infer`` run in this process for real; returns (exit status, stderr). The bundle's
    logging configuration is left out: it would replace pytest's log capture."""
    import monai.bundle.workflows

    from bundletools.infer import main

    monkeypatch.setattr(monai.bundle.workflows, "fileConfig", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)

    def infer(*args) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        return exit_info.value.code, capsys.readouterr().err

    yield infer
    logging.captureWarnings(False)  # main routes warnings to the log for the rest of its process


def _bad_values(tmp_path: Path, unet_root: Path) -> list[tuple[list, str]]:
    """Bad values of real keys, each with what its one line must say."""
    model = (unet_root / "models" / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(model[: len(model) // 2])
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "junk.onnx").write_text("not a model")
    return [
        (["--parallel_cases", "0"], r"parallel_cases must be a positive whole number, got 0"),
        (["--runtime", "tensorrt"], r"runtime must be one of torch, onnxruntime, got 'tensorrt'"),
        (["--runtime", "onnxruntime", "--onnx_path", tmp_path / "junk.onnx"],
         r"junk\.onnx: onnx_path is not an ONNX model ONNX Runtime can load"),
        (["--onnx_path", tmp_path / "junk.onnx"], r"onnx_path is given .* but the runtime is 'torch'"),
        (["--ckpt_path", tmp_path / "truncated.pt"], r"truncated\.pt: cannot load the model weights \(ckpt_path\)"),
        (["--ckpt_path", tmp_path / "garbage.pt"], r"garbage\.pt: cannot load the model weights \(ckpt_path\)"),
        (["--series_rules", '{"Modalty": ["MR"]}'], r"series_rules: unknown rule 'Modalty'; the rules are Modality"),
        (["--series_rules", '{"min_slices": -1}'], r"series_rules: min_slices takes a whole number \(0 or more\)"),
    ]


def test_bad_values_of_real_keys_are_one_line_naming_them_exit_1(infer_here, tmp_path, unet_root, caplog):
    """Item 12 (``python -m bundletools.infer``): ``--parallel_cases 0``, ``--runtime tensorrt``, a junk
    ``--onnx_path``, a truncated or garbage ``model.pt``: one line on stderr naming the key or the file, exit
    status 1, the traceback at DEBUG level only."""
    pytest.importorskip("onnxruntime")
    scans = tmp_path / "scans"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    caplog.set_level(logging.DEBUG, logger="bundletools.infer")
    for args, message in _bad_values(tmp_path, unet_root):
        caplog.clear()
        status, err = infer_here(UNET, scans, tmp_path / "out", "--bundle_root", unet_root, "--num_workers", "0",
                                 *args)
        lines = err.strip().splitlines()
        assert status == 1 and len(lines) == 1 and re.search(message, lines[0]), (args, err[-3000:])
        assert any(r.exc_info and r.levelno == logging.DEBUG for r in caplog.records), args
    assert not (tmp_path / "out" / "a_seg.nii.gz").exists()


@pytest.mark.slow
def test_bad_values_of_real_keys_are_one_line_from_monai_bundle_run_too(tmp_path, unet_root):
    """Item 12 (``python -m monai.bundle run``): the same bad values end stderr with one line naming them, with
    no traceback, exit status 1 (MONAI's own warnings may come before it). Needs bundletools' handler of
    uncaught user errors (issue 24, items 6/14)."""
    pytest.importorskip("onnxruntime")
    scans = tmp_path / "scans"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    for args, message in _bad_values(tmp_path, unet_root):
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                               str(BUNDLES / UNET / "configs" / "inference.json"), "--dataset_dir", str(scans),
                               "--output_dir", str(tmp_path / "out"), "--bundle_root", str(unet_root),
                               "--num_workers", "0", *map(str, args)], cwd=tmp_path, env=subprocess_env(),
                              capture_output=True, text=True, errors="replace", timeout=600)
        last = proc.stderr.strip().splitlines()[-1:]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])
        assert last and re.search(message, last[0]), (args, proc.stderr[-3000:])


# --------------------------------------------------------------------------- 13: OUT gone during the run
class _OnLogLine(logging.Handler):
    """Does ``action`` once, when the runner logs a line holding ``text`` (as an operator acting at that moment)."""

    def __init__(self, text: str, action) -> None:
        super().__init__()
        self.text, self.action, self.done = text, action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.done and self.text in record.getMessage():
            self.done = True
            self.action()


def _run_while(scans: Path, out: Path, root: Path, text: str, action, caplog) -> int:
    caplog.set_level(logging.INFO, logger="bundletools.batch")
    handler = _OnLogLine(text, action)
    logging.getLogger("bundletools.batch").addHandler(handler)
    try:
        status, _ = batch_exits(scans, out, root)
    finally:
        logging.getLogger("bundletools.batch").removeHandler(handler)
    assert handler.done
    return status


@pytest.mark.parametrize("what", ["removed", "replaced"])
def test_an_output_folder_removed_or_replaced_during_the_run_fails_it(tmp_path, unet_root, monkeypatch, capsys,
                                                                      caplog, what):
    """Item 13: OUT removed (or replaced by a new empty folder) after the last case was written: exit status 3,
    one line on stderr naming the problem and where the report is; every case is reported failed, its outputs
    lost; nothing is written into the new folder."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    save_nifti(scans / "b.nii.gz", volume(2))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def remove() -> None:
        shutil.rmtree(out)
        if what == "replaced":
            out.mkdir()

    assert _run_while(scans, out, unet_root, "[2/2]", remove, caplog) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the output folder was {what} during the run" in err[0], err
    report = json.loads((Path(re.search(r"the report is in (\S+);", err[0]).group(1)) / "report.json").read_text())
    for case in report["cases"]:
        assert case["status"] == "failed" and "its outputs are lost" in case["reason"] and not case["outputs"]
    assert not out.exists() or not list(out.iterdir())


def test_an_output_removed_during_the_run_fails_its_case(tmp_path, unet_root, caplog):
    """Item 13: an output removed before the report is written: its case is reported failed (not succeeded with
    an output that is not there), exit status 2."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    save_nifti(scans / "b.nii.gz", volume(2))
    assert _run_while(scans, out, unet_root, "[2/2]", lambda: (out / "a_seg.nii.gz").unlink(), caplog) == 2
    cases = by_input(json.loads((out / "report.json").read_text()))
    assert cases["a.nii.gz"]["status"] == "failed" and "a_seg.nii.gz no longer there" in cases["a.nii.gz"]["reason"]
    assert cases["b.nii.gz"]["status"] == "succeeded"


def test_relative_folders_survive_itk_changing_the_working_directory(tmp_path, unet_root, monkeypatch):
    """ITK changes the process's working directory for a moment whenever it loads one of its modules (in whichever
    thread first needs it); with relative IN and OUT, a NIfTI case written meanwhile landed elsewhere and failed
    as "the output folder was removed during the run". Paths are made absolute first."""
    monkeypatch.chdir(tmp_path)
    scans = Path("scans")
    scans.mkdir()
    save_nifti(scans / "a.nii.gz")
    write_dicom_series(scans / "series", volume(2, (6, 18, 22)) * 100, (0.8, 0.7, 2.0), (0.0, 0.0, 0.0), IDENTITY,
                       "1.2.826.0.1.3680043.2.1125.14.9")
    report = batch(scans, Path("out"), unet_root, num_workers=0)
    assert {c["case"]: c["status"] for c in report["cases"]} == {"a": "succeeded", "series": "succeeded"}, report
    assert (tmp_path / "out" / "a_seg.nii.gz").is_file() and (tmp_path / "out" / "series_seg.nii.gz").is_file()
