# SPDX-License-Identifier: Apache-2.0
"""Loading."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.data import ITKReader
from monai.transforms import LoadImaged
from monai.utils import ensure_tuple

__all__ = ["LoadImageSeriesd", "LoadScand"]


class _GDCMSeriesReader(ITKReader):
    """MONAI's ITK reader with ITK's GDCM image IO given explicitly: ITK's IO factory only claims DICOM files with
    the 128-byte preamble, GDCM also reads slices without it. With ``series_uid``, a folder is read as that one of
    its series: the files of that SeriesInstanceUID, in the order ITK sorts them (along the slice normal)."""

    def __init__(self, series_uid: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.series_uid = series_uid

    def read(self, data: Any, **kwargs: Any) -> Any:
        import itk

        if self.series_uid is None:
            return super().read(data, imageio=itk.GDCMImageIO.New(), **kwargs)
        (folder,) = ensure_tuple(data)  # LoadImage hands over a tuple of names
        names = itk.GDCMSeriesFileNames.New()
        names.SetUseSeriesDetails(False)  # one series per SeriesInstanceUID, as bundletools.series groups them
        names.SetGlobalWarningDisplay(False)
        names.SetDirectory(f"{folder}")
        files = list(names.GetFileNames(self.series_uid))
        if not files:
            raise FileNotFoundError(f"{folder}: no DICOM file of the series {self.series_uid}")
        return itk.imread(files if len(files) > 1 else files[0], imageio=itk.GDCMImageIO.New(),
                          **{**self.kwargs, **kwargs})


class LoadImageSeriesd(LoadImaged):
    """MONAI's :class:`~monai.transforms.LoadImaged` that reads a folder (a DICOM series) with ITK's GDCM reader
    given explicitly, so that a series whose slices lack the 128-byte preamble is read as GDCM reads it instead of
    failing ("Could not create IO object"). Files are read exactly as by ``LoadImaged``. ITK is imported only for
    the formats that need it (a series, NRRD, MetaImage): NIfTI is read with nibabel where ITK is not installed.

    A path with a ``series_uid`` (``bundletools.images.SeriesPath``: one series of a folder that holds several)
    is read as that series alone.

    The bundles' inference configs follow it with ``EnsureChannelFirstd``, as model-zoo bundles keep
    ``LoadImaged`` and ``EnsureChannelFirstd`` apart: applications that bring their own volume drop every
    transform whose class name contains ``LoadImage`` (MONAI Deploy's ``MonaiBundleInferenceOperator``) and keep
    the channel axis step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._series_reader: _GDCMSeriesReader | None = None  # made on the first series: it needs ITK

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        if reader is None:
            paths = [data[k] for k in self.key_iterator(data) if isinstance(data[k], (str, os.PathLike))]
            series = {getattr(p, "series_uid", None) for p in paths} - {None}
            if len(series) > 1:
                raise ValueError(f"one call reads one DICOM series, got {len(series)}: {sorted(series)}")
            if series:
                reader = _GDCMSeriesReader(series_uid=series.pop())
            elif any(os.path.isdir(p) for p in paths):
                if self._series_reader is None:
                    self._series_reader = _GDCMSeriesReader()
                reader = self._series_reader
        return super().__call__(data, reader)


LoadScand = LoadImageSeriesd  # its name before: configs written with it keep working
