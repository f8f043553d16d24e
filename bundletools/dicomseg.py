# SPDX-License-Identifier: Apache-2.0
"""DICOM Segmentation objects (DICOM SEG) of label volumes segmented from a DICOM series, built with highdicom.

A PACS and the radiologist's viewer take DICOM, not NIfTI. :func:`build_segmentation` turns a label volume on the
grid of a source series (as the batch runner writes it to ``<case>_seg.nii.gz``: the array in ITK's index order
with its RAS affine) into a SEG instance that

- references the source series: the same Study Instance UID, Frame of Reference UID and patient, and for every
  frame the SOP Instance UID of the source slice it lies on, or of a multi-frame source with the number of the
  frame it lies on (Derivation Image and Referenced Series sequences); a source lacking one of these UIDs gets no
  SEG (a ValueError names what is missing), a source lacking patient or study attributes that DICOM lets be
  empty gets them empty;
- has one segment per label, named from the bundle's ``metadata.json`` (``outputs.pred.channel_def``), with coded
  anatomy (:data:`SEGMENT_CODES`; SNOMED CT codes, a generic "Tissue" for names it does not know);
- identifies the algorithm: the bundle's name and version, and the SHA-256 of the model file;
- is on the source's exact voxel grid: each frame is the label plane that coincides with one source slice, found
  from the DICOM geometry (position, orientation, spacing) and the label volume's affine, never resampled. A label
  volume on any other grid is an error.

:class:`DicomSegWriter` is the batch runner's writer of them (``"writer": "dicom_seg"`` in a config's ``outputs``).
highdicom is an install extra (``pip install 'monai-segmentation-bundles[dicom]'``).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .images import DicomPlane, SeriesPath, dicom_planes
from .outputs import BatchError
from .report import printable
from .writers import RunContext, Writer

__all__ = ["AlgorithmInfo", "DicomSegWriter", "SEGMENT_CODES", "build_segmentation", "file_sha256", "is_dicom_series",
           "labels_on_source_frames", "read_series", "segment_names", "segmentation_writer", "write_segmentation"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GRID_TOLERANCE = 1e-2  # voxels: DICOM decimal strings carry positions to about 1e-5 mm
# attributes of the source a SEG copies or references (PS3.3: Patient, General Study, General Series, SOP Common,
# Frame of Reference, Image Pixel modules): type 1 must have a value, type 2 must be present and may be empty
_SOURCE_TYPE_1 = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
                  "Rows", "Columns")
_SOURCE_TYPE_2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                  "AccessionNumber", "ReferringPhysicianName")

# label name (lower case) -> (category, type, type modifier or None) as (SNOMED CT code, meaning) pairs
SEGMENT_CODES: dict[str, tuple[tuple[str, str], tuple[str, str], tuple[str, str] | None]] = {
    "anterior": (("91723000", "Anatomical Structure"), ("5366008", "Hippocampus"), ("255549009", "Anterior")),
    "posterior": (("91723000", "Anatomical Structure"), ("5366008", "Hippocampus"), ("255551008", "Posterior")),
    "necrosis": (("49755003", "Morphologically Abnormal Structure"), ("6574001", "Necrosis"), None),
    "edema": (("49755003", "Morphologically Abnormal Structure"), ("79654002", "Edema"), None),
    "non-enhancing": (("49755003", "Morphologically Abnormal Structure"), ("108369006", "Neoplasm"), None),
    "enhancing": (("49755003", "Morphologically Abnormal Structure"), ("108369006", "Neoplasm"), None),
}
_GENERIC = (("85756007", "Tissue"), ("85756007", "Tissue"), None)


def _highdicom():
    try:
        import highdicom
        import pydicom
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("DICOM SEG output needs highdicom and pydicom: pip install "
                          "'monai-segmentation-bundles[dicom]'") from e
    return highdicom, pydicom


@dataclass(frozen=True)
class AlgorithmInfo:
    """What made the segmentation: bundle name, bundle version, SHA-256 of the model file."""

    name: str
    version: str
    model_sha256: str
    parameters: Mapping[str, str] = field(default_factory=dict)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def segment_names(metadata: Mapping[str, Any] | str | os.PathLike, output: str = "pred") -> dict[int, str]:
    """``{label value: name}`` of every label but 0, from a bundle's ``metadata.json`` (or its content):
    ``network_data_format.outputs.<output>.channel_def``."""
    if not isinstance(metadata, Mapping):
        import json

        path = Path(metadata)
        metadata = json.loads(path.read_text(encoding="utf-8"))
    try:
        channel_def = metadata["network_data_format"]["outputs"][output]["channel_def"]
    except KeyError as e:
        raise ValueError(f"bundle metadata has no network_data_format.outputs.{output}.channel_def") from e
    names = {int(k): str(v) for k, v in channel_def.items() if int(k) != 0}
    if not names:
        raise ValueError(f"network_data_format.outputs.{output}.channel_def names no label other than 0")
    return dict(sorted(names.items()))


def read_series(folder: str | os.PathLike) -> list:
    """The headers (no pixel data) of the DICOM files of a series folder (or of a
    :class:`~bundletools.images.SeriesPath`'s series): its slices sorted along the slice normal, or its one
    multi-frame file."""
    _, pydicom = _highdicom()
    from .data import is_dicom_file

    if isinstance(folder, SeriesPath):
        files = [Path(f) for f in folder.files]
    else:
        files = sorted(f for f in Path(folder).iterdir()
                       if f.is_file() and not f.name.startswith(".") and is_dicom_file(f))
    if not files:
        raise ValueError(f"{folder}: no DICOM files")
    # force: slices without the 128-byte preamble and "DICM", which GDCM reads and is_dicom_file accepts
    datasets = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
    series = {ds.get("SeriesInstanceUID") for ds in datasets}
    if len(series) != 1:
        raise ValueError(f"{folder}: holds {len(series)} DICOM series; a SEG references exactly one")
    planes = [dicom_planes(ds) for ds in datasets]  # each slice's or frame's geometry, or the file that lacks it
    if len(datasets) > 1 and max(map(len, planes)) > 1:
        raise ValueError(f"{folder}: a multi-frame file among {len(datasets)} files; a SEG references one "
                         "multi-frame file or the slices of a series")
    normal = np.cross(*planes[0][0].orientation)
    order = sorted(range(len(datasets)), key=lambda n: float(np.dot(normal, planes[n][0].position)))
    return [datasets[n] for n in order]


def _frame_to_voxel(plane: DicomPlane, affine: np.ndarray) -> np.ndarray:
    """4x4 matrix from (column, row, 0, 1) of the source plane to the label volume's voxel index."""
    row_dir, col_dir = plane.orientation
    row_spacing, col_spacing = plane.pixel_spacing  # between rows, between columns
    frame = np.eye(4)
    frame[:3, 0] = row_dir * col_spacing  # along a row: the column index grows
    frame[:3, 1] = col_dir * row_spacing
    frame[:3, 2] = np.cross(row_dir, col_dir)
    frame[:3, 3] = plane.position
    return np.linalg.inv(affine) @ LPS_TO_RAS @ frame


def labels_on_source_frames(labels: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """The label plane under each source plane, as ``(planes, rows, columns)``: under each slice in the order of
    ``datasets``, or under each frame of a multi-frame source in the order of its frames.

    Args:
        labels: 3D integer labels.
        affine: voxel index -> RAS world (mm) of ``labels``.
        datasets: the source slices' headers, or the one header of a multi-frame source.

    Raises:
        ValueError: when a source plane is not a plane of the label volume's grid (another spacing, orientation,
            an offset of a fraction of a voxel, or outside the volume): the labels are not on the source's grid.
    """
    labels, affine = np.asarray(labels), np.asarray(affine, dtype=np.float64)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    sources = [(ds, plane) for ds in datasets for plane in dicom_planes(ds)]
    frames = np.zeros((len(sources), rows, columns), dtype=labels.dtype)
    for n, (ds, plane) in enumerate(sources):
        to_voxel = _frame_to_voxel(plane, affine)
        steps, origin = to_voxel[:3, :2], to_voxel[:3, 3]
        on_grid = (np.allclose(steps, np.round(steps), atol=_GRID_TOLERANCE)
                   and np.allclose(np.abs(np.round(steps)).sum(axis=0), 1) and np.abs(np.round(steps)).max() == 1
                   and np.allclose(origin, np.round(origin), atol=_GRID_TOLERANCE))
        if on_grid:
            r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
            pixels = np.stack([c.ravel(), r.ravel()])
            index = np.round(steps).astype(int) @ pixels + np.round(origin).astype(int)[:, None]
            on_grid = bool(np.all(index >= 0) and np.all(index < np.array(labels.shape)[:, None]))
        if not on_grid:
            frame = "" if plane.frame is None else f" frame {plane.frame}"
            raise ValueError(f"source slice {ds.SOPInstanceUID}{frame} (position {plane.position.tolist()}) is not a "
                             f"plane of the labels' voxel grid (shape {labels.shape}); the labels must be on the "
                             "source series' exact grid")
        frames[n] = labels[tuple(index)].reshape(rows, columns)
    return frames


def _complete_source(datasets: Sequence) -> list:
    """The source headers with what a SEG copies from them. A ValueError naming the series when an attribute that
    must have a value (type 1) is missing; those that may be empty (type 2) are added empty where missing, and a
    missing or empty SliceThickness of single-frame slices (type 2 in CT and MR images, needed in the SEG's pixel
    measures) becomes the distance between the slices, the thickness of the label planes."""
    first = datasets[0]
    series = Path(first.filename).parent if getattr(first, "filename", None) else first.get("SeriesInstanceUID")
    missing = [k for k in _SOURCE_TYPE_1 if any(k not in ds or ds[k].value in (None, "") for ds in datasets)]
    if missing:
        raise ValueError(f"{series}: its slices lack {', '.join(missing)} (type 1); a SEG belongs to the study of its "
                         "source and references its series, frame of reference and instances, so none is made")
    fill: dict[str, Any] = {k: "" for k in _SOURCE_TYPE_2 if k not in first}
    if "PerFrameFunctionalGroupsSequence" in first:
        measures = (first.get("SharedFunctionalGroupsSequence") or [{}])[0].get("PixelMeasuresSequence") or [{}]
        if "PixelSpacing" not in measures[0]:
            raise ValueError(f"{series}: its frames' pixel spacing is not in the shared functional groups, where "
                             "highdicom takes it from for a SEG; none is made")
    elif first.get("SliceThickness") in (None, ""):
        along = sorted(float(np.dot(np.cross(*p.orientation), p.position)) for ds in datasets for p in dicom_planes(ds))
        if len(along) < 2:
            raise ValueError(f"{series}: one slice without SliceThickness; a SEG needs the thickness of its planes")
        fill["SliceThickness"] = f"{float(np.median(np.diff(along))):.6g}"
    if not fill:
        return list(datasets)
    first = copy.deepcopy(first)  # highdicom takes the patient, study and pixel measures from the first header
    for keyword, value in fill.items():
        setattr(first, keyword, value)
    return [first, *datasets[1:]]


def _code(highdicom, value: tuple[str, str]):
    return highdicom.sr.CodedConcept(value=value[0], scheme_designator="SCT", meaning=value[1])


def build_segmentation(
    datasets: Sequence,
    labels: np.ndarray,
    affine: np.ndarray,
    names: Mapping[int, str],
    algorithm: AlgorithmInfo,
    series_number: int = 300,
    series_description: str | None = None,
    codes: Mapping[str, tuple] | None = None,
):
    """A ``highdicom.seg.Segmentation`` (BINARY, one segment per label of ``names``) of ``labels`` over the
    source slices ``datasets``.

    Args:
        datasets: headers of the source series' slices, or the one header of a multi-frame source
            (:func:`read_series`); pixel data is not needed.
        labels: 3D integer labels on the series' grid, in any axis order that ``affine`` describes (e.g. the
            batch runner's output: ITK index order).
        affine: voxel index -> RAS world (mm) of ``labels``.
        names: ``{label value: segment label}``; every value in ``labels`` other than 0 must be one of them.
        algorithm: bundle name and version, model checksum.
        series_number: Series Number of the SEG.
        series_description: Series Description of the SEG (default: ``"<bundle> segmentation"``).
        codes: per lower-case name ``(category, type, modifier)``, overriding :data:`SEGMENT_CODES`.

    Raises:
        ValueError: the source lacks an attribute that a SEG copies and DICOM requires a value of (Study, Series
            and SOP Instance UIDs, SOP Class, Frame of Reference, Rows, Columns; naming them and the series), the
            labels are not on the source's grid, or hold a value ``names`` lacks.
    """
    highdicom, _ = _highdicom()
    from pydicom import Dataset
    from pydicom.sr.codedict import codes as dcm_codes

    datasets = _complete_source(datasets)
    frames = labels_on_source_frames(labels, affine, datasets)
    values = sorted(int(v) for v in np.unique(frames) if v != 0)
    unknown = [v for v in values if v not in names]
    if unknown:
        raise ValueError(f"labels hold values {unknown} that the bundle's channel_def does not name ({dict(names)})")
    numbers = sorted(names)  # segment numbers must run from 1 without gaps; map label values onto them
    segment_of = {value: i + 1 for i, value in enumerate(numbers)}
    pixel = np.zeros(frames.shape, dtype=np.uint16 if len(numbers) > 255 else np.uint8)
    for value, number in segment_of.items():
        pixel[frames == value] = number

    table = {**SEGMENT_CODES, **{k.lower(): v for k, v in (codes or {}).items()}}
    identification = highdicom.AlgorithmIdentificationSequence(
        name=algorithm.name, family=dcm_codes.cid7162.ArtificialIntelligence, version=algorithm.version,
        source="monai-segmentation-bundles",
        parameters={"model_sha256": algorithm.model_sha256, **dict(algorithm.parameters)})
    descriptions = []
    for value in numbers:
        category, kind, modifier = table.get(names[value].lower(), _GENERIC)
        description = highdicom.seg.SegmentDescription(
            segment_number=segment_of[value], segment_label=names[value],
            segmented_property_category=_code(highdicom, category), segmented_property_type=_code(highdicom, kind),
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification, tracking_uid=highdicom.UID(), tracking_id=names[value])
        if modifier is not None:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = modifier[0], "SCT", modifier[1]
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [item]
        descriptions.append(description)

    segmentation = highdicom.seg.Segmentation(
        source_images=list(datasets), pixel_array=pixel,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=highdicom.UID(), series_number=series_number, sop_instance_uid=highdicom.UID(),
        instance_number=1, manufacturer="monai-segmentation-bundles", manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version, device_serial_number=algorithm.model_sha256[:16],
        content_description=f"{algorithm.name} {algorithm.version}"[:64], content_label="SEGMENTATION",
        series_description=series_description or f"{algorithm.name} segmentation"[:64])
    return segmentation


def write_segmentation(segmentation, path: str | os.PathLike) -> None:
    """Write the SEG as a DICOM file (the caller makes the write atomic)."""
    segmentation.save_as(str(path), enforce_file_format=True)  # preamble and file meta: a part-10 file


def is_dicom_series(source: Any) -> bool:
    """Whether an input of the batch runner is a DICOM series (a folder; files are other formats)."""
    return isinstance(source, (str, os.PathLike)) and Path(source).is_dir()


def segmentation_writer(labels: Any, names: Mapping[int, str], algorithm: AlgorithmInfo,
                        source: str | os.PathLike | None = None, **kwargs: Any):
    """A writer (``callable(path)``) of the DICOM SEG of one case, for the batch runner's output folder.

    Args:
        labels: the case's labels, channel first (``(1, X, Y, Z)``) or not, as a MONAI ``MetaTensor`` on the input's
            grid (its ``affine`` and ``filename_or_obj``, the series folder, come from its metadata).
        names, algorithm: see :func:`build_segmentation`.
        source: the series folder; default the labels' ``filename_or_obj``.
        kwargs: more arguments of :func:`build_segmentation`.

    Everything (reading the source headers, matching the grid, encoding) happens when the writer is called, so an
    error fails that case's write and leaves no output.
    """
    meta = getattr(labels, "meta", {})
    source = source if source is not None else meta.get("filename_or_obj")
    if not is_dicom_series(source):
        raise ValueError(f"{source}: a DICOM SEG needs a DICOM series folder as the source")
    affine = meta.get("affine")
    if affine is None:
        raise ValueError(f"{source}: the labels carry no affine; a DICOM SEG needs their voxel grid")
    affine = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=np.float64)
    array = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"a DICOM SEG is made of one label volume, got {array.shape[0]} channels")
        array = array[0]
    array = np.rint(array).astype(np.int32)

    def write(path: Path) -> None:
        write_segmentation(build_segmentation(read_series(source), array, affine, names, algorithm, **kwargs), path)

    return write


class DicomSegWriter(Writer):
    """``<case>_seg.dcm``: the DICOM SEG of the labels ``case[key]``, for each case read from a DICOM series.

    The segment names come from the bundle's metadata (``network_data_format.outputs.pred.channel_def``) and the
    algorithm's identification from its name and version and the model's SHA-256. The SEG is optional: whatever
    goes wrong while it is made (a source without StudyInstanceUID, say) fails only the SEG, and the case keeps its
    other outputs (status ``partial``).

    Args:
        key: the labels on the input's grid (the segmentation), channel first.
    """

    ext = ".dcm"
    optional = True
    title = "the DICOM SEG"

    def __init__(self, key: str = "pred") -> None:
        super().__init__(key)
        self.names: dict[int, str] = {}
        self.algorithm: AlgorithmInfo | None = None

    def applies(self, source: Any) -> bool:
        return is_dicom_series(source)

    def prepare(self, run: RunContext) -> None:
        from importlib.util import find_spec

        if find_spec("highdicom") is None:
            raise BatchError("dicom_seg needs highdicom: pip install 'monai-segmentation-bundles[dicom]'")
        try:
            self.names = segment_names(run.metadata)
        except (KeyError, TypeError, ValueError) as e:
            raise BatchError(f"dicom_seg needs the segment names of the bundle's configs/metadata.json "
                             f"({printable(e)}); run the config with its metadata.json (python -m monai.bundle run "
                             "reads the one next to the config file, --meta_file another)") from e
        self.algorithm = AlgorithmInfo(str(run.metadata.get("name", "")), str(run.metadata.get("version", "")),
                                       run.model_sha256)

    def write(self, case: Mapping, source: Any) -> Callable[[Path], None]:
        return segmentation_writer(self.value(case), self.names, self.algorithm, source=source)
