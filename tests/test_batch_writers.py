# SPDX-License-Identifier: Apache-2.0
"""A new output format for the batch runner is one module, one registry line and one config entry (README,
"Adding an output format"): the writer of that walkthrough, registered here, is declared in a bundle's
``outputs``, written, skipped on resume and reported like the segmentation. Also: what the flags of the QC
picture and the DICOM SEG switch on, and a writer that is not declared right."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundletools.writers import WRITERS, Writer, declare_outputs
from tests.utils import BUNDLES, UNET, random_model

PREPARED: list[str] = []  # model SHA-256 of each VolumesWriter.prepare call


class VolumesWriter(Writer):
    """``<case>_volumes.json``: the volume of each label in mL, named from the bundle's metadata.json."""

    ext = ".json"

    def __init__(self, key: str = "pred") -> None:
        super().__init__(key)
        self.names: dict[int, str] = {}

    def prepare(self, run) -> None:
        channels = run.metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        self.names = {int(value): name for value, name in channels.items() if int(value)}
        PREPARED.append(run.model_sha256)

    def write(self, case, source):
        labels = self.value(case)
        millilitres = abs(np.linalg.det(np.asarray(labels.meta["affine"])[:3, :3])) / 1000
        array = labels.cpu().numpy()
        volumes = {name: float((array == value).sum() * millilitres) for value, name in self.names.items()}
        return lambda path: path.write_text(json.dumps(volumes))


@pytest.fixture
def volumes(monkeypatch) -> None:
    """The registry line of the walkthrough."""
    monkeypatch.setitem(WRITERS, "volumes", f"{__name__}.VolumesWriter")
    PREPARED.clear()


def _batch(scans: Path, out: Path, root: Path, **overrides) -> dict:
    parser = ConfigParser()
    parser.read_config(BUNDLES / UNET / "configs" / "inference.json")
    parser.read_meta(BUNDLES / UNET / "configs" / "metadata.json")
    parser.update({"bundle_root": str(root), "dataset_dir": str(scans), "output_dir": str(out), "num_workers": 0,
                   **overrides})
    return parser.get_parsed_content("evaluator").run()


def test_a_new_output_format_is_written_skipped_and_reported(volumes, tmp_path):
    root = random_model(UNET, tmp_path / "root")
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    rng = np.random.default_rng(0)
    for name, spacing in (("a", 1.0), ("b", 2.0)):
        nib.save(nib.Nifti1Image(rng.normal(size=(16, 20, 12)).astype(np.float32), np.diag([spacing] * 3 + [1])),
                 scans / f"{name}.nii.gz")
    entry = {"outputs#volumes": {"writer": "volumes", "key": "pred", "postfix": "volumes"}}  # the config entry

    report = _batch(scans, out, root, **entry)
    assert [c["status"] for c in report["cases"]] == ["succeeded", "succeeded"]
    assert len(PREPARED) == 1  # once per run, before the cases
    for case, spacing in (("a", 1.0), ("b", 2.0)):
        labels = np.asarray(nib.load(out / f"{case}_seg.nii.gz").dataobj)
        got = json.loads((out / f"{case}_volumes.json").read_text())
        assert got == {name: pytest.approx((labels == value).sum() * spacing**3 / 1000)
                       for value, name in ((1, "anterior"), (2, "posterior"))}
    record = report["cases"][0]
    assert record["outputs"] == {"pred": str(out / "a_seg.nii.gz"), "volumes": str(out / "a_volumes.json")}
    assert report["run"]["settings"]["outputs"]["volumes"] == {
        "writer": "volumes", "key": "pred", "postfix": "volumes", "ext": ".json", "enabled": True, "required": True}
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["volumes"] for r in rows] == [str(out / "a_volumes.json"), str(out / "b_volumes.json")]

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*_*.*")}
    (out / "b_volumes.json").unlink()  # a case is complete only with every declared output
    report = _batch(scans, out, root, **entry)
    assert [c["status"] for c in report["cases"]] == ["skipped", "succeeded"]
    assert (out / "b_volumes.json").is_file() and len(PREPARED) == 2
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items() if name.startswith("a_"))

    report = _batch(scans, out, root)  # not declared: the cases are complete without it
    assert [c["status"] for c in report["cases"]] == ["skipped", "skipped"]
    assert "volumes" not in report["cases"][0]["outputs"]


def test_flags_only_enable_declared_outputs():
    parser = ConfigParser()
    parser.read_config(BUNDLES / UNET / "configs" / "inference.json")
    outputs = parser.get_parsed_content("outputs")
    assert list(declare_outputs(outputs)) == ["pred"]
    parser.update({"qc": "true", "dicom_seg": True, "dicom_seg_required": "false"})  # as the command lines pass them
    declared = declare_outputs(parser.get_parsed_content("outputs"))
    assert {name: (output.suffix, output.writer.optional, output.required) for name, output in declared.items()} == {
        "pred": ("_seg.nii.gz", False, True), "qc": ("_qc.png", False, True), "dicom_seg": ("_seg.dcm", True, False)}
    assert [(output.writer.key, type(output.writer).__name__) for output in declared.values()] == [
        ("pred", "ImageWriter"), ("pred", "QCWriter"), ("pred", "DicomSegWriter")]


@pytest.mark.parametrize("outputs, message", [
    ({"pred": {"dtype": "uint8"}}, r"output 'pred' needs a 'postfix' \(the file name is <case>_<postfix>\.nii\.gz\)"),
    ({"pred": {"writer": "nrrd", "postfix": "seg"}}, r"output 'pred': unknown writer 'nrrd'; writers: \["),
    ({"pred": {"postfix": "seg", "dtype": "uint9"}}, r"output 'pred': data type 'uint9' not understood"),
    ({"pred": {"postfix": "seg", "colour": "red"}}, r"output 'pred': .*'colour'"),
    ({"pred": {"postfix": "seg", "enabled": "maybe"}}, r"outputs#pred#enabled must be true or false, got 'maybe'"),
])
def test_a_bad_declaration_is_a_one_line_error_naming_the_output(outputs, message):
    with pytest.raises(ValueError, match=message):
        declare_outputs(outputs)
