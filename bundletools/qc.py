# SPDX-License-Identifier: Apache-2.0
"""Quality-control pictures of a segmentation: three orthogonal mid-slices with the labels overlaid in colour.

A person checking a batch looks at ``<case>_qc.png`` instead of opening every volume in a viewer. The slices go
through the centre of mass of the labels (the volume centre when nothing was segmented), in the closest RAS
orientation of the scan, shown in physical proportions: sagittal (anterior to the right), coronal and axial
(patient's right on the left of each panel, radiological convention); superior and anterior up.

:class:`QCWriter` is the batch runner's writer of them (``"writer": "qc"`` in a config's ``outputs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from nibabel.orientations import apply_orientation, io_orientation

from .writers import RunContext, Writer

__all__ = ["PALETTE", "QCWriter", "render_qc", "save_qc_png"]

# label 1, 2, ... (cycled for more labels): red, green, blue, yellow, magenta, cyan, orange, purple
PALETTE = np.array(
    [(230, 25, 25), (25, 200, 25), (40, 110, 255), (240, 220, 20), (230, 40, 230), (20, 220, 230), (255, 140, 0),
     (140, 60, 255)],
    dtype=np.float32,
)
_ALPHA = 0.45


def _to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volume in the closest RAS voxel order and its voxel sizes (mm) in that order."""
    ornt = io_orientation(affine)
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ras_sizes = np.empty(3)
    ras_sizes[ornt[:, 0].astype(int)] = sizes
    return apply_orientation(volume, ornt), ras_sizes


def _window(volume: np.ndarray) -> tuple[float, float]:
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    return float(low), float(high) if high > low else float(low) + 1.0


def _panels(image: np.ndarray, label: np.ndarray, sizes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, tuple]]:
    """(grey slice, label slice, (row mm, column mm)) for the sagittal, coronal and axial planes."""
    if label.any():
        centre = np.round(np.argwhere(label > 0).mean(axis=0)).astype(int)
    else:
        centre = np.array(label.shape) // 2
    x, y, z = centre

    def show(plane: np.ndarray, flip_columns: bool) -> np.ndarray:
        # rows: second axis, highest first (superior/anterior up); columns: first axis
        out = np.flipud(plane.T)
        return np.fliplr(out) if flip_columns else out

    panels = []
    for index, flip in ((np.s_[x, :, :], False), (np.s_[:, y, :], True), (np.s_[:, :, z], True)):
        kept = [a for a, s in enumerate(index) if isinstance(s, slice)]
        panels.append((show(image[index], flip), show(label[index], flip), (sizes[kept[1]], sizes[kept[0]])))
    return panels


def render_qc(image: np.ndarray, label: np.ndarray, affine: np.ndarray, size: int = 256):
    """A ``3*size`` x ``size`` RGB :class:`PIL.Image.Image`: sagittal, coronal and axial panels side by side.

    Args:
        image: 3D intensities on the label's voxel grid.
        label: 3D integer labels (0 is background and not drawn).
        affine: voxel-to-world (RAS) matrix of that grid.
        size: side of each square panel in pixels; a slice is scaled to fit it with its physical proportions.
    """
    from PIL import Image

    image, label = np.asarray(image, dtype=np.float32), np.asarray(label)
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"QC needs a 3D image and label on the same grid, got {image.shape} and {label.shape}")
    image, sizes = _to_ras(image, affine)
    label, _ = _to_ras(label, affine)
    low, high = _window(image)
    canvas = Image.new("RGB", (3 * size, size))
    for i, (grey, labels, (row_mm, col_mm)) in enumerate(_panels(image, label, sizes)):
        height_mm, width_mm = grey.shape[0] * row_mm, grey.shape[1] * col_mm
        scale = size / max(height_mm, width_mm)
        shape = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
        grey = np.nan_to_num(np.clip((grey - low) / (high - low), 0.0, 1.0) * 255.0)
        grey = Image.fromarray(grey.astype(np.uint8)).resize(shape, Image.Resampling.BILINEAR)
        grey = np.asarray(grey, dtype=np.float32)
        labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(shape, Image.Resampling.NEAREST))
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for value in np.unique(labels[labels > 0]):
            colour = PALETTE[(int(value) - 1) % len(PALETTE)]
            mask = labels == value
            rgb[mask] = (1.0 - _ALPHA) * rgb[mask] + _ALPHA * colour
        panel = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        canvas.paste(panel, (i * size + (size - shape[0]) // 2, (size - shape[1]) // 2))
    return canvas


def save_qc_png(image: np.ndarray, label: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
                size: int = 256) -> None:
    """Write :func:`render_qc` as a PNG to ``path`` (the caller makes the write atomic)."""
    render_qc(image, label, affine, size).save(path, format="PNG")


def _numpy(x: Any) -> np.ndarray:
    return (x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)).detach().cpu().numpy()


class QCWriter(Writer):
    """``<case>_qc.png``: the labels ``case[key]`` over the image, drawn by :func:`save_qc_png`.

    The image is the preprocessed one mapped back onto the labels' grid (the inverse of the preprocessing, with
    linear interpolation), so the picture shows what the network saw where the labels are.

    Args:
        key: the labels (channel first, with their ``affine``).
        image_key: the preprocessed image in the case.
        size: side of each of the three panels in pixels.
    """

    ext = ".png"

    def __init__(self, key: str = "pred", image_key: str = "image", size: int = 256) -> None:
        super().__init__(key)
        self.image_key, self.size = image_key, int(size)
        self.preprocessing: Callable | None = None

    def prepare(self, run: RunContext) -> None:
        self.preprocessing = run.preprocessing

    def write(self, case: Mapping, source: Any) -> Callable[[Path], None]:
        label, image, transform = self.value(case), case[self.image_key], self.preprocessing

        def write(path: Path) -> None:
            shown = image
            if transform is not None:  # the preprocessed image back on the input's grid, as the label is
                shown = Invertd("_qc_image", transform=transform, orig_keys=self.image_key, nearest_interp=False)(
                    {"_qc_image": image, self.image_key: image})["_qc_image"]
            affine = label.meta["affine"] if isinstance(label, MetaTensor) else np.eye(4)
            save_qc_png(_numpy(shown)[0].astype(np.float32), _numpy(label)[0].round().astype(np.int32),
                        _numpy(affine).astype(np.float64), path, self.size)

        return write
