# SPDX-License-Identifier: Apache-2.0
"""The DICOM series of an input folder, found from their headers, and which of them a bundle segments.

A DICOM listener writes a study into one folder: the T1, the T2, a localizer, perhaps a CT of the same visit, all
mixed. :func:`find_series` groups a folder's DICOM files by SeriesInstanceUID, reading headers only (pydicom,
``stop_before_pixels``); :class:`SeriesRules` says which series a bundle segments: the modality its metadata
declares (``network_data_format.inputs.image.modality``), ImageType ORIGINAL and PRIMARY, not a localizer
(ImageType LOCALIZER, or fewer than ``min_slices`` slices); :meth:`SeriesRules.rejects` names the rule a series
fails. :func:`case_names` names the series of a folder after their patient, study and series, in characters every
file system takes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .images import SeriesPath

__all__ = ["DicomSeries", "SeriesRules", "case_names", "find_series"]

# what the rules and the names read of each file's header
_TAGS = ["SeriesInstanceUID", "Modality", "ImageType", "NumberOfFrames", "PatientID", "StudyInstanceUID", "StudyID",
         "StudyDate", "SeriesNumber", "SeriesDescription"]
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")  # anything else in a header value becomes "-" in a case name
_NAME_PART = 48  # characters kept of each part of a case name


@dataclass
class DicomSeries:
    """One series of a folder, as its files' headers describe it (its first file's, for the attributes)."""

    uid: str
    files: list[str] = field(default_factory=list)
    slices: int = 0  # images: one per single-frame file, NumberOfFrames per multi-frame file
    modality: str = ""
    image_type: tuple[str, ...] = ()
    patient_id: str = ""
    study: str = ""  # StudyID, else StudyDate, else the end of StudyInstanceUID
    number: str = ""  # SeriesNumber
    description: str = ""  # SeriesDescription

    def path(self, folder: str | os.PathLike) -> SeriesPath:
        return SeriesPath(folder, self.uid, self.files)

    def describe(self) -> str:
        """``series 3 "T2 AX" (1.2.840...)``, for the report."""
        number = f" {self.number}" if self.number else ""
        description = f' "{self.description}"' if self.description else ""
        return f"series{number}{description} ({self.uid})"


def _text(value: Any) -> str:
    return str(value).strip() if value is not None else ""


def find_series(files: Sequence[str]) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """The series that the DICOM ``files`` (of one folder) make, by SeriesInstanceUID, in the order of their
    first file's name; and the files that belong to none: ``(path, why)`` for a header that cannot be read or has
    no SeriesInstanceUID."""
    import pydicom

    series: dict[str, DicomSeries] = {}
    orphans: list[tuple[str, str]] = []
    for path in sorted(files):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_TAGS)
            uid = _text(ds.get("SeriesInstanceUID"))
        except Exception as e:  # noqa: BLE001 - any parse error: the file is reported, the folder read on
            orphans.append((path, f"its DICOM header cannot be read ({type(e).__name__}: {' '.join(str(e).split())})"))
            continue
        if not uid:
            orphans.append((path, "no SeriesInstanceUID in its DICOM header"))
            continue
        if uid not in series:
            study = _text(ds.get("StudyID")) or _text(ds.get("StudyDate")) or _text(ds.get("StudyInstanceUID"))[-8:]
            image_type = ds.get("ImageType")
            image_type = (image_type,) if isinstance(image_type, str) else tuple(image_type or ())
            series[uid] = DicomSeries(uid, modality=_text(ds.get("Modality")).upper(),
                                      image_type=tuple(_text(v).upper() for v in image_type),
                                      patient_id=_text(ds.get("PatientID")), study=study,
                                      number=_text(ds.get("SeriesNumber")),
                                      description=_text(ds.get("SeriesDescription")))
        found = series[uid]
        found.files.append(path)
        try:
            found.slices += max(1, int(ds.get("NumberOfFrames") or 1))
        except (TypeError, ValueError):
            found.slices += 1
    return list(series.values()), orphans


def _safe(value: str) -> str:
    """``value`` in the characters of :data:`_UNSAFE`'s complement, without leading dots (hidden files)."""
    return _UNSAFE.sub("-", value).strip("-.")[:_NAME_PART].strip("-.")


def case_names(series: Sequence[DicomSeries], prefix: Sequence[str] = ()) -> list[str]:
    """A case name for each series of one folder: ``<prefix>_<PatientID>_<study>_<SeriesNumber>-<description>``
    (``prefix``: the folders above, as for other inputs), each part in letters, digits, ``.``, ``+`` and ``-``;
    series that would get the same name get the end of their SeriesInstanceUID too."""
    def name(s: DicomSeries, unique: bool) -> str:
        label = "-".join(p for p in (_safe(s.number), _safe(s.description)) if p) or _safe(s.uid[-12:])
        if unique:
            label = f"{label}-{_safe(s.uid[-12:])}"
        return "_".join([*prefix, _safe(s.patient_id) or "patient", _safe(s.study) or "study", label])

    names = [name(s, False) for s in series]
    return [name(s, True) if names.count(n) > 1 else n for s, n in zip(series, names)]


@dataclass(frozen=True)
class SeriesRules:
    """Which DICOM series are segmented; the config's ``series_rules`` overrides any of them.

    Args:
        modalities: the ``Modality`` values taken (``"Modality": ["MR"]``); empty: any. Default: the bundle's
            (``network_data_format.inputs.image.modality`` of its metadata).
        image_type: values the series' ``ImageType`` must all hold (``"ImageType"``); a series without ImageType
            is not refused for it. Default ORIGINAL and PRIMARY: derived images (reformats, maps, screenshots)
            are not segmented.
        localizers: whether a series whose ``ImageType`` says LOCALIZER is segmented (``"localizers"``).
        min_slices: the fewest images a series may have (``"min_slices"``; frames of a multi-frame file count);
            fewer is taken for a localizer or a scout.
    """

    modalities: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    localizers: bool = False
    min_slices: int = 5

    KEYS: ClassVar[dict[str, str]] = {"Modality": "modalities", "ImageType": "image_type", "localizers": "localizers",
            "min_slices": "min_slices"}

    @classmethod
    def from_metadata(cls, metadata: Mapping | None = None, overrides: Mapping | None = None) -> SeriesRules:
        """The rules of a bundle: the modality of its metadata (MONAI's ``_meta_``), the other defaults, and
        ``overrides`` (``{"Modality": ["MR", "CT"], "min_slices": 10}``: the config's ``series_rules``).

        Raises:
            bundletools.settings.ConfigError: an override that is not a rule, or a value it cannot take, naming it.
        """
        try:
            modality = metadata["network_data_format"]["inputs"]["image"]["modality"]  # type: ignore[index]
        except (KeyError, TypeError):
            modality = ""
        rules = {"modalities": (str(modality).upper(),) if modality else ()}
        if overrides is None:
            overrides = {}
        if isinstance(overrides, str):  # JSON, as a command line may hand it over
            try:
                overrides = json.loads(overrides)
            except ValueError as e:
                raise _config_error(f"series_rules: not JSON ({e}): {overrides!r}") from e
        if not isinstance(overrides, Mapping):
            raise _config_error(f"series_rules must be a mapping of rules like {{\"Modality\": [\"MR\"], "
                              f"\"min_slices\": 5}}, got {overrides!r}")
        for key, value in overrides.items():
            if key not in cls.KEYS:
                raise _config_error(f"series_rules: unknown rule {key!r}; the rules are {', '.join(cls.KEYS)}")
            rules[cls.KEYS[key]] = _rule_value(key, value)
        return cls(**rules)

    def rejects(self, series: DicomSeries) -> tuple[str, str] | None:
        """``(rule, why)`` for a series these rules pass over, ``None`` for one they take."""
        if self.modalities and series.modality not in self.modalities:
            return "Modality", f"Modality {series.modality or '(none)'}, not {' or '.join(self.modalities)}"
        image_type = "\\".join(series.image_type)
        if not self.localizers and "LOCALIZER" in series.image_type:
            return "localizers", f"a localizer (ImageType {image_type})"
        missing = [v for v in self.image_type if v not in series.image_type]
        if series.image_type and missing:
            return "ImageType", f"ImageType {image_type}, without {' and '.join(missing)}"
        if series.slices < self.min_slices:
            return "min_slices", (f"{series.slices} image{'s' if series.slices != 1 else ''}, fewer than "
                                  f"min_slices {self.min_slices} (a localizer?)")
        return None

    def describe(self) -> dict:
        """The rules as ``series_rules`` writes them (for the report)."""
        return {"Modality": list(self.modalities), "ImageType": list(self.image_type),
                "localizers": self.localizers, "min_slices": self.min_slices}


def _config_error(message: str) -> Exception:
    from .settings import ConfigError  # torch comes with it; finding series needs neither

    return ConfigError(message)


def _rule_value(key: str, value: Any) -> Any:
    """An override's value as :class:`SeriesRules` holds it."""
    if key in ("Modality", "ImageType"):
        values = [value] if isinstance(value, str) else value
        if values is None:
            return ()
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise _config_error(f"series_rules: {key} takes a list of strings (e.g. [\"MR\", \"CT\"]; [] for any), "
                              f"got {value!r}")
        return tuple(v.strip().upper() for v in values)
    if key == "localizers":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise _config_error(f"series_rules: localizers takes true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _config_error(f"series_rules: min_slices takes a whole number (0 or more), got {value!r}")
    return value
