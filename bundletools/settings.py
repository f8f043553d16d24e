# SPDX-License-Identifier: Apache-2.0
"""How a batch runs, whatever the model and the cases, and the runner's settings as configs give them.

:class:`ExecutionSettings` is what lives as long as the process, like the settings of nnU-Net's predictor: the
device and mixed precision, how many cases are in flight and how many threads they share, how many DataLoader
workers read ahead, and the timeout of the process group under ``torchrun``. Which model runs is
:class:`bundletools.model.Checkpoint` and the network the config composes; which cases,
:class:`bundletools.batch.BatchInference`.

:func:`flag` and :func:`whole_number` read a setting as it arrives: ``python -m monai.bundle`` passes ``--qc false``
as the string ``"false"``. A value the runner cannot take is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .outputs import BatchError

__all__ = ["ConfigError", "ExecutionSettings", "flag", "whole_number"]


class ConfigError(BatchError, ValueError):
    """A setting of the runner has a value it cannot take; the message names the key (the batch cannot start)."""


def flag(value: Any, name: str) -> bool:
    """A boolean setting as given in a config or on a command line: ``True``/``False``, or ``"true"``/``"false"``
    in any case."""
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def whole_number(value: Any, name: str, minimum: int = 1) -> int:
    """A count given as a number or its digits (``--parallel_cases 2``), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < minimum:
        raise ConfigError(f"{name} must be a {'positive' if minimum else 'non-negative'} whole number, got {value!r}")
    return int(value)


class ExecutionSettings:
    """How to run a batch.

    Args:
        device: device of the network (one GPU per process under ``torchrun``, from ``LOCAL_RANK``).
        amp: CUDA automatic mixed precision.
        parallel_cases: cases segmented at the same time, each in a thread of its own (the network and the
            postprocessing of one case run while another's are). ``None``: 2 on a CPU with 2 or more threads,
            otherwise 1; never more than the cases to do (a single scan gets every thread). Each case in flight
            holds its image, network output and postprocessed outputs in memory: set 1 for scans that barely fit
            once.
        num_threads: CPU threads of the run: while it runs, torch's intra-op threads are
            ``num_threads // parallel_cases`` (so that the cases in flight share the CPU instead of fighting over
            it) and restored afterwards. ``None``: torch's current number (``torch.get_num_threads()``, which
            follows ``OMP_NUM_THREADS``; torchrun sets 1 per process).
        num_workers: DataLoader workers reading and preprocessing the next cases while one is segmented.
        dist_timeout_s: timeout of the process group created under torchrun (the last rank to finish waits for
            the others at the end; the torch default of 30 minutes is too short for long batches).
    """

    def __init__(self, device: str | torch.device = "cpu", amp: bool = False, parallel_cases: int | None = None,
                 num_threads: int | None = None, num_workers: int = 0, dist_timeout_s: float = 24 * 3600) -> None:
        self.device = torch.device(device)
        self.amp = flag(amp, "amp")
        self.parallel_cases = None if parallel_cases is None else whole_number(parallel_cases, "parallel_cases")
        self.num_threads = None if num_threads is None else whole_number(num_threads, "num_threads")
        self.num_workers = whole_number(num_workers, "num_workers", minimum=0)
        self.dist_timeout_s = dist_timeout_s

    def split(self, cases: int) -> tuple[int, int]:
        """(threads of the run, cases in flight) for ``cases`` cases to do."""
        threads = self.num_threads or torch.get_num_threads()
        parallel = self.parallel_cases or (2 if self.device.type == "cpu" and threads >= 2 else 1)
        return threads, max(1, min(parallel, cases))

    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cuda") if self.amp and self.device.type == "cuda" else nullcontext()

    def init_distributed(self) -> tuple[int, int, bool]:
        """(rank, world size, whether this call created the process group): under torchrun (``WORLD_SIZE`` > 1)
        a group is created unless one exists (gloo on the CPU, NCCL on GPUs)."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1, False
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=self.dist_timeout_s))
        return dist.get_rank(), dist.get_world_size(), True

    def describe(self, threads: int, parallel: int) -> dict:
        """The settings as the report records them, with the threads and cases in flight the run chose."""
        return {"num_workers": self.num_workers, "device": str(self.device), "amp": self.amp,
                "parallel_cases": parallel, "num_threads": threads}
