# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: synthetic MSD folders, a bundle with random weights, the locale kept. The helpers the tests
import are in ``tests/utils.py``."""

from __future__ import annotations

import locale
from pathlib import Path

import pytest

from bundletools.demo import make_synthetic_dataset
from tests.utils import UNET, random_model


@pytest.fixture(autouse=True)
def restore_locale():
    """GDCM (SimpleITK's and ITK's DICOM I/O) sets the process locale to "C" when a test writes or reads a DICOM
    series; Python's default text encoding is then ASCII for the rest of the session. Restore it after each test."""
    saved = locale.setlocale(locale.LC_ALL, None)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(scope="session")
def synthetic_msd(tmp_path_factory) -> Path:
    """A small synthetic MSD folder (6 cases of 32x40x32, labels 0/1/2)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "demo", num_cases=6, shape=(32, 40, 32))


@pytest.fixture(scope="module")
def unet_root(tmp_path_factory) -> Path:
    """A UNet bundle root with randomly initialised (seeded) weights: robustness does not need a trained model."""
    return random_model(UNET, tmp_path_factory.mktemp("unet_random"))
