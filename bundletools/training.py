# SPDX-License-Identifier: Apache-2.0
"""How a bundle's training runs on its device: determinism or cuDNN's autotuner, and loss scaling for AMP.

Every ``train.json`` calls these in ``initialize``. The defaults are the fast ones on a GPU, and change nothing on a
CPU (cuDNN and loss scaling are CUDA's): see the "Training on a GPU" section of the README for every GPU setting of
the bundles.
"""

from __future__ import annotations

import os

import torch
from monai.utils import set_determinism as monai_set_determinism

__all__ = ["set_determinism", "fit_loss_scaling"]


def set_determinism(seed: int | None, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (MONAI's ``set_determinism``), then choose cuDNN's kernels.

    ``deterministic=False`` (the bundles' default) turns cuDNN's autotuner on: it times the candidate kernels for
    each new input shape once and keeps the fastest, which can differ between runs, so two runs on a GPU may differ
    in the last bits and then drift apart. ``deterministic=True`` keeps MONAI's choice (cuDNN's deterministic
    kernels, no autotuner) and also selects torch's deterministic algorithms (warning, not failing, for an
    operation that has none) with a fixed cuBLAS workspace, so a GPU run repeats exactly, at the price of the
    slower kernels. On a CPU both give the same, repeatable results.
    """
    monai_set_determinism(seed=seed)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matrix products (read when CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def fit_loss_scaling(trainer, amp_dtype: torch.dtype) -> None:
    """Keep loss scaling for float16 AMP only.

    MONAI's ``SupervisedTrainer`` with ``amp=True`` always makes a ``GradScaler``. bfloat16 has float32's range and
    needs no scaling, and the scaler's check for infinite gradients waits for the GPU at every step, which stops the
    host from queueing the next step's work; so under bfloat16 the scaler is replaced by a disabled one (it passes
    the loss and the optimizer step through).
    """
    if getattr(trainer, "scaler", None) is not None and amp_dtype != torch.float16:
        trainer.scaler = torch.amp.GradScaler("cuda", enabled=False)
