# SPDX-License-Identifier: Apache-2.0
"""The runner's per-case outputs: one writer interface, writers found by name, and the ``outputs`` a config declares.

Every file the runner writes for a case (the segmentation, an uncertainty map, the QC picture, the DICOM SEG) comes
from a :class:`Writer`, in three steps:

- :meth:`Writer.applies`: whether the case has this output at all (the DICOM SEG only for a DICOM series input);
- :meth:`Writer.prepare`: once per run, before any case is read (the DICOM SEG takes its segment names from the
  bundle's metadata); a problem there stops the run before anything is written;
- :meth:`Writer.write`: in the thread that computed the case, takes what it needs from the postprocessed case and
  returns the function that writes the file. :class:`bundletools.outputs.OutputFolder` calls that function with a
  temporary path that has the final extension, then syncs, hashes and renames it into place with the case's other
  outputs, so writers never deal with atomicity, resume or the report.

A config declares the outputs in ``outputs``, by name (the name is the output's key in the report):
``{"pred": {"writer": "image", "postfix": "seg", "dtype": "uint8"}}``. ``writer`` names a class of :data:`WRITERS`
(default ``image``); ``postfix`` and ``ext`` (default the writer's) make the file name ``<case>_<postfix><ext>``;
``enabled`` (default true) switches the output on, so a command-line flag such as ``--qc`` only enables an entry;
``required`` (default true) says whether a case that lacks an optional output (a writer whose failure fails only
itself, such as the DICOM SEG) makes the exit status 2. Every other key is an argument of the writer's class, and
``key``, the entry of the postprocessed case it writes, defaults to the output's name.

A new output format is one module with a :class:`Writer` subclass, one line in :data:`WRITERS` and one entry in
``outputs`` (README, "Adding an output format").
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, resolve_writer

from .settings import ConfigError, flag

__all__ = ["Writer", "ImageWriter", "RunContext", "Output", "declare_outputs", "image_writer", "WRITERS"]

# writer name -> its class as a dotted path, so that a writer's module (and what it needs, such as highdicom) is
# imported only when a config declares an output of it
WRITERS: dict[str, str] = {
    "image": "bundletools.writers.ImageWriter",
    "qc": "bundletools.qc.QCWriter",
    "dicom_seg": "bundletools.dicomseg.DicomSegWriter",
}
_OUTPUT_KEYS = ("writer", "postfix", "ext", "enabled", "required")  # the rest goes to the writer's class


@dataclass(frozen=True)
class RunContext:
    """What a writer may need to know about the run, given once to :meth:`Writer.prepare`.

    Attributes:
        model_sha256: SHA-256 of the model that segments the cases.
        metadata: the bundle's ``metadata.json`` as the config holds it (MONAI's ``_meta_``).
        preprocessing: the inference preprocessing; inverting it maps the preprocessed image back onto the input's
            grid.
    """

    model_sha256: str
    metadata: Mapping[str, Any]
    preprocessing: Callable | None


class Writer:
    """One kind of per-case output; see the module docstring.

    Args:
        key: the entry of the postprocessed case that this writer writes.
    """

    ext = ".nii.gz"  # default extension of its files
    optional = False  # True: a failure fails only this output (the case is "partial"), not the whole case
    title = "the output"  # how a reason names it: "<title> was not written"

    def __init__(self, key: str) -> None:
        self.key = key

    def applies(self, source: Any) -> bool:
        """Whether the case read from ``source`` (a file or a DICOM series folder) has this output."""
        return True

    def prepare(self, run: RunContext) -> None:
        """Called once per run before any case; raise :class:`bundletools.outputs.BatchError` when this output
        cannot be made in this run (the run stops before anything is written)."""

    def write(self, case: Mapping, source: Any) -> Callable[[Path], None]:
        """The function that writes this output of ``case`` (the postprocessed case, read from ``source``) to the
        path it is given. Called in the thread that computed the case: take from ``case`` what the file needs
        (copied to the CPU), so that the rest of the case is freed while the file waits for the writer thread."""
        raise NotImplementedError

    def value(self, case: Mapping) -> Any:
        """``case[key]``, or an error saying that the postprocessing did not produce it."""
        if self.key not in case:
            raise KeyError(f"postprocessing produced no {self.key!r} output")
        return case[self.key]


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


class ImageWriter(Writer):
    """``case[key]`` as an image on the input's grid, with MONAI's writers for the extension (NIfTI with nibabel,
    others with ITK), as ``dtype``.

    Args:
        key: the entry of the postprocessed case to write (channel first, with its ``affine``).
        dtype: the data type of the file (``"uint8"`` for labels).
    """

    def __init__(self, key: str, dtype: str | np.dtype = "float32") -> None:
        super().__init__(key)
        self.dtype = np.dtype(dtype)

    def write(self, case: Mapping, source: Any) -> Callable[[Path], None]:
        return image_writer(self.value(case), self.dtype)


@dataclass(frozen=True)
class Output:
    """One declared output, as the runner uses it.

    Attributes:
        writer: its writer.
        suffix: what follows the case name in its file name (``"_seg.nii.gz"``).
        required: for an optional writer, whether a case that lacks this output makes the exit status 2.
        spec: the declaration, as the report records it.
    """

    writer: Writer
    suffix: str
    required: bool
    spec: dict


def _writer_class(name: str) -> type[Writer]:
    module, _, attribute = WRITERS[name].rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def declare_outputs(outputs: Mapping[str, Mapping]) -> dict[str, Output]:
    """The enabled outputs of a config's ``outputs`` (see the module docstring), in their order.

    Raises:
        ConfigError: an output without ``postfix``, an unknown writer, or arguments its writer cannot take.
    """
    declared = {}
    for name, spec in outputs.items():
        spec = dict(spec)
        if not flag(spec.get("enabled", True), f"outputs#{name}#enabled"):
            continue
        writer_name = spec.get("writer", "image")
        if writer_name not in WRITERS:
            raise ConfigError(f"output {name!r}: unknown writer {writer_name!r}; writers: {sorted(WRITERS)}")
        cls = _writer_class(writer_name)
        ext = spec.get("ext", cls.ext)
        if "postfix" not in spec:
            raise ConfigError(f"output {name!r} needs a 'postfix' (the file name is <case>_<postfix>{ext})")
        options = {"key": name, **{k: v for k, v in spec.items() if k not in _OUTPUT_KEYS}}
        try:
            writer = cls(**options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"output {name!r}: {e}") from e
        required = flag(spec.get("required", True), f"outputs#{name}#required")
        record = {**spec, "writer": writer_name, "ext": ext, "enabled": True, "required": required}
        declared[name] = Output(writer, f"_{spec['postfix']}{ext}", required,
                                json.loads(json.dumps(record, default=str)))
    return declared
