# SPDX-License-Identifier: Apache-2.0
"""Which model a batch runs: the checkpoint file and the module that takes its weights.

:class:`Checkpoint` loads the weights once per run and gives their SHA-256. The checksum decides whether earlier
outputs are complete (they must come from the same model), goes into the report and the DICOM SEG, and keys what
derives from the weights (the ONNX exports of :mod:`bundletools.runtime`). What runs the network (the module itself,
:class:`networks.wrappers.MonteCarloUncertainty`, ONNX Runtime) is composed around the module in the config, so
the weights go to the module whatever wraps it.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .outputs import BatchError

__all__ = ["Checkpoint"]


class Checkpoint:
    """The weights of ``network``, loaded by :meth:`load`.

    Args:
        path: a state dict saved with ``torch.save``, or ``{"model": state dict}`` (a training state); ``None``
            keeps the module's weights as they are.
        network: the module that takes the weights (its ``module`` when it is wrapped for data parallelism).
    """

    def __init__(self, path: str | os.PathLike | None, network: torch.nn.Module) -> None:
        self.path = path
        self.network = network
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        """SHA-256 of the model: of the checkpoint file as loaded, or of the module's weights without one."""
        if self._sha256 is None:
            raise RuntimeError("the checkpoint is not loaded yet: call load() first")
        return self._sha256

    def load(self) -> str:
        """Load the weights into the module (read once: the checksum is of the very bytes loaded); returns
        :attr:`sha256`.

        Raises:
            FileNotFoundError: there is no file at ``path``.
            BatchError: the file is not a checkpoint of this network (truncated, another network's weights, ...).
        """
        target = getattr(self.network, "module", self.network)
        if self.path is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(target.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._sha256 = digest.hexdigest()
            return self._sha256
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trained model; train the bundle first or pass --ckpt_path <model.pt>")
        try:
            raw = path.read_bytes()
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
                state = state["model"]
            if not isinstance(state, Mapping):
                raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
            target.load_state_dict(state)
        except Exception as e:  # truncated, not a checkpoint, or another network's weights
            message = " ".join(str(e).split())
            raise BatchError(f"{path}: cannot load the model weights (ckpt_path) ({type(e).__name__}: "
                             f"{message[:300]}{'...' if len(message) > 300 else ''})") from e
        self._sha256 = hashlib.sha256(raw).hexdigest()
        return self._sha256
