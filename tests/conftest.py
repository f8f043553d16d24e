# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: real data from ../shared/data, synthetic MSD folders, and a runner for bundle commands."""

from __future__ import annotations

import locale
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundletools.demo import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))
BUNDLES = REPO / "bundles"


def skip_or_fail(message: str, require_var: str) -> None:
    """Skip the test, or fail it when the environment variable ``require_var`` is ``1`` (as CI sets)."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{message} and {require_var}=1")
    pytest.skip(message)


def shared_data(name: str) -> Path:
    """``../shared/data/<name>``; skips without it, fails instead when ``REQUIRE_SHARED_DATA=1`` (CI)."""
    path = SHARED_DATA / name
    if not path.exists():
        skip_or_fail(f"real data {path} is not available", "REQUIRE_SHARED_DATA")
    return path


def shared_schema(name: str) -> Path:
    """``../shared/schemas/<name>`` (MONAI's metadata schema, for offline ``verify_metadata``)."""
    path = SHARED_DATA.parent / "schemas" / name
    if not path.is_file():
        skip_or_fail(f"{path} is not available", "REQUIRE_SHARED_DATA")
    return path


def monailabel_executable() -> Path:
    """The ``monailabel`` command of the MONAI Label venv: ``$MONAILABEL_BIN``, else ``.venv-monailabel/bin/monailabel``
    (``scripts/setup_monailabel.sh``). Skips without it; fails instead when ``REQUIRE_MONAILABEL=1`` (CI)."""
    path = Path(os.environ.get("MONAILABEL_BIN", REPO / ".venv-monailabel" / "bin" / "monailabel"))
    if not path.is_file():
        skip_or_fail(f"MONAI Label is not installed at {path} (bash scripts/setup_monailabel.sh, or set "
                     "MONAILABEL_BIN)", "REQUIRE_MONAILABEL")
    return path


def nnunet_python() -> Path:
    """The python of nnU-Net's venv: ``$NNUNET_PYTHON``, else ``.venv-nnunet/bin/python`` (``scripts/setup_nnunet.sh``).
    Skips without it; fails instead when ``REQUIRE_NNUNET=1``."""
    path = Path(os.environ.get("NNUNET_PYTHON", REPO / ".venv-nnunet" / "bin" / "python"))
    if not os.access(path, os.X_OK):
        skip_or_fail(f"nnU-Net's venv is not there: no {path} (bash scripts/setup_nnunet.sh, or set NNUNET_PYTHON)",
                     "REQUIRE_NNUNET")
    return path


def subprocess_env() -> dict[str, str]:
    """Environment of the commands the tests start: without PYTHONPATH, so that nothing depends on it.

    The one exception is this checkout itself: when the tests were started with it on PYTHONPATH (a git worktree
    of a repository installed in editable mode from elsewhere), the commands must run this checkout's code too.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if str(REPO) in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = str(REPO)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_bundle(args: list[str], cwd: Path, check: bool = True, timeout: int = 900, torchrun: int = 0,
               module: str = "monai.bundle"):
    """Run ``python -m monai.bundle <args>`` (or under torchrun with that many processes) as a user would;
    ``module`` runs another command line the same way."""
    launcher = [sys.executable, "-m", module]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                    "-m", module]
    env = subprocess_env()
    # explicit UTF-8: GDCM (SimpleITK's DICOM I/O, used in-process by some tests) resets the locale to "C", and
    # the default decoding would then be ASCII
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n{proc.output[-6000:]}")
    return proc


def config_list(bundle: str, *names: str) -> str:
    """A ``--config_file`` value: one file, or several merged as MONAI does."""
    files = [str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names]
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


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
