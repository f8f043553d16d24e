# SPDX-License-Identifier: Apache-2.0
"""What an input scan is, read from its header before any voxel: size, geometry, the files it is made of.

:func:`inspect_image` reads only the header of a NIfTI, NRRD or MetaImage file, or of the slices of a DICOM series
folder, and refuses, with a :class:`DatasetError` naming the file, what must not be read or cannot be kept:

- more voxels than ``max_voxels`` (a header claiming 1000³ voxels is refused before 4 GB are allocated), also once
  resampled to the bundle's spacing (:func:`check_resampled_size`: 16³ voxels of 50 mm would become 751³ at 1 mm);
- a detached header (``.mhd``, ``.nhdr``) whose data files lie outside the input folder;
- a geometry that cannot be kept: NaN in the affine (sform/qform), a singular affine (an axis of length zero,
  collinear axes) or a non-orthogonal direction (shear), which the outputs could not carry;
- a file name that is not valid UTF-8 in a format read by ITK (ITK cannot open it, and SimpleITK aborts the
  process on it).

:func:`is_dicom_file` recognises DICOM files with or without the 128-byte preamble (GDCM reads both); a
:class:`SeriesPath` is one series of a folder that holds several (a study, as a DICOM listener writes it);
:func:`check_dicom_series` checks that a folder holds one series (or that the series of a :class:`SeriesPath` is
one) that ITK reads onto its true grid: complete,
evenly spaced slices of one orientation stacked along their normal (no gantry tilt), or one multi-frame file whose
frames lie where ITK puts them; :func:`dicom_planes` gives the planes of a DICOM instance (each frame's, from the
functional groups of a multi-frame one); :func:`input_checksum` is the SHA-256 of an input (a file, a detached
header with its data files, or a series folder).
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

__all__ = [
    "DatasetError",
    "IMAGE_SUFFIXES",
    "DEFAULT_MAX_VOXELS",
    "ImageHeader",
    "inspect_image",
    "resampled_shape",
    "check_resampled_size",
    "is_dicom_file",
    "is_dicom_folder",
    "SeriesPath",
    "check_dicom_series",
    "DicomPlane",
    "dicom_planes",
    "detached_data_files",
    "input_files",
    "input_checksum",
    "input_fingerprint",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DEFAULT_MAX_VOXELS = 512 * 512 * 1024  # voxels x channels; 1 GB as float32
_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_ORTHOGONALITY_TOLERANCE = 1e-4
# direction cosines of two slices of one series may differ by this: scanners write them to 6 or more decimals, and
# 1e-4 turns a 500 mm field of view by 0.05 mm
_ORIENTATION_TOLERANCE = 1e-4
_DICOM_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
              b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
              b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
_HEADER_BYTES = 1 << 20


class DatasetError(ValueError):
    """A dataset folder or one of its cases cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class ImageHeader:
    """What a header says: ``shape`` as nibabel gives it (spatial axes, then channels), ``affine`` in RAS mm."""

    shape: tuple[int, ...]
    affine: np.ndarray
    spatial_dims: int = 3

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[: self.spatial_dims])

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 0

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3]

    @property
    def direction(self) -> np.ndarray:
        return self.affine[:3, :3] / self.spacing


# ------------------------------------------------------------------------------------------------------ DICOM
def _looks_like_dicom(head: bytes) -> bool:
    """DICOM part 10 (``DICM`` after the preamble), or a data set without preamble that starts with a group 0002 or
    0008 element in little-endian explicit or implicit VR (GDCM reads such files)."""
    if head[128:132] == b"DICM" or head[:4] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    if head[4:6] in _DICOM_VRS:  # explicit VR
        return True
    length = struct.unpack("<I", head[4:8])[0]
    return group == 0x0008 and length < 0x10000 and length % 2 == 0  # implicit VR (never the meta group)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a regular file with ``DICM`` after the 128-byte preamble, or a data set
    without preamble (see :func:`_looks_like_dicom`). Never blocks on a FIFO or a device."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return _looks_like_dicom(f.read(132))
    except OSError:
        return False


class SeriesPath(str):
    """One DICOM series of a folder that holds several: the folder's path, as a ``str`` (what every reader of an
    input takes), that also carries which series it is (``series_uid``, its SeriesInstanceUID) and the files it
    is made of (``files``, found from their headers). The checks, the checksums, the DICOM SEG and the loader
    (``transforms.LoadImageSeriesd``, which reads a path's ``series_uid``) take only that series; ``str(path)``
    and ``Path(path)`` are the folder alone."""

    series_uid: str
    files: tuple[str, ...]

    def __new__(cls, folder: str | os.PathLike, series_uid: str, files: Sequence[str | os.PathLike] = ()):
        path = super().__new__(cls, os.fspath(folder))
        path.series_uid, path.files = str(series_uid), tuple(sorted(os.fspath(f) for f in files))
        return path

    def __reduce__(self):  # what str's own pickling would drop: the series (DataLoader workers get cases pickled)
        return SeriesPath, (str(self), self.series_uid, self.files)

    @property
    def label(self) -> str:
        """The folder with the series, for messages: ``<folder> (series <uid>)``."""
        return f"{self} (series {self.series_uid})"


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """Whether the folder ``path`` directly holds a DICOM file (hidden files aside), whatever sorts before it."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return False
    return any(not e.name.startswith(".") and is_dicom_file(e.path) for e in entries)


def _itk_readable_name(path: str | os.PathLike) -> None:
    """ITK takes UTF-8 file names only (its Python wrapping fails on others, or aborts): refuse them first."""
    try:
        os.fsencode(path).decode("utf-8")
        return
    except UnicodeDecodeError:
        pass
    raise DatasetError(f"{path}: the file name is not valid UTF-8, and ITK, which reads this format, cannot open it; "
                       "rename it")


class _Header:
    """Size, spacing, origin and direction (row-major, as ITK's matrix) of an image file, read by one of ITK's
    ImageIOs without its voxels."""

    def __init__(self, path: str, io=None) -> None:
        import itk  # the reader MONAI uses for these formats; imported on first use (it takes seconds)

        if io is None:
            io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
            if io is None:
                raise DatasetError(f"{path}: not an image ITK can read")
        io.SetFileName(path)
        io.ReadImageInformation()
        dims = io.GetNumberOfDimensions()
        self.size = tuple(int(io.GetDimensions(i)) for i in range(dims))
        self.spacing = tuple(float(io.GetSpacing(i)) for i in range(dims))
        self.origin = tuple(float(io.GetOrigin(i)) for i in range(dims))
        # ITK gives the direction of each axis (a column of the matrix)
        self.direction = np.array([list(io.GetDirection(i))[:dims] for i in range(dims)], dtype=np.float64).T.ravel()
        self.components = int(io.GetNumberOfComponents())


def _slice_header(path: str) -> _Header:
    import itk

    return _Header(path, itk.GDCMImageIO.New())  # also for slices without the preamble, which the IO factory skips


def _itk_affine(size, spacing, origin, direction) -> np.ndarray:
    """RAS affine of an ITK (LPS) geometry, padded to 3D."""
    dims = len(size)
    d = np.eye(3)
    d[:dims, :dims] = np.array(direction, dtype=np.float64).reshape(dims, dims)
    s = np.ones(3)
    s[:dims] = spacing
    o = np.zeros(3)
    o[:dims] = origin
    affine = np.eye(4)
    affine[:3, :3] = d * s
    affine[:3, 3] = o
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


@dataclass(frozen=True)
class DicomPlane:
    """One image plane of a DICOM instance, in LPS mm: a single-frame slice, or frame ``frame`` (from 1) of a
    multi-frame instance."""

    position: np.ndarray  # ImagePositionPatient: the centre of the first pixel
    orientation: np.ndarray  # 2 x 3: the direction along a row (the column index grows), then along a column
    pixel_spacing: tuple[float, float]  # between rows, between columns
    frame: int | None = None


_FRAME_GEOMETRY = (("PlanePositionSequence", "ImagePositionPatient"),
                   ("PlaneOrientationSequence", "ImageOrientationPatient"),
                   ("PixelMeasuresSequence", "PixelSpacing"))


def _frame_value(groups, sequence: str, keyword: str):
    """``keyword`` of the first of ``groups`` (functional group items) whose ``sequence`` has it."""
    for group in groups:
        if group is not None and sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
            return group[sequence][0][keyword].value
    return None


def _plane(position, orientation, pixel_spacing, frame: int | None = None) -> DicomPlane:
    return DicomPlane(np.asarray(position, dtype=np.float64), np.reshape(np.asarray(orientation, np.float64), (2, 3)),
                      (float(pixel_spacing[0]), float(pixel_spacing[1])), frame)


def dicom_planes(ds) -> list[DicomPlane]:
    """The image planes of a DICOM data set (pydicom, pixel data not needed): one per frame of a multi-frame
    instance, from its per-frame functional groups or, where a frame has none, the shared ones (enhanced and
    legacy converted enhanced images); else the one slice of its top-level attributes.

    Raises:
        DatasetError: a position, orientation or pixel spacing is missing, naming the file.
    """
    name = getattr(ds, "filename", None) or ds.get("SOPInstanceUID", "DICOM instance")
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        frames = ds.PerFrameFunctionalGroupsSequence
        if len(frames) != int(ds.get("NumberOfFrames") or 1):
            raise DatasetError(f"{name}: NumberOfFrames is {ds.get('NumberOfFrames')} but the file describes "
                               f"{len(frames)} frames")
        planes = []
        for number, item in enumerate(frames, 1):
            values = [_frame_value((item, shared), sequence, keyword) for sequence, keyword in _FRAME_GEOMETRY]
            missing = [sequence for (sequence, _), value in zip(_FRAME_GEOMETRY, values) if value is None]
            if missing:
                raise DatasetError(f"{name}: a multi-frame file, but its frames have no {' or '.join(missing)}; "
                                   "without each frame's geometry it cannot be placed")
            planes.append(_plane(*values, number))
        return planes
    keywords = [keyword for _, keyword in _FRAME_GEOMETRY]
    missing = [keyword for keyword in keywords if keyword not in ds]
    if missing:
        raise DatasetError(f"{name}: no {', '.join(missing)}; the slice's geometry is unknown")
    return [_plane(*(ds[keyword].value for keyword in keywords))]


def _cosines(orientation: np.ndarray) -> str:
    return "[" + ", ".join(f"{round(float(v), 4) + 0.0:g}" for v in orientation.ravel()) + "]"


def _check_stack(source: str | os.PathLike, positions: np.ndarray, orientations: np.ndarray, pixel: float,
                 what: str) -> None:
    """Refuse planes that ITK cannot read as one regular grid, which it reads anyway: planes of different
    orientations (each would get the first one's), planes stacked off their normal (gantry tilt: ITK stacks them
    along it), repeated or unevenly spaced planes (missing or extra slices).

    Args:
        source: the series folder, for the messages.
        positions: ``(n, 3)`` ImagePositionPatient of the planes, LPS mm.
        orientations: ``(n, 2, 3)`` their row and column directions.
        pixel: the smaller pixel spacing (mm); positions off the stack's line by 1 % of it are a tilt.
        what: ``"slices"`` or ``"frames"``.
    """
    groups: list[list] = []  # [orientation, number of planes]
    for orientation in orientations:
        for group in groups:
            if np.abs(orientation - group[0]).max() <= _ORIENTATION_TOLERANCE:
                group[1] += 1
                break
        else:
            groups.append([orientation, 1])
    if len(groups) > 1:
        listed = ", ".join(f"{_cosines(o)} in {n} {what}" for o, n in groups[:3])
        more = f" and {len(groups) - 3} other orientations" if len(groups) > 3 else ""
        raise DatasetError(f"{source}: inconsistent slice orientations: ImageOrientationPatient {listed}{more}; "
                           f"read as one volume, all {what} would get the first one's orientation, so it is not "
                           "segmented (a localizer in the series? give each orientation its own series folder)")
    normal = np.cross(orientations[0][0], orientations[0][1])
    normal /= np.linalg.norm(normal)
    along = positions @ normal
    first, last = int(np.argmin(along)), int(np.argmax(along))
    off_normal = np.linalg.norm((positions - positions[first]) - np.outer(along - along[first], normal), axis=1)
    if off_normal.max() > max(1e-3, 0.01 * pixel):
        stack = positions[last] - positions[first]
        angle = np.degrees(np.arccos(min(1.0, abs(float(stack @ normal)) / float(np.linalg.norm(stack)))))
        raise DatasetError(f"{source}: gantry tilt: the {what} are stacked {angle:.1f} degrees off the normal of "
                           f"their orientation (up to {off_normal.max():.3g} mm off it); ITK would stack them along "
                           "the normal and no regular grid holds them as they are, so it is not segmented; resample "
                           "it onto a regular grid first (dcm2niix corrects gantry tilt)")
    gaps = np.diff(np.sort(along))
    if gaps.min() <= 1e-4 or gaps.max() - gaps.min() > max(1e-3, 0.01 * float(np.median(gaps))):
        raise DatasetError(f"{source}: {what[:-1]} positions are repeated or unevenly spaced (gaps from "
                           f"{gaps.min():.3g} to {gaps.max():.3g} mm); missing or extra {what}?")


def _check_multiframe(folder: str | os.PathLike, path: str, header: _Header) -> ImageHeader:
    """The header of a series folder holding one multi-frame file, whose frames ITK reads in the file's order onto
    the grid GDCM makes of the functional groups; refused unless every frame lies where that grid puts it."""
    import pydicom

    name = os.path.basename(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise DatasetError(f"{folder}: {name} holds {header.size[2]} frames but no per-frame functional groups, so "
                           "where each frame lies is unknown; it is not segmented")
    planes = dicom_planes(ds)
    if len(planes) != header.size[2]:
        raise DatasetError(f"{folder}: ITK reads {header.size[2]} frames of {name}, whose functional groups "
                           f"describe {len(planes)}")
    positions = np.array([p.position for p in planes])
    _check_stack(folder, positions, np.array([p.orientation for p in planes]),
                 min(planes[0].pixel_spacing), "frames")
    # corners (0, 0), (columns - 1, 0), (0, rows - 1) of each frame: as ITK's grid puts them, and as DICOM does
    direction = header.direction.reshape(3, 3) * np.array(header.spacing)
    corners = np.array([[0, 0], [header.size[0] - 1, 0], [0, header.size[1] - 1]], dtype=np.float64)
    worst, frame = 0.0, 0
    for k, plane in enumerate(planes):
        itk = np.asarray(header.origin) + np.c_[corners, np.full(3, k)] @ direction.T
        steps = np.stack([plane.orientation[0] * plane.pixel_spacing[1], plane.orientation[1] * plane.pixel_spacing[0]])
        dicom = plane.position + corners @ steps
        distance = float(np.linalg.norm(itk - dicom, axis=1).max())
        if distance > worst:
            worst, frame = distance, k + 1
    if worst > max(1e-3, 0.01 * min(planes[0].pixel_spacing)):
        along = positions @ np.cross(planes[0].orientation[0], planes[0].orientation[1])
        if not (np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0)):
            raise DatasetError(f"{folder}: the frames of {name} are not stored in slice order, and "
                               "ITK reads them in the file's order, so it is not segmented")
        raise DatasetError(f"{folder}: ITK reads {name} onto a grid that puts frame {frame} "
                           f"{worst:.3g} mm from where its functional groups place it, so it is not segmented")
    return ImageHeader(header.size, _itk_affine(header.size, header.spacing, header.origin, header.direction))


def check_dicom_series(folder: str | os.PathLike) -> ImageHeader:
    """Check that ``folder`` holds exactly one DICOM series that ITK reads onto its true grid, or for a
    :class:`SeriesPath` that its series is one; returns its header, read without voxels.

    ITK reads the first series of a folder with several, skips slices whose header it cannot parse, only warns
    about missing slices, gives every slice the first one's orientation and stacks slices along their normal
    whatever their positions, so without this check such a folder gives a segmentation on a wrong grid instead of
    an error. The series is either single-frame slices or one multi-frame file (enhanced or legacy converted
    enhanced), whose frames are checked against the positions in its functional groups.

    Raises:
        DatasetError: naming the folder and the problem: number of series, slices outside the series, several
            multi-frame files, inconsistent slice orientations, gantry tilt, uneven or repeated slice positions,
            frames that are not in slice order or that ITK places elsewhere than their functional groups, file
            names ITK cannot open.
    """
    _itk_readable_name(folder)
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(False)  # one series per SeriesInstanceUID
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(str(folder))
    series = list(names.GetSeriesUIDs())
    if isinstance(folder, SeriesPath):
        if folder.series_uid not in series:
            raise DatasetError(f"{folder.label}: ITK reads no slice of this series (truncated or damaged files?)")
        files = list(names.GetFileNames(folder.series_uid))
        dicom, source = folder.files, folder.label
    else:
        if len(series) != 1:
            found = "no readable DICOM series" if not series else f"{len(series)} DICOM series"
            raise DatasetError(f"{folder}: holds {found}; put exactly one series in each sub-folder")
        files = list(names.GetFileNames(series[0]))
        dicom = [e.path for e in os.scandir(folder) if not e.name.startswith(".") and is_dicom_file(e.path)]
        source = folder
    for f in files:
        _itk_readable_name(f)
    if len(dicom) != len(files):
        raise DatasetError(f"{source}: {len(dicom) - len(files)} of its {len(dicom)} DICOM files are not readable "
                           "slices of the series (truncated or damaged?)")
    headers = [_slice_header(f) for f in files]
    multiframe = [h for h in headers if len(h.size) > 2 and h.size[2] > 1]
    if multiframe:
        if len(files) > 1:
            raise DatasetError(f"{source}: its series is {len(files)} files, {len(multiframe)} of them multi-frame; "
                               "a multi-frame file is a series of its own: put each in its own folder")
        return _check_multiframe(source, files[0], headers[0])
    first = headers[0]
    size = first.size
    header = ImageHeader((*size[:2], len(files)), _itk_affine(size, first.spacing, first.origin, first.direction))
    if len(files) > 1:
        directions = [h.direction.reshape(3, 3) for h in headers]
        _check_stack(source, np.array([h.origin for h in headers]), np.array([d[:, :2].T for d in directions]),
                     min(first.spacing[:2]), "slices")
    return header


# ------------------------------------------------------------------------------------------- detached headers
def _expand_pattern(fields: list[str]) -> list[str]:
    """``name%03d.raw 1 10 1`` -> the file names it stands for."""
    fmt, first, last, step = fields[0], int(fields[1]), int(fields[2]), int(fields[3]) if len(fields) > 3 else 1
    if step == 0 or abs(last - first) // abs(step) > 100000:
        raise ValueError(f"file pattern {' '.join(fields)!r} is not a usable range")
    return [fmt % i for i in range(first, last + (1 if step > 0 else -1), step)]


def detached_data_files(path: str | os.PathLike) -> list[str]:
    """The data files a MetaImage (``.mha``/``.mhd``) or NRRD (``.nrrd``/``.nhdr``) header names, as written
    (relative to the header's folder, or absolute); ``[]`` when the voxels are in the file itself or it is not
    such a header."""
    name = str(path).lower()
    if not name.endswith(_ITK_SUFFIXES):
        return []
    with open(path, "rb") as f:
        text = f.read(_HEADER_BYTES).decode("latin-1")
    lines = text.splitlines()
    if name.endswith((".mha", ".mhd")):
        for i, line in enumerate(lines):
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "elementdatafile":
                value = value.strip()
                if value.upper() == "LOCAL":
                    return []
                if value.upper().startswith("LIST"):
                    return [n.strip() for n in lines[i + 1:] if n.strip()]
                fields = value.split()
                return _expand_pattern(fields) if "%" in value and len(fields) >= 3 else [value]
        return []
    if not lines or not lines[0].startswith("NRRD"):
        return []
    for i, line in enumerate(lines[1:], 1):
        if not line.strip():
            return []  # end of the header: the data follow in this file
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("data file", "datafile"):
            value = value.strip()
            if value.upper().startswith("LIST"):
                return [n.strip() for n in lines[i + 1:] if n.strip()]
            fields = value.split()
            return _expand_pattern(fields) if "%" in value and len(fields) >= 3 else [value]
    return []


def _within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_data_files(path: str, root: str | os.PathLike | None) -> None:
    files = detached_data_files(path)
    root = str(root) if root is not None else os.path.dirname(os.path.abspath(path))
    folder = os.path.dirname(os.path.abspath(path))
    for f in files:
        if not _within(os.path.join(folder, f), root):
            raise DatasetError(f"{path}: its header names the data file {f!r}, outside the input folder {root}; "
                               "only data files inside the input folder are read")


# ------------------------------------------------------------------------------------------------------ headers
def _nifti_header(path: str) -> ImageHeader:
    img = nib.load(path)
    return ImageHeader(tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64),
                       min(3, len(img.shape)))


def _itk_header(path: str) -> ImageHeader:
    header = _Header(path)
    size, dims = header.size, len(header.size)
    affine = _itk_affine(size[:3], header.spacing[:3], header.origin[:3],
                         header.direction.reshape(dims, dims)[:3, :3].ravel())
    components = header.components
    return ImageHeader(tuple(size) + ((components,) if components > 1 else ()), affine, min(3, dims))


def _check_geometry(path: str, header: ImageHeader) -> None:
    """Refuse a geometry the outputs could not keep, saying which."""
    matrix = header.affine[:3, :3]
    if not np.all(np.isfinite(header.affine)):
        raise DatasetError(f"{path}: the header's affine (NIfTI sform/qform, or spacing, origin and direction) "
                           "contains NaN or Inf; its geometry cannot be kept, so the image is not segmented")
    spacing = header.spacing
    if np.any(spacing < 1e-6) or abs(np.linalg.det(matrix / np.maximum(spacing, 1e-12))) < 1e-6:
        raise DatasetError(f"{path}: the header's affine is singular (voxel sizes {np.round(spacing, 6).tolist()}, "
                           "an axis of length zero or two axes in line); its geometry cannot be kept")
    direction = header.direction
    shear = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if shear > _ORTHOGONALITY_TOLERANCE:
        raise DatasetError(f"{path}: the header's axes are not orthogonal (sheared by up to {shear:.3g}); an output "
                           "cannot keep this direction, so the image is not segmented")


def inspect_image(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  max_voxels: int | None = DEFAULT_MAX_VOXELS, check_geometry: bool = True) -> ImageHeader:
    """The header of the input ``path`` (a file, or a DICOM series folder), read without its voxels and checked.

    Args:
        path: the input.
        root: the input folder; a detached header may only name data files inside it (default: the header's own
            folder).
        max_voxels: the largest number of voxels times channels accepted; ``None`` for no limit.
        check_geometry: refuse NaN, singular or non-orthogonal affines.

    Raises:
        DatasetError: the problem, naming ``path``. A header that cannot be parsed raises the reader's error.
    """
    source, path = path, str(path)
    if os.path.isdir(path):
        header = check_dicom_series(source)
    elif path.lower().endswith((".nii", ".nii.gz")):
        header = _nifti_header(path)
    else:
        _itk_readable_name(path)
        _check_data_files(path, root)
        header = _itk_header(path)
    if max_voxels is not None and header.voxels > max_voxels:
        raise DatasetError(f"{path}: its header declares {'x'.join(map(str, header.shape))} = {header.voxels:.3g} "
                           f"voxels, more than max_voxels={max_voxels:.3g}; it was not read (raise max_voxels to "
                           "segment it)")
    if check_geometry:
        _check_geometry(path, header)
    return header


def resampled_shape(header: ImageHeader, pixdim: Sequence[float], slice_axis_last: bool = False) -> tuple[int, ...]:
    """The spatial shape the inference preprocessing resamples the image of ``header`` to: oriented to RAS
    (``Orientationd``), with the thickest axis moved last when ``slice_axis_last`` (``transforms.SliceAxisLastd``),
    then ``Spacingd`` to ``pixdim`` (an entry <= 0 keeps that axis's spacing), whose size per axis is
    ``round((n - 1) * spacing / pixdim) + 1``."""
    from transforms.slices import slice_last_order

    ras_axis = nib.orientations.io_orientation(header.affine)[:, 0].astype(int)
    shape, spacing = np.empty(3), np.empty(3)
    shape[ras_axis], spacing[ras_axis] = header.spatial_shape, header.spacing
    if slice_axis_last:
        order = slice_last_order(spacing)
        shape, spacing = shape[order], spacing[order]
    target = np.where(np.asarray(pixdim, dtype=float) > 0, pixdim, spacing)
    return tuple(int(round((n - 1) * s / t)) + 1 for n, s, t in zip(shape, spacing, target))


def check_resampled_size(path: str | os.PathLike, header: ImageHeader, pixdim: Sequence[float], max_voxels: int,
                         slice_axis_last: bool = False) -> None:
    """Refuse, before anything is allocated, an image that resampled to ``pixdim`` (see :func:`resampled_shape`)
    would hold more than ``max_voxels`` voxels times channels: a small file of huge voxels can blow up to
    gigabytes. Images that are not 3D are left to the input checks.

    Raises:
        DatasetError: naming ``path``, its voxels and the resampled size.
    """
    if header.spatial_dims != 3 or len(header.shape) < 3:
        return
    shape = resampled_shape(header, pixdim, slice_axis_last)
    channels = header.voxels // max(1, int(np.prod(header.spatial_shape, dtype=np.int64)))
    voxels = int(np.prod(shape, dtype=np.int64)) * channels
    if voxels > max_voxels:
        spacing = "x".join(f"{s:.4g}" for s in header.spacing)
        target = "x".join(f"{p:g}" if p > 0 else "kept" for p in pixdim)
        raise DatasetError(f"{path}: its {'x'.join(map(str, header.spatial_shape))} voxels of {spacing} mm, "
                           f"resampled to the bundle's pixdim ({target} mm), would be {'x'.join(map(str, shape))}"
                           f"{f' x {channels} channels' if channels > 1 else ''} = {voxels:.3g} voxels, more than "
                           f"max_voxels={max_voxels:.3g}; it was not read (check the header's voxel size, or raise "
                           "max_voxels to segment it)")


# ---------------------------------------------------------------------------------------------------- checksums
def input_files(path: str | os.PathLike) -> list[str]:
    """The files the input ``path`` is made of: the file and the data files of a detached header, the
    non-hidden files of a series folder, or the files of a :class:`SeriesPath`'s series; sorted."""
    if isinstance(path, SeriesPath):
        return list(path.files)
    path = str(path)
    if os.path.isdir(path):
        return sorted(e.path for e in os.scandir(path) if not e.name.startswith(".") and e.is_file())
    folder = os.path.dirname(os.path.abspath(path))
    try:
        data = [os.path.join(folder, f) for f in detached_data_files(path)]
    except (OSError, ValueError):
        data = []
    return [path, *sorted(f for f in data if os.path.isfile(f))]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_checksum(path: str | os.PathLike) -> str:
    """SHA-256 of the input: of the file itself (what ``sha256sum`` prints) when it is one file, else of the
    ``sha256sum``-style lines (``<sha256>  <name>``) of its files."""
    files = input_files(path)
    if len(files) == 1 and not os.path.isdir(path):
        return _sha256(files[0])
    lines = "".join(f"{_sha256(f)}  {os.fsencode(os.path.basename(f)).decode('utf-8', 'backslashreplace')}\n"
                    for f in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def input_fingerprint(path: str | os.PathLike) -> str:
    """A cheap stand-in for the checksum: the name, size, inode, modification and change times of the input's
    files. Equal fingerprints mean unchanged files (the change time moves with any write), so a resumed batch
    hashes only inputs whose fingerprint moved."""
    parts = []
    for f in input_files(path):
        st = os.stat(f)
        parts.append(f"{os.fsencode(f).hex()} {st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()

