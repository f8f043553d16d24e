# SPDX-License-Identifier: Apache-2.0
"""Loading."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.data import ITKReader
from monai.transforms import LoadImaged

__all__ = ["LoadImageSeriesd", "LoadScand"]


class _GDCMSeriesReader(ITKReader):
    """MONAI's ITK reader with ITK's GDCM image IO given explicitly: ITK's IO factory only claims DICOM files with
    the 128-byte preamble, GDCM also reads slices without it."""

    def read(self, data: Any, **kwargs: Any) -> Any:
        import itk

        return super().read(data, imageio=itk.GDCMImageIO.New(), **kwargs)


class LoadImageSeriesd(LoadImaged):
    """MONAI's :class:`~monai.transforms.LoadImaged` that reads a folder (a DICOM series) with ITK's GDCM reader
    given explicitly, so that a series whose slices lack the 128-byte preamble is read as GDCM reads it instead of
    failing ("Could not create IO object"). Files are read exactly as by ``LoadImaged``. ITK is imported only for
    the formats that need it (a series, NRRD, MetaImage): NIfTI is read with nibabel where ITK is not installed.

    The bundles' inference configs follow it with ``EnsureChannelFirstd``, as model-zoo bundles keep
    ``LoadImaged`` and ``EnsureChannelFirstd`` apart: applications that bring their own volume drop every
    transform whose class name contains ``LoadImage`` (MONAI Deploy's ``MonaiBundleInferenceOperator``) and keep
    the channel axis step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._series_reader: _GDCMSeriesReader | None = None  # made on the first series: it needs ITK

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        if reader is None and any(isinstance(data[k], (str, os.PathLike)) and os.path.isdir(data[k])
                                  for k in self.key_iterator(data)):
            if self._series_reader is None:
                self._series_reader = _GDCMSeriesReader()
            reader = self._series_reader
        return super().__call__(data, reader)


LoadScand = LoadImageSeriesd  # its name before: configs written with it keep working
