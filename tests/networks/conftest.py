# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the network tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests: their tensors are tiny, and on the small shared CI machine several
    intra-op threads contend (convolutions ran up to 5x slower) instead of helping."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
