# SPDX-License-Identifier: Apache-2.0
"""Datalists for the bundles: MSD-layout training data, checked before training, and folders of scans to segment.

Every problem is reported as a :class:`DatasetError` that names the dataset, the case and the file, so a user
sees what to fix instead of a stack trace from inside a DataLoader worker.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "DatasetError",
    "IMAGE_SUFFIXES",
    "case_name",
    "read_dataset_json",
    "msd_training_datalist",
    "split_datalist",
    "check_training_data",
    "training_split",
    "scoring_split",
    "inference_datalist",
    "is_dicom_file",
    "is_dicom_folder",
    "check_dicom_series",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_MAX_REPORTED = 20


class DatasetError(ValueError):
    """A dataset folder or one of its cases cannot be used; the message names the path and the problem."""


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


def msd_training_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The ``training`` list of an MSD ``dataset.json`` as ``{"image", "label"}`` dicts with absolute paths.

    Raises:
        DatasetError: the folder or dataset.json is missing, the list is empty, or a listed file does not exist.
    """
    root = _existing_dir(dataset_dir)
    spec = read_dataset_json(root)
    entries = spec.get("training") or []
    if not entries:
        raise DatasetError(f"{root / 'dataset.json'}: the 'training' list is empty")
    datalist, missing = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{root / 'dataset.json'}: training entry {i} needs 'image' and 'label' keys")
        item = {"image": _resolve(root, entry["image"]), "label": _resolve(root, entry["label"])}
        for key in ("image", "label"):
            if not os.path.isfile(item[key]):
                missing.append(f"case {case_name(item['image'])}: {key} file {entry[key]!r} does not exist")
        datalist.append(item)
    if missing:
        raise DatasetError(_report(f"{root / 'dataset.json'} lists files that are missing", missing))
    return datalist


def split_datalist(
    datalist: Sequence[dict], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """A reproducible train/validation split: cases sorted by image path, shuffled with ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cases = sorted(datalist, key=lambda d: d["image"])
    random.Random(seed).shuffle(cases)
    num_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1)
    if num_val < 1:
        raise ValueError(f"cannot split {len(cases)} case(s) into training and validation sets")
    return cases[num_val:], cases[:num_val]


def _load_array(path: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Voxel data (read in full, so truncated files fail here) and the array shape."""
    if path.lower().endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        return data, tuple(img.shape)
    import itk  # the reader MONAI uses for these formats

    img = itk.imread(path)
    components = img.GetNumberOfComponentsPerPixel()
    # the size is (x, y, z), the axis order nibabel and MONAI use; the array is (z, y, x[, components])
    size = tuple(int(n) for n in img.GetLargestPossibleRegion().GetSize())
    return itk.array_from_image(img), size + ((components,) if components > 1 else ())


def check_training_data(
    datalist: Sequence[dict[str, str]], labels: Sequence[int], in_channels: int | None = None
) -> None:
    """Load every image and label once and check what training relies on.

    Checks that each file reads completely, that the image is 3D (or 4D with ``in_channels`` channels last),
    that the label has the image's spatial shape, and that label values are among ``labels``.

    Raises:
        DatasetError: listing every case that failed, with the file and the problem.
    """
    allowed = {int(v) for v in labels}
    problems = []
    for item in datalist:
        case = case_name(item["image"])
        try:
            image, image_shape = _load_array(item["image"])
        except Exception as e:  # any reader failure: report the file, not the reader's traceback
            problems.append(f"case {case}: cannot read image {item['image']} ({type(e).__name__}: {e})")
            continue
        try:
            label, label_shape = _load_array(item["label"])
        except Exception as e:
            problems.append(f"case {case}: cannot read label {item['label']} ({type(e).__name__}: {e})")
            continue
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


def _check_declared(dataset_dir: str | os.PathLike, num_classes: int, in_channels: int) -> Path:
    """The folder, once its dataset.json declares ``num_classes`` labels and ``in_channels`` modalities."""
    root = _existing_dir(dataset_dir)
    spec = read_dataset_json(root)
    declared = spec.get("labels")
    if isinstance(declared, dict) and len(declared) != num_classes:
        raise DatasetError(
            f"{root / 'dataset.json'} declares {len(declared)} labels {sorted(declared.values())} but the bundle "
            f"is configured for num_classes={num_classes}; pass --num_classes {len(declared)}"
        )
    modalities = spec.get("modality")
    if isinstance(modalities, dict) and len(modalities) != in_channels:
        raise DatasetError(
            f"{root / 'dataset.json'} declares {len(modalities)} modalities but the bundle is configured for "
            f"in_channels={in_channels}; pass --in_channels {len(modalities)}"
        )
    return root


def training_split(
    dataset_dir: str | os.PathLike,
    num_classes: int,
    in_channels: int = 1,
    val_fraction: float = 0.2,
    seed: int = 0,
    check: bool = True,
    max_cases: int | None = None,
) -> dict[str, list[dict[str, str]]]:
    """The bundles' training entry point: ``{"training": [...], "validation": [...]}`` for an MSD folder.

    The label set declared in dataset.json must have ``num_classes`` entries and its modalities ``in_channels``
    entries, so a bundle configured for another task fails here with the override to use, not after an epoch.

    Args:
        dataset_dir: MSD-layout folder (dataset.json, imagesTr/, labelsTr/).
        num_classes: number of output classes including background; labels must be ``0..num_classes-1``.
        in_channels: number of image channels the network takes.
        val_fraction: fraction of cases held out for validation.
        seed: seed of the split.
        check: read every case before training (see :func:`check_training_data`).
        max_cases: use only the first ``max_cases`` cases of the shuffled order (quick runs); ``None`` for all.
    """
    root = _check_declared(dataset_dir, num_classes, in_channels)
    datalist = msd_training_datalist(root)
    if max_cases is not None:
        datalist = sorted(datalist, key=lambda d: d["image"])
        random.Random(seed).shuffle(datalist)
        datalist = datalist[: int(max_cases)]
    if check:
        check_training_data(datalist, labels=range(num_classes), in_channels=in_channels)
    train, val = split_datalist(datalist, val_fraction=val_fraction, seed=seed)
    return {"training": train, "validation": val}


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM part-10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: str | os.PathLike, probe: int = 20) -> bool:
    """Whether one of the first ``probe`` files of the folder ``path`` (hidden files aside) is a DICOM file."""
    files = [f for f in sorted(Path(path).iterdir()) if f.is_file() and not f.name.startswith(".")]
    return any(is_dicom_file(f) for f in files[:probe])


def check_dicom_series(folder: str | os.PathLike) -> None:
    """Check that ``folder`` holds exactly one complete DICOM series, evenly spaced.

    ITK reads the first series of a folder with several, skips slices whose header it cannot parse and only
    warns about missing slices, so without this check a folder of bad slices gives a segmentation on a wrong
    grid instead of an error.

    Raises:
        DatasetError: naming the folder and the problem (number of series, slices outside the series, uneven
            or repeated slice positions).
    """
    import itk  # GDCM through ITK, as MONAI's ITKReader reads the series

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(False)  # one series per SeriesInstanceUID
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(str(folder))
    series = list(names.GetSeriesUIDs())
    if len(series) != 1:
        found = "no readable DICOM series" if not series else f"{len(series)} DICOM series"
        raise DatasetError(f"{folder}: holds {found}; put exactly one series in each sub-folder")
    files = list(names.GetFileNames(series[0]))
    dicom = [f for f in Path(folder).iterdir() if f.is_file() and not f.name.startswith(".") and is_dicom_file(f)]
    if len(dicom) != len(files):
        raise DatasetError(f"{folder}: {len(dicom) - len(files)} of its {len(dicom)} DICOM files are not readable "
                           "slices of the series (truncated or damaged?)")
    if len(files) < 2:
        return
    positions = []
    for f in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(f)
        io.ReadImageInformation()
        origin = np.array([io.GetOrigin(i) for i in range(3)])
        normal = np.array(io.GetDirection(2))[:3]  # the slice normal: the third axis' direction
        positions.append(float(np.dot(origin, normal)))
    gaps = np.diff(np.sort(positions))
    if gaps.min() <= 1e-4 or gaps.max() - gaps.min() > max(1e-3, 0.01 * float(np.median(gaps))):
        raise DatasetError(f"{folder}: slice positions are repeated or unevenly spaced (gaps from {gaps.min():.3g} "
                           f"to {gaps.max():.3g} mm); missing or extra slices?")


def inference_datalist(dataset_dir: str | os.PathLike, duplicates: str = "raise") -> list[dict[str, str]]:
    """Every image to segment under ``dataset_dir``, as ``{"image": path, "case": name}`` dicts sorted by name.

    ``dataset_dir`` is a folder of image files (NIfTI, NRRD, MetaImage) and of DICOM series, one series per
    sub-folder, or an MSD folder, whose ``imagesTr/`` and ``imagesTs/`` are read the same way. The case name is
    the file name without its extension, or the name of the series' folder. Sub-folders without DICOM files and
    hidden files are ignored.

    Args:
        dataset_dir: the folder.
        duplicates: what to do when two inputs share a case name (their outputs would overwrite each other):
            ``"raise"`` a :class:`DatasetError`, or ``"fail"``: keep both entries with an ``"error"`` saying so,
            which the batch runner reports as failed cases while it segments the others.

    Raises:
        DatasetError: the folder does not exist or holds no image; with ``duplicates="raise"``, two images
            share a case name.
    """
    if duplicates not in ("raise", "fail"):
        raise ValueError(f"duplicates must be 'raise' or 'fail', got {duplicates!r}")
    root = _existing_dir(dataset_dir)
    folders = [root / sub for sub in ("imagesTr", "imagesTs") if (root / sub).is_dir()] if (
        (root / "dataset.json").is_file()
    ) else [root]
    inputs: list[tuple[str, str]] = []
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                continue
            if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES):
                inputs.append((case_name(f), str(f)))
            elif f.is_dir() and is_dicom_folder(f):
                inputs.append((f.name, str(f)))
    if not inputs:
        raise DatasetError(
            f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders to segment"
        )
    by_name: dict[str, list[str]] = {}
    for name, path in inputs:
        by_name.setdefault(name, []).append(path)
    datalist = []
    for name in sorted(by_name):
        paths = by_name[name]
        if len(paths) > 1 and duplicates == "raise":
            raise DatasetError(f"{paths[0]} and {paths[1]} have the same case name {name!r}; outputs would collide")
        for path in paths:
            item = {"image": path, "case": name}
            if len(paths) > 1:
                others = ", ".join(Path(p).name for p in paths if p != path)
                item["error"] = f"{Path(path).name}: has the same case name {name!r} as {others}; rename one of them"
            datalist.append(item)
    return datalist


def scoring_split(
    dataset_dir: str | os.PathLike, num_classes: int, in_channels: int = 1, check: bool = True
) -> dict[str, list[dict[str, str]]]:
    """Every labelled case of an MSD folder as the validation set (``{"training": [], "validation": [...]}``).

    For scoring a trained bundle on other data with its evaluate config
    (``--datalist "$bundletools.scoring_split(...)"``); the same checks as :func:`training_split`.
    """
    root = _check_declared(dataset_dir, num_classes, in_channels)
    datalist = sorted(msd_training_datalist(root), key=lambda d: d["image"])
    if check:
        check_training_data(datalist, labels=range(num_classes), in_channels=in_channels)
    return {"training": [], "validation": datalist}
