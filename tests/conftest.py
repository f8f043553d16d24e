# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: synthetic MSD folders, a bundle with random weights, the locale kept. The helpers the tests
import are in ``tests/utils.py``."""

from __future__ import annotations

import locale
import sys
from pathlib import Path

import pytest

import networks
from bundletools.demo import make_synthetic_dataset
from tests.utils import SCRATCH_NETWORK, UNET, random_model


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


@pytest.fixture
def scratch_network(tmp_path, monkeypatch) -> str:
    """A new network file, ``scratch_net.py`` (``ScratchNet``, registered as ``scratch_tiny``), in a folder added to
    the path of ``networks.nets``, as if it had been put next to the others. Afterwards the package and the
    registry are as before."""
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / "scratch_net.py").write_text(SCRATCH_NETWORK)
    monkeypatch.setattr(networks.nets, "__path__", [*networks.nets.__path__, str(folder)])
    monkeypatch.setattr(networks.registry, "_REGISTRY", dict(networks.registry._REGISTRY))
    yield "scratch_tiny"
    sys.modules.pop("networks.nets.scratch_net", None)
    if hasattr(networks.nets, "scratch_net"):
        delattr(networks.nets, "scratch_net")
