# SPDX-License-Identifier: Apache-2.0
"""Writers of the runner's outputs: each turns one postprocessed output into a file at a given path.

A writer is any ``callable(path)``; :class:`bundletools.outputs.OutputFolder` calls it with a temporary path that
has the final extension and takes care of syncing and renaming. :func:`image_writer` writes images with MONAI's
writers for the extension (NIfTI with nibabel, others with ITK); another kind of output (a DICOM SEG, say) is
another function returning such a callable, chosen by the output's declared ``writer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, resolve_writer

__all__ = ["image_writer", "WRITERS"]


def _extension(path: Path) -> str:
    name = path.name.lower()
    return "nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1].lstrip(".")


def image_writer(value: torch.Tensor | np.ndarray, dtype: np.dtype) -> Callable[[Path], None]:
    """A writer of the channel-first image ``value`` with its metadata (``affine``) as ``dtype``, without
    resampling.

    Every spatial axis is kept, also a trailing axis of one voxel (MONAI's writers drop trailing singleton axes
    by default, which turns a one-slice volume into a 2D image without its z origin); a single channel is written
    as a volume, several as the writer's vector image.
    """
    meta = dict(value.meta) if isinstance(value, MetaTensor) else {}
    array = (value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)).detach().cpu()

    def write(path: Path) -> None:
        errors = []
        for writer_cls in resolve_writer(_extension(path)):
            try:
                writer = writer_cls(output_dtype=dtype)
                writer.set_data_array(array, channel_dim=0, squeeze_end_dims=False)
                if array.shape[0] == 1:  # one channel: a plain volume (drop only the channel axis)
                    writer.data_obj = writer.data_obj[..., 0]
                    writer.channel_dim = None
                # the affine as it is: no resampling (MONAI 1.6's set_metadata(resample=False) still runs a
                # resampler, which fails on an axis-permuted affine such as a scan stored slice axis first)
                affine = meta.get("affine")
                writer.affine = None if affine is None else np.asarray(affine, dtype=np.float64)
                writer.write(str(path), verbose=False)
                return
            except Exception as e:  # try the next writer for this extension, as MONAI's SaveImage does
                errors.append(e)
        raise errors[0] if errors else RuntimeError(f"no image writer for {path.name}")

    return write


# output spec "writer" -> factory(value, spec, case) of a writer: the output's value, its declared spec and the whole
# postprocessed case (for writers that need more, such as the source image's metadata); "image" is the default
WRITERS: dict[str, Callable[..., Callable[[Path], None]]] = {
    "image": lambda value, spec, case: image_writer(value, spec["dtype"]),
}
