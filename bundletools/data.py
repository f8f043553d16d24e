# SPDX-License-Identifier: Apache-2.0
"""Datalists for the bundles: MSD-layout training data, checked before training, and folders of scans to segment.

Every problem is reported as a :class:`DatasetError` that names the dataset, the case and the file, so a user
sees what to fix instead of a stack trace from inside a DataLoader worker. What a single scan is (its header,
size, geometry, DICOM series) is :mod:`bundletools.images`.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .images import (
    DEFAULT_MAX_VOXELS,
    IMAGE_SUFFIXES,
    DatasetError,
    ImageHeader,
    SeriesPath,
    check_dicom_series,
    detached_data_files,
    inspect_image,
    is_dicom_file,
    is_dicom_folder,
)
from .outputs import LOCK_NAME
from .series import SeriesRules, case_names, find_series

__all__ = [
    "DatasetError",
    "IMAGE_SUFFIXES",
    "case_name",
    "read_dataset_json",
    "declared_labels",
    "msd_training_datalist",
    "split_datalist",
    "check_training_data",
    "training_split",
    "scoring_split",
    "Datalist",
    "inference_datalist",
    "is_dicom_file",
    "is_dicom_folder",
    "check_dicom_series",
    "SeriesPath",
    "SeriesRules",
]

_MAX_REPORTED = 20
# image vs label: relative tolerance of the spacing, of the origin (in voxels) and absolute of direction cosines
_GEOMETRY_TOLERANCE = 1e-3


def case_name(path: str | os.PathLike) -> str:
    """The file name without its image extension (``.nii.gz`` counts as one extension)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _existing_dir(dataset_dir: str | os.PathLike) -> Path:
    path = Path(dataset_dir).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dataset_dir {str(path)!r} does not exist or is not a folder")
    return path


def read_dataset_json(dataset_dir: str | os.PathLike) -> dict:
    """Read ``<dataset_dir>/dataset.json`` (MSD layout)."""
    path = _existing_dir(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: no dataset.json; an MSD-layout folder has dataset.json, imagesTr/ and labelsTr/")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read as JSON ({e})") from e


def _resolve(dataset_dir: Path, entry: str) -> str:
    return str((dataset_dir / entry).resolve()) if not os.path.isabs(entry) else entry


def _flag(value: object, name: str) -> bool:
    """A boolean option as a config or ``python -m monai.bundle`` gives it: Fire passes ``--key false`` as the
    string ``"false"``, which must not read as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DatasetError(f"{name} must be true or false, got {value!r}")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same_file_key(path: str) -> tuple:
    """What identifies the file ``path`` names, whatever its spelling or the links to it: its device and inode
    (its real path when it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def _duplicate_cases(datalist: Sequence[dict], describe: Callable[[int], str]) -> list[str]:
    """One problem per entry whose image is that of an earlier entry, ``describe(i)`` naming entry ``i``."""
    first: dict[tuple, int] = {}
    problems = []
    for i, item in enumerate(datalist):
        key = _same_file_key(item["image"])
        if key in first:
            problems.append(f"case {case_name(item['image'])}: {describe(first[key])} and {describe(i)} are the same "
                            "image file")
        else:
            first[key] = i
    return problems


def msd_training_datalist(
    dataset_dir: str | os.PathLike, allow_outside_dataset_dir: bool = False
) -> list[dict[str, str]]:
    """The ``training`` list of an MSD ``dataset.json`` as ``{"image", "label"}`` dicts with absolute paths.

    Each case is listed once: two entries naming the same image file, under any spelling (``./imagesTr/a.nii.gz``,
    ``imagesTr//a.nii.gz``), through a symbolic or hard link, are an error, as a case listed twice could land in
    both the training and the validation set. Files must lie inside ``dataset_dir`` after symbolic links are
    followed (no ``../``, no absolute paths elsewhere), unless ``allow_outside_dataset_dir``.

    Raises:
        DatasetError: the folder or dataset.json is missing, the list is empty, a listed file does not exist or
            is outside the folder, or a case is listed twice (naming each pair of entries).
    """
    allow_outside_dataset_dir = _flag(allow_outside_dataset_dir, "allow_outside_dataset_dir")
    root = _existing_dir(dataset_dir)
    source = root / "dataset.json"
    spec = read_dataset_json(root)
    entries = spec.get("training") or []
    if not entries:
        raise DatasetError(f"{source}: the 'training' list is empty")
    real_root = os.path.realpath(root)
    datalist, missing, outside = [], [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("label"), str):
            raise DatasetError(f"{source}: training entry {i} needs 'image' and 'label' paths")
        item = {key: _resolve(root, entry[key]) for key in ("image", "label")}
        for key in ("image", "label"):
            if not allow_outside_dataset_dir and not _within(os.path.realpath(item[key]), real_root):
                outside.append(f"case {case_name(item['image'])}: {key} {entry[key]!r} is outside {root}")
            elif not os.path.isfile(item[key]):
                missing.append(f"case {case_name(item['image'])}: {key} file {entry[key]!r} does not exist")
        datalist.append(item)
    if outside:
        raise DatasetError(_report(f"{source} lists files outside the dataset folder (pass "
                                   "--allow_outside_dataset_dir True to use them)",
                                   outside))
    if missing:
        raise DatasetError(_report(f"{source} lists files that are missing", missing))
    duplicates = _duplicate_cases(datalist, lambda i: f"entry {i} ({entries[i]['image']!r})")
    if duplicates:
        raise DatasetError(_report(f"{source} lists a case more than once; remove the repeated entries",
                                   duplicates))
    return datalist


def split_datalist(
    datalist: Sequence[dict], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """A reproducible train/validation split: cases sorted by image path, shuffled with ``seed``.

    Raises:
        DatasetError: an image file is listed twice (see :func:`msd_training_datalist`), so that no case can be
            both trained and validated on.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    duplicates = _duplicate_cases(datalist, lambda i: repr(datalist[i]["image"]))
    if duplicates:
        raise DatasetError(_report("the datalist to split lists a case more than once", duplicates))
    cases = sorted(datalist, key=lambda d: d["image"])
    random.Random(seed).shuffle(cases)
    num_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1)
    if num_val < 1:
        raise ValueError(f"cannot split {len(cases)} case(s) into training and validation sets")
    return cases[num_val:], cases[:num_val]


def declared_labels(spec: Mapping, source: str | os.PathLike = "dataset.json") -> dict[int, str]:
    """Label value -> name from the ``labels`` of a dataset.json: MSD's ``{"0": "background", ...}``, nnU-Net's
    ``{"background": 0, ...}`` or a list of names (value = position).

    Raises:
        DatasetError: ``labels`` is missing or is none of these (naming ``source``).
    """
    labels = spec.get("labels")
    example = '{"0": "background", "1": "<first label>", ...}'
    if labels is None:
        raise DatasetError(f"{source}: has no 'labels'; declare the label values and names, e.g. {example}")
    try:
        if isinstance(labels, list) and labels and all(isinstance(n, str) for n in labels):
            return dict(enumerate(labels))
        if isinstance(labels, Mapping) and labels:
            if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):  # name -> value
                result = {int(v): str(k) for k, v in labels.items()}
            else:  # value -> name
                result = {int(str(k).strip()): str(v) for k, v in labels.items()}
            if len(result) == len(labels):
                return result
    except ValueError:
        pass
    raise DatasetError(f"{source}: 'labels' must map each label value to its name, e.g. {example}; got "
                       f"{json.dumps(labels)[:200]}")


def _load_array(path: str) -> np.ndarray:
    """Voxel data, read in full (so truncated files fail here)."""
    if path.lower().endswith((".nii", ".nii.gz")):
        return np.asanyarray(nib.load(path).dataobj)
    import itk  # the reader MONAI uses for these formats

    return itk.array_from_image(itk.imread(path))


def _geometry_problem(image: ImageHeader, label: ImageHeader) -> str | None:
    """How the label's grid differs from the image's (spacing, origin, direction), or ``None``."""
    tol = _GEOMETRY_TOLERANCE

    def fmt(values) -> str:
        return "(" + ", ".join(f"{v:.6g}" for v in np.ravel(values)) + ")"

    if np.any(np.abs(label.spacing - image.spacing) > tol * image.spacing):
        return f"label spacing {fmt(label.spacing)} differs from image spacing {fmt(image.spacing)} mm"
    if np.any(np.abs(label.direction - image.direction) > tol):
        return (f"label direction {fmt(label.direction.T)} differs from image direction {fmt(image.direction.T)} "
                "(flipped or rotated axes)")
    if np.linalg.norm(label.origin - image.origin) > tol * float(image.spacing.min()):
        return f"label origin {fmt(label.origin)} differs from image origin {fmt(image.origin)} mm"
    return None


def check_training_data(
    datalist: Sequence[dict[str, str]],
    labels: Sequence[int],
    in_channels: int | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
    root: str | os.PathLike | None = None,
) -> None:
    """Read every image and label header, then their voxels, and check what training relies on.

    From the headers, before any voxel is read: size (``max_voxels``), a geometry that can be used (no NaN, not
    singular, orthogonal axes), detached headers naming data files outside ``root``, an image that is 3D (or 4D
    with ``in_channels`` channels last), and a label on the image's grid: same spatial shape, spacing, origin and
    direction (within a small tolerance). Then each file reads completely, the image has no NaN or Inf voxels and
    the label values are among ``labels``.

    Raises:
        DatasetError: listing every case that failed, with the file and the problem.
    """
    allowed = {int(v) for v in labels}
    problems = []
    for item in datalist:
        case = case_name(item["image"])
        headers = {}
        for key in ("image", "label"):
            try:
                headers[key] = inspect_image(item[key], root=root, max_voxels=max_voxels)
            except DatasetError as e:
                problems.append(f"case {case}: {key} {e}")
            except Exception as e:  # any reader failure: report the file, not the reader's traceback
                problems.append(f"case {case}: cannot read {key} {item[key]} ({type(e).__name__}: {e})")
        if len(headers) < 2:
            continue
        image_shape, label_shape = headers["image"].shape, headers["label"].shape
        if len(image_shape) not in (3, 4):
            problems.append(f"case {case}: image {item['image']} has shape {image_shape}; expected a 3D volume")
            continue
        channels = image_shape[3] if len(image_shape) == 4 else 1
        if in_channels is not None and channels != in_channels:
            problems.append(
                f"case {case}: image {item['image']} has {channels} channel(s), the bundle expects {in_channels}"
            )
        label_spatial = tuple(label_shape[:3]) if all(s == 1 for s in label_shape[3:]) else tuple(label_shape)
        if label_spatial != tuple(image_shape[:3]):
            problems.append(
                f"case {case}: label shape {tuple(label_shape)} differs from image shape {tuple(image_shape[:3])}"
                f" ({item['label']})"
            )
            continue
        geometry = _geometry_problem(headers["image"], headers["label"])
        if geometry:
            problems.append(f"case {case}: {geometry} ({item['label']}); resample the label onto the image")
            continue
        arrays = {}
        for key in ("image", "label"):
            try:
                arrays[key] = _load_array(item[key])
            except Exception as e:
                problems.append(f"case {case}: cannot read {key} {item[key]} ({type(e).__name__}: {e})")
        if len(arrays) < 2:
            continue
        image, label = arrays["image"], arrays["label"]
        if not np.all(np.isfinite(image)):
            problems.append(f"case {case}: image {item['image']} contains NaN or Inf voxels")
        values = np.unique(label)
        non_integer = values[values != np.round(values)]
        unexpected = sorted({int(v) for v in np.round(values)} - allowed)
        if non_integer.size:
            problems.append(f"case {case}: label {item['label']} has non-integer values {non_integer[:5].tolist()}")
        elif unexpected:
            problems.append(
                f"case {case}: label {item['label']} has value(s) {unexpected} outside the declared labels "
                f"{sorted(allowed)}"
            )
    if problems:
        raise DatasetError(_report(f"{len(problems)} problem(s) in the training data", problems))


def _report(title: str, problems: Sequence[str]) -> str:
    lines = [f"{title}:"] + [f"  - {p}" for p in problems[:_MAX_REPORTED]]
    if len(problems) > _MAX_REPORTED:
        lines.append(f"  ... and {len(problems) - _MAX_REPORTED} more")
    return "\n".join(lines)


def _check_declared(dataset_dir: str | os.PathLike, num_classes: int, in_channels: int) -> tuple[Path, list[int]]:
    """The folder and its label values, once its dataset.json declares the labels ``0..num_classes-1`` and
    ``in_channels`` modalities."""
    root = _existing_dir(dataset_dir)
    source = root / "dataset.json"
    spec = read_dataset_json(root)
    declared = declared_labels(spec, source)
    values = sorted(declared)
    if values != list(range(len(values))):
        raise DatasetError(
            f"{source} declares the label values {values} ({', '.join(declared[v] for v in values)}); the bundles "
            f"train on consecutive values 0..{len(values) - 1} with 0 the background: renumber the labels in the "
            "label files and in dataset.json"
        )
    if len(declared) != num_classes:
        raise DatasetError(
            f"{source} declares {len(declared)} labels {[declared[v] for v in values]} but the bundle "
            f"is configured for num_classes={num_classes}; pass --num_classes {len(declared)}"
        )
    modalities = spec.get("modality")
    if isinstance(modalities, dict) and len(modalities) != in_channels:
        raise DatasetError(
            f"{source} declares {len(modalities)} modalities but the bundle is configured for "
            f"in_channels={in_channels}; pass --in_channels {len(modalities)}"
        )
    return root, values


def training_split(
    dataset_dir: str | os.PathLike,
    num_classes: int,
    in_channels: int = 1,
    val_fraction: float = 0.2,
    seed: int = 0,
    check: bool = True,
    max_cases: int | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
    allow_outside_dataset_dir: bool = False,
) -> dict[str, list[dict[str, str]]]:
    """The bundles' training entry point: ``{"training": [...], "validation": [...]}`` for an MSD folder.

    dataset.json must declare its labels (``labels``: value -> name) as ``0..num_classes-1`` and ``in_channels``
    modalities, so a bundle configured for another task fails here with the override to use, not after an epoch.

    Args:
        dataset_dir: MSD-layout folder (dataset.json, imagesTr/, labelsTr/).
        num_classes: number of output classes including background; labels must be ``0..num_classes-1``.
        in_channels: number of image channels the network takes.
        val_fraction: fraction of cases held out for validation.
        seed: seed of the split.
        check: read every case before training (see :func:`check_training_data`), its label values against the
            labels declared in dataset.json.
        max_cases: use only the first ``max_cases`` cases of the shuffled order (quick runs); ``None`` for all.
        max_voxels: the largest image (voxels times channels) accepted by the check, from its header.
        allow_outside_dataset_dir: accept dataset.json entries outside ``dataset_dir`` (see
            :func:`msd_training_datalist`).
    """
    allow_outside_dataset_dir = _flag(allow_outside_dataset_dir, "allow_outside_dataset_dir")
    root, labels = _check_declared(dataset_dir, num_classes, in_channels)
    datalist = msd_training_datalist(root, allow_outside_dataset_dir)
    if max_cases is not None:
        datalist = sorted(datalist, key=lambda d: d["image"])
        random.Random(seed).shuffle(datalist)
        datalist = datalist[: int(max_cases)]
    if check:
        check_training_data(datalist, labels=labels, in_channels=in_channels, max_voxels=max_voxels,
                            root=None if allow_outside_dataset_dir else root)
    train, val = split_datalist(datalist, val_fraction=val_fraction, seed=seed)
    return {"training": train, "validation": val}


def scoring_split(
    dataset_dir: str | os.PathLike, num_classes: int, in_channels: int = 1, check: bool = True,
    max_voxels: int | None = DEFAULT_MAX_VOXELS, allow_outside_dataset_dir: bool = False,
) -> dict[str, list[dict[str, str]]]:
    """Every labelled case of an MSD folder as the validation set (``{"training": [], "validation": [...]}``).

    For scoring a trained bundle on other data with its evaluate config
    (``--datalist "$bundletools.scoring_split(...)"``); the same checks as :func:`training_split`, so each case
    is scored once.
    """
    allow_outside_dataset_dir = _flag(allow_outside_dataset_dir, "allow_outside_dataset_dir")
    root, labels = _check_declared(dataset_dir, num_classes, in_channels)
    datalist = sorted(msd_training_datalist(root, allow_outside_dataset_dir), key=lambda d: d["image"])
    if check:
        check_training_data(datalist, labels=labels, in_channels=in_channels, max_voxels=max_voxels,
                            root=None if allow_outside_dataset_dir else root)
    return {"training": [], "validation": datalist}


# ---------------------------------------------------------------------------------------------- inference
class Datalist(list):
    """The cases to segment (a list of ``{"image", "case", "root"}`` dicts) and, as ``ignored``, every other
    entry found under the input folder with the reason it is not a case (``{"input", "reason"}``, and ``"rule"``
    for a DICOM series the series rules passed over); ``series_rules``: those rules, as the report records them
    (``None``: every series was taken)."""

    def __init__(self, items=(), ignored=(), series_rules: Mapping | None = None) -> None:
        super().__init__(items)
        self.ignored: list[dict[str, str]] = list(ignored)
        self.series_rules = series_rules


class _Discovery:
    """Walks an input folder: image files and DICOM series at any depth become cases, every other entry is
    recorded as ignored with its reason."""

    def __init__(self, root: Path, rules: SeriesRules | None = None) -> None:
        self.root, self.rules = root, rules
        self.inputs: list[tuple[str, str]] = []  # (case name, path)
        self.ignored: list[dict[str, str]] = []
        self.visited: dict[str, str] = {os.path.realpath(root): str(root)}

    def ignore(self, path: str | os.PathLike, reason: str, rule: str | None = None) -> None:
        self.ignored.append({"input": str(path), "reason": reason, **({"rule": rule} if rule else {})})

    def dicom_folder(self, folder: Path, parts: tuple[str, ...], files: list[str]) -> None:
        """The cases of a folder that directly holds DICOM ``files``: the folder, named after it, when they are
        one series; else each series (a :class:`SeriesPath`), named after its patient, study and series. A
        series the rules pass over is ignored with the rule."""
        series, orphans = find_series(files)
        if len(series) <= 1:  # files whose header cannot be read fail the case, as slices it lacks
            rejected = self.rules.rejects(series[0]) if series and self.rules else None
            if rejected:
                self.ignore(folder, f"{series[0].describe()}: {rejected[1]} (series_rules: {rejected[0]})",
                            rejected[0])
            else:
                self.inputs.append(("_".join(parts) if parts else folder.name, str(folder)))
            return
        for one, name in zip(series, case_names(series, parts)):
            rejected = self.rules.rejects(one) if self.rules else None
            if rejected:
                self.ignore(folder, f"{one.describe()}: {rejected[1]} (series_rules: {rejected[0]})", rejected[0])
            else:
                self.inputs.append((name, one.path(folder)))
        for path, why in orphans:
            self.ignore(path, f"{why}: not part of any series of the folder {folder.name}")

    def _stat(self, path: str) -> os.stat_result | None:
        """The entry's status through symbolic links, or ``None`` after recording why it cannot be followed."""
        try:
            return os.stat(path)
        except FileNotFoundError:
            self.ignore(path, f"dangling symbolic link (to {os.readlink(path)!r})" if os.path.islink(path)
                        else "disappeared while the folder was read")
        except OSError as e:
            if e.errno == errno.ELOOP:
                self.ignore(path, "symbolic link loop")
            else:
                self.ignore(path, f"cannot be read ({e.strerror})")
        return None

    def walk(self, folder: Path, parts: tuple[str, ...] = ()) -> None:
        """Cases and ignored entries of ``folder``, whose case names start with ``parts`` joined by ``_``."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.ignore(folder, f"folder cannot be listed ({e.strerror})")
            return
        if not entries:
            self.ignore(folder, "empty folder")
            return
        if folder != self.root and any(e.name == LOCK_NAME for e in entries):
            self.ignore(folder, f"an output folder of a batch (it holds {LOCK_NAME}); not read")
            return
        data_files: dict[str, str] = {}  # data file -> the detached header naming it
        files, folders = [], []
        for entry in entries:
            path = entry.path
            if entry.name.startswith("."):
                self.ignore(path, "hidden")
                continue
            st = self._stat(path)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                folders.append(entry)
            elif not stat.S_ISREG(st.st_mode):
                self.ignore(path, "not a file or a folder (a device, FIFO or socket)")
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                self.inputs.append(("_".join((*parts, case_name(entry.name))), path))
                try:
                    for f in detached_data_files(path):
                        data_files[os.path.normpath(os.path.join(folder, f))] = entry.name
                except (OSError, ValueError):
                    pass  # the case fails with the reader's reason
            else:
                files.append(path)
        others = [p for p in files if os.path.normpath(p) in data_files or not is_dicom_file(p)]
        if len(others) < len(files):
            not_dicom = set(others)
            self.dicom_folder(folder, parts, [p for p in files if p not in not_dicom])
        for path in others:
            header = data_files.get(os.path.normpath(path))
            if header:
                self.ignore(path, f"data file of {header}")
            elif len(others) < len(files):
                self.ignore(path, f"not a DICOM file (in the series folder {folder.name})")
            else:
                self.ignore(path, "not an image: inputs are " + ", ".join(IMAGE_SUFFIXES)
                            + " files and DICOM series folders")
        for entry in folders:
            real = os.path.realpath(entry.path)
            if real in self.visited:
                self.ignore(entry.path, f"a folder already read as {self.visited[real]} (symbolic link loop)")
                continue
            self.visited[real] = entry.path
            self.walk(Path(entry.path), (*parts, entry.name))


def inference_datalist(dataset_dir: str | os.PathLike, duplicates: str = "raise",
                       series_rules: SeriesRules | None = None) -> Datalist:
    """Every image to segment under ``dataset_dir``, as ``{"image": path, "case": name, "root": dataset_dir}``
    dicts sorted by name, with every other entry in ``.ignored``.

    ``dataset_dir`` is a folder of image files (NIfTI, NRRD, MetaImage) and DICOM series, at any depth
    (``patient/study/series`` layouts), or an MSD folder, whose ``imagesTr/`` and ``imagesTs/`` are read the same
    way. The DICOM files (with or without the 128-byte preamble) directly in a folder are grouped into series by
    their SeriesInstanceUID, from their headers: a folder of one series is a case, a folder of several (a study,
    as a DICOM listener writes it) is a case per series, whose ``image`` is a :class:`SeriesPath`. The case name
    is the file name without its extension, the series folder's name, or for a series of a folder of several
    ``<PatientID>_<study>_<SeriesNumber>-<SeriesDescription>`` (:func:`bundletools.series.case_names`); below the
    top level it is prefixed with the folders above, joined by ``_`` (``patient1_study2_series3``). Hidden
    entries, other files, empty folders, dangling and looping symbolic links, the data files of detached headers,
    another batch's output folder and the series ``series_rules`` pass over are not cases: each is in
    ``.ignored`` with the reason (and the rule).

    Args:
        dataset_dir: the folder.
        duplicates: what to do when two inputs share a case name (their outputs would overwrite each other):
            ``"raise"`` a :class:`DatasetError`, or ``"fail"``: keep both entries with an ``"error"`` saying so,
            which the batch runner reports as failed cases while it segments the others.
        series_rules: which DICOM series are segmented (:class:`bundletools.series.SeriesRules`); ``None``: every
            series.

    Raises:
        DatasetError: the folder does not exist or holds no image; with ``duplicates="raise"``, two images
            share a case name.
    """
    if duplicates not in ("raise", "fail"):
        raise ValueError(f"duplicates must be 'raise' or 'fail', got {duplicates!r}")
    # absolute: ITK changes the working directory while it loads a module, and the runner's threads read and
    # write meanwhile, so a relative path could name another file
    root = Path(os.path.abspath(_existing_dir(dataset_dir)))
    found = _Discovery(root, series_rules)
    if (root / "dataset.json").is_file():  # MSD: the images of imagesTr/ and imagesTs/
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name in ("imagesTr", "imagesTs") and entry.is_dir():
                found.walk(Path(entry.path))
            else:
                found.ignore(entry.path, "not an input folder of an MSD dataset (imagesTr/, imagesTs/)")
    else:
        found.walk(root)
    if not found.inputs:
        raise DatasetError(
            f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders to segment"
            + (f" ({len(found.ignored)} other entries ignored, e.g. {Path(found.ignored[0]['input']).name}: "
               f"{found.ignored[0]['reason']})" if found.ignored else "")
        )
    by_name: dict[str, list[str]] = {}
    for name, path in found.inputs:
        by_name.setdefault(name, []).append(path)
    datalist = []
    for name in sorted(by_name):
        paths = by_name[name]
        if len(paths) > 1 and duplicates == "raise":
            raise DatasetError(f"{paths[0]} and {paths[1]} have the same case name {name!r}; outputs would collide")
        for path in paths:
            item = {"image": path, "case": name, "root": str(root)}
            if len(paths) > 1:
                others = ", ".join(Path(p).name for p in paths if p != path)
                item["error"] = f"{Path(path).name}: has the same case name {name!r} as {others}; rename one of them"
            datalist.append(item)
    return Datalist(datalist, found.ignored, series_rules.describe() if series_rules is not None else None)
