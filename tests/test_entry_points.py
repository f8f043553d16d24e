# SPDX-License-Identifier: Apache-2.0
"""The console scripts beside ``python -m``: ``bundletools-infer`` and ``bundletools-generate`` (setup.cfg)."""

from __future__ import annotations

import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import REPO, subprocess_env


def console_scripts() -> dict[str, str]:
    """name -> ``module:function`` as setup.cfg declares them."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


def test_each_script_names_the_main_of_its_python_m_module():
    scripts = console_scripts()
    assert scripts == {"bundletools-infer": "bundletools.infer:main",
                       "bundletools-generate": "bundletools.generate:main"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("script, args, expected", [
    ("bundletools-generate", ["--check"], ""),
    ("bundletools-infer", ["--help"], "usage:"),
])
def test_installed_scripts_run(script, args, expected, tmp_path):
    """Where this checkout is installed into the running venv (``pip install -e .``), the scripts run from any
    folder."""
    path = Path(sys.executable).parent / script
    if not path.is_file():
        pytest.skip(f"{script} is not installed next to {sys.executable} (pip install -e .)")
    proc = subprocess.run([str(path), *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expected in proc.stdout
