# SPDX-License-Identifier: Apache-2.0
"""The network of a batch run executed by ONNX Runtime on the CPU (``BatchInference(runtime="onnxruntime")``).

:class:`OnnxRuntimeNetwork` is a drop-in for the network in ``inferer(inputs, network)``: it takes a batch of
windows (a torch tensor) and returns the network's output for them as a torch tensor. On the first batch of a
shape it exports the network to ONNX with ``torch.onnx.export`` (batch axis dynamic, and the spatial axes the
inferer leaves free, such as the slice axis of a 2.5D slab inferer), keeps the file in ``cache_dir`` under a
name made of the model's SHA-256, its structure and that shape, and opens it with ONNX Runtime; later runs of the
same model reuse the file. A model exported beforehand (``python -m monai.bundle onnx_export``) can be given
instead.

Outputs equal the module's up to float rounding (ONNX Runtime fuses and reorders operations), so a voxel whose
two largest class scores differ by about 1e-6 may get the other label.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OnnxRuntimeNetwork", "free_axes"]

logger = logging.getLogger("bundletools.batch")


def free_axes(inferer: Any) -> tuple[int, ...]:
    """The axes of the window batches ``inferer`` passes to the network whose size varies from case to case:
    always the batch axis, plus each spatial axis a sliding-window inferer's ``roi_size`` leaves to the image
    (a size of 0 or less, as in a slab ``[48, 48, -1]``)."""
    roi = getattr(inferer, "roi_size", None)
    axes = [0]
    if roi is not None and not hasattr(inferer, "spatial_dim"):  # SliceInferer: 2D windows of fixed size
        axes += [2 + i for i, size in enumerate(roi) if int(size) <= 0]
    return tuple(axes)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeNetwork:
    """``network`` run by ONNX Runtime; see the module docstring.

    Args:
        network: the module (in eval mode, weights loaded) to export.
        cache_dir: where exported models are kept (created if needed).
        model_sha256: SHA-256 of the weights, part of the cached file's name.
        threads: ONNX Runtime's intra-op threads for one call (1: the call runs on the calling thread, so that
            calls from several threads run side by side).
        dynamic_axes: axes of the input whose size may vary (see :func:`free_axes`).
        onnx_path: a model exported beforehand, used for every shape instead of exporting.
        temp_prefix: prefix of the temporary file an export is written to before it is renamed into place.
    """

    def __init__(self, network: torch.nn.Module, cache_dir: str | os.PathLike, model_sha256: str, threads: int = 1,
                 dynamic_axes: Sequence[int] = (0,), onnx_path: str | os.PathLike | None = None,
                 temp_prefix: str = ".tmp-") -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise ImportError("runtime 'onnxruntime' needs ONNX Runtime: pip install "
                              "'monai-segmentation-bundles[onnx]' (onnx, onnxruntime, onnxscript)") from e
        self.network, self.cache_dir, self.model_sha256 = network, Path(cache_dir), model_sha256
        self.threads, self.dynamic_axes, self.temp_prefix = int(threads), tuple(dynamic_axes), temp_prefix
        self.structure = hashlib.sha256(repr(network).encode()).hexdigest()[:16]
        self._sessions: dict[tuple, Any] = {}
        self._failed: dict[tuple, str] = {}  # an export that failed fails the next cases of that shape at once
        self._lock = threading.Lock()
        if onnx_path is not None:
            if not Path(onnx_path).is_file():
                raise FileNotFoundError(f"{onnx_path}: no such ONNX model")
            self._fixed = _session(Path(onnx_path), self.threads)
        else:
            self._fixed = None

    def _signature(self, shape: Sequence[int]) -> tuple:
        return tuple(-1 if axis in self.dynamic_axes else int(size) for axis, size in enumerate(shape))

    def model_path(self, shape: Sequence[int]) -> Path:
        """Where the model exported for inputs of ``shape`` is cached."""
        signature = "x".join("n" if s < 0 else str(s) for s in self._signature(shape))
        key = hashlib.sha256(f"{self.model_sha256} {self.structure} {signature} torch {torch.__version__}"
                             .encode()).hexdigest()[:24]
        return self.cache_dir / f"model-{key}.onnx"

    def _export(self, example: torch.Tensor, path: Path) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f"{self.temp_prefix}{os.getpid()}-{threading.get_ident()}.onnx"
        names = {axis: f"axis{axis}" for axis in self.dynamic_axes}
        start = time.perf_counter()
        try:
            with torch.no_grad():
                torch.onnx.export(self.network, (example,), str(tmp), input_names=["image"], output_names=["pred"],
                                  dynamic_axes={"image": names, "pred": names}, dynamo=True, external_data=False,
                                  verbose=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info(f"exported the network to ONNX for inputs of shape {tuple(example.shape)} in "
                    f"{time.perf_counter() - start:.0f} s: {path}")

    def session(self, example: torch.Tensor) -> Any:
        """The ONNX Runtime session for inputs like ``example`` (exported and cached on first use)."""
        if self._fixed is not None:
            return self._fixed
        signature = self._signature(example.shape)
        with self._lock:  # one export per shape, even when several threads ask at once
            if signature in self._failed:
                raise RuntimeError(self._failed[signature])
            if signature not in self._sessions:
                path = self.model_path(example.shape)
                try:
                    if not path.is_file():
                        self._export(example, path)
                    self._sessions[signature] = _session(path, self.threads)
                except Exception as e:
                    message = " ".join(str(e).split())[:300]
                    self._failed[signature] = (f"the ONNX export of the network for inputs of shape "
                                               f"{tuple(example.shape)} failed ({type(e).__name__}: {message}); "
                                               "use runtime 'torch'")
                    raise RuntimeError(self._failed[signature]) from e
            return self._sessions[signature]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError("the ONNX Runtime network takes one input tensor")
        x = torch.as_tensor(x)
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        output = self.session(x).run(None, {"image": array})[0]
        return torch.from_numpy(output).to(x.device)
