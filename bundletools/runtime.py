# SPDX-License-Identifier: Apache-2.0
"""The network of a batch run executed by ONNX Runtime on the CPU: a wrapper the config composes around the network.

The config key ``runtime`` chooses what the inferer runs (:func:`runtime_network`): the network itself
(``"torch"``) or :class:`OnnxRuntimeNetwork` around it (``"onnxruntime"``), as the CSAM bundle's ``mc_network``
wraps its network for Monte-Carlo sampling; the runner calls ``inferer(inputs, network)`` either way.

:class:`OnnxRuntimeNetwork` takes a batch of windows (a torch tensor) and returns the network's output for them as
a torch tensor. On the first batch of a shape it exports the network to ONNX with ``torch.onnx.export`` (batch axis
dynamic, and the spatial axes the inferer leaves free, such as the slice axis of a 2.5D slab inferer), keeps the
file in ``cache_dir`` and opens it with ONNX Runtime, with as many intra-op threads as torch has in the calling
thread (the runner gives each case in flight its share); later runs of the same model reuse the file.

The cached file is bound to what it derives from: its name is a digest of the checkpoint's SHA-256, the network's
structure, the input shape and the exporter's versions (torch, onnx, onnxscript), and a manifest next to it
(``model-<key>.json``) holds those and the SHA-256 of the file as exported. A cached file is used only when it is
a regular file (not a link) whose bytes match its manifest, and the session is made from the very bytes checked;
otherwise (changed, foreign, replaced by a link) it is exported again, replacing it. A model exported beforehand
(``python -m monai.bundle onnx_export``) can be given instead (``onnx_path``: the user's file, used as it is, but it
must be a readable ONNX model).

Outputs equal the module's up to float rounding (ONNX Runtime fuses and reorders operations), so a voxel whose
two largest class scores differ by about 1e-6 may get the other label.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import Checkpoint
from .outputs import STATE_DIR, BatchError, new_temp_file, read_regular_file, write_text_atomic
from .report import printable
from .settings import ConfigError

__all__ = ["OnnxRuntimeNetwork", "RUNTIMES", "free_axes", "runtime_network"]

logger = logging.getLogger("bundletools.batch")

RUNTIMES = ("torch", "onnxruntime")


def runtime_network(network: torch.nn.Module, checkpoint: Checkpoint, output_dir: str | os.PathLike,
                    runtime: str = "torch", inferer: Any = None, onnx_path: str | os.PathLike | None = None) -> Any:
    """What the inferer runs: ``network`` itself for ``runtime="torch"``, or :class:`OnnxRuntimeNetwork` around it
    for ``"onnxruntime"``, with its exports cached in the runner's state folder ``output_dir/.batch`` and the
    input axes that ``inferer`` leaves free dynamic (:func:`free_axes`).

    Raises:
        ConfigError: an unknown runtime, an ``onnx_path`` without ONNX Runtime, ONNX Runtime for a network on a GPU
            or for Monte-Carlo sampling (whose dropout must stay random).
    """
    from networks.wrappers import MonteCarloUncertainty

    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        if onnx_path is not None:
            raise ConfigError(f"onnx_path is given ({onnx_path}) but the runtime is {runtime!r}; add runtime "
                              "'onnxruntime' to run the ONNX model")
        return network
    device = next(network.parameters(), torch.empty(0)).device
    if device.type != "cpu":
        raise ConfigError(f"runtime 'onnxruntime' runs on the CPU; the device is {device}")
    if isinstance(network, MonteCarloUncertainty):
        raise ConfigError("runtime 'onnxruntime' cannot run Monte-Carlo dropout sampling (mc_samples > 0): its "
                          "dropout layers must stay random; use runtime 'torch'")
    return OnnxRuntimeNetwork(network, checkpoint, Path(output_dir) / STATE_DIR, dynamic_axes=free_axes(inferer),
                              onnx_path=onnx_path)


def free_axes(inferer: Any) -> tuple[int, ...]:
    """The axes of the window batches ``inferer`` passes to the network whose size varies from case to case:
    always the batch axis, plus each spatial axis a sliding-window inferer's ``roi_size`` leaves to the image
    (a size of 0 or less, as in a slab ``[48, 48, -1]``)."""
    roi = getattr(inferer, "roi_size", None)
    axes = [0]
    if roi is not None and not hasattr(inferer, "spatial_dim"):  # SliceInferer: 2D windows of fixed size
        axes += [2 + i for i, size in enumerate(roi) if int(size) <= 0]
    return tuple(axes)


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _exporter_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for package in ("onnx", "onnxscript"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = ""
    return versions


def _user_model(onnx_path: str | os.PathLike) -> bytes:
    """The bytes of the model the user gave: a regular, readable file (a link to one is the user's choice)."""
    try:
        if not stat.S_ISREG(os.stat(onnx_path).st_mode):
            raise BatchError(f"{onnx_path}: onnx_path is not a regular file")
        with open(onnx_path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BatchError(f"{onnx_path}: onnx_path cannot be read ({e.strerror})") from e


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:300]}{'...' if len(message) > 300 else ''}"


class OnnxRuntimeNetwork:
    """``network`` run by ONNX Runtime; see the module docstring.

    Args:
        network: the module to export (put in eval mode for the export; its weights are loaded by the runner
            before the first call).
        checkpoint: the weights of ``network``; their SHA-256 is part of each export's key.
        cache_dir: where exported models are kept (created on the first export).
        dynamic_axes: axes of the input whose size may vary (see :func:`free_axes`).
        onnx_path: a model exported beforehand, used for every shape instead of exporting.

    Raises:
        BatchError: ONNX Runtime is not installed, or ``onnx_path`` is not a readable ONNX model.
    """

    runtime = "onnxruntime"  # recorded in the report's settings

    def __init__(self, network: torch.nn.Module, checkpoint: Checkpoint, cache_dir: str | os.PathLike,
                 dynamic_axes: Sequence[int] = (0,), onnx_path: str | os.PathLike | None = None) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BatchError("runtime 'onnxruntime' needs ONNX Runtime: pip install "
                             "'monai-segmentation-bundles[onnx]' (onnx, onnxruntime, onnxscript)") from e
        self.network, self.checkpoint, self.cache_dir = network, checkpoint, Path(cache_dir)
        self.dynamic_axes = tuple(dynamic_axes)
        self.structure = hashlib.sha256(repr(network).encode()).hexdigest()
        self.exporter = _exporter_versions()
        self.models: dict[str, str] = {}  # path of each ONNX model run -> its SHA-256, for the report
        self._sessions: dict[tuple, Any] = {}
        self._failed: dict[tuple, str] = {}  # an export that failed fails the next cases of that shape at once
        self._lock = threading.Lock()
        self._user_model: bytes | None = None
        if onnx_path is not None:
            model = _user_model(onnx_path)
            try:  # checked now, so that a bad file stops the run before any case; run with the run's threads
                _session(model, 1)
            except Exception as e:
                raise BatchError(f"{onnx_path}: onnx_path is not an ONNX model ONNX Runtime can load "
                                 f"({_one_line(e)})") from e
            self._user_model = model
            self.models[str(onnx_path)] = hashlib.sha256(model).hexdigest()

    @property
    def provenance(self) -> dict:
        """What the report records of the model that ran: each ONNX model and its SHA-256."""
        return {"onnx": {printable(path): sha for path, sha in self.models.items()}}

    def _signature(self, shape: Sequence[int]) -> tuple:
        return tuple(-1 if axis in self.dynamic_axes else int(size) for axis, size in enumerate(shape))

    def _provenance(self, shape: Sequence[int]) -> dict[str, str]:
        """What a model exported for inputs of ``shape`` derives from (its manifest, less its own checksum)."""
        signature = "x".join("n" if s < 0 else str(s) for s in self._signature(shape))
        return {"model_sha256": self.checkpoint.sha256, "structure": self.structure, "input": signature,
                **self.exporter}

    def model_path(self, shape: Sequence[int]) -> Path:
        """Where the model exported for inputs of ``shape`` is cached."""
        key = hashlib.sha256(json.dumps(self._provenance(shape), sort_keys=True).encode()).hexdigest()[:24]
        return self.cache_dir / f"model-{key}.onnx"

    @staticmethod
    def _manifest(path: Path) -> Path:
        return path.with_suffix(".json")

    def _cached(self, path: Path, provenance: dict[str, str]) -> bytes | None:
        """The cached model's bytes when it is the regular file its manifest describes, exported from what
        ``provenance`` names; ``None`` when there is none or it is not (then it is exported again)."""
        if not os.path.lexists(path):
            return None
        try:
            manifest = json.loads(read_regular_file(self._manifest(path)).decode("utf-8"))
            model = read_regular_file(path)
        except (OSError, ValueError):
            manifest, model = None, b""
        if manifest == {**provenance, "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}:
            return model
        logger.warning(f"{path}: the cached ONNX model does not match its manifest {self._manifest(path).name} "
                       "(changed, replaced, a link, or not exported for this checkpoint, network and exporter); "
                       "exporting the network again")
        return None

    def _export(self, example: torch.Tensor, path: Path, provenance: dict[str, str]) -> bytes:
        """Export the network to ``path`` with its manifest; returns the model's bytes as exported."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_file(self.cache_dir, ".onnx")
        names = {axis: f"axis{axis}" for axis in self.dynamic_axes}
        start = time.perf_counter()
        self.network.eval()
        try:
            with torch.no_grad():
                torch.onnx.export(self.network, (example,), str(tmp), input_names=["image"], output_names=["pred"],
                                  dynamic_axes={"image": names, "pred": names}, dynamo=True, external_data=False,
                                  verbose=False)
            model = read_regular_file(tmp)
            os.replace(tmp, path)  # a link at path is replaced, never written through
        finally:
            tmp.unlink(missing_ok=True)
        manifest = {**provenance, "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}
        write_text_atomic(self._manifest(path), json.dumps(manifest, indent=1))
        logger.info(f"exported the network to ONNX for inputs of shape {tuple(example.shape)} in "
                    f"{time.perf_counter() - start:.0f} s: {path}")
        return model

    def session(self, example: torch.Tensor) -> Any:
        """The ONNX Runtime session for inputs like ``example`` (exported and cached on first use), with torch's
        number of threads in the calling thread."""
        signature = self._signature(example.shape) if self._user_model is None else ()
        threads = torch.get_num_threads()
        with self._lock:  # one export per shape, even when several threads ask at once
            if signature in self._failed:
                raise RuntimeError(self._failed[signature])
            if (signature, threads) not in self._sessions:
                try:
                    if self._user_model is not None:
                        model = self._user_model
                    else:
                        path, provenance = self.model_path(example.shape), self._provenance(example.shape)
                        model = self._cached(path, provenance)
                        if model is None:
                            model = self._export(example, path, provenance)
                        self.models[str(path)] = hashlib.sha256(model).hexdigest()
                    self._sessions[signature, threads] = _session(model, threads)
                except Exception as e:
                    message = " ".join(str(e).split())[:300]
                    self._failed[signature] = (f"the ONNX export of the network for inputs of shape "
                                               f"{tuple(example.shape)} failed ({type(e).__name__}: {message}); "
                                               "use runtime 'torch'")
                    raise RuntimeError(self._failed[signature]) from e
            return self._sessions[signature, threads]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError("the ONNX Runtime network takes one input tensor")
        x = torch.as_tensor(x)
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        output = self.session(x).run(None, {"image": array})[0]
        return torch.from_numpy(output).to(x.device)
