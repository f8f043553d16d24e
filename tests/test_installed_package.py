# SPDX-License-Identifier: Apache-2.0
"""The package as pip installs it, not editable, works from any folder: the bundles come with it, so
``bundletools-infer <name>`` and ``python -m bundletools.infer <name>`` find them by name; a copied bundle folder
works by its path; a name found nowhere is one line naming every folder searched (``bundletools.bundles``)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundletools.bundles import PATH_VARIABLE, BundleNotFoundError, bundles_dir, find_bundle, search_path
from tests.utils import BUNDLES, UNET, build_wheel, fresh_venv, random_model, subprocess_env


def _copy_bundle(dest: Path) -> Path:
    shutil.copytree(BUNDLES / UNET, dest, ignore=shutil.ignore_patterns("models", "eval", "segmentations", "runs"))
    return dest


# ------------------------------------------------------------------------------------ the lookup, in-process
def test_a_name_is_found_on_the_search_path_in_order(tmp_path, monkeypatch):
    """The current folder, then each folder of $BUNDLETOOLS_BUNDLES_PATH, then the package's bundles."""
    tmp_path = tmp_path.resolve()  # the lookup answers with resolved folders
    site_a, site_b, cwd = tmp_path / "a", tmp_path / "b", tmp_path / "cwd"
    cwd.mkdir()
    _copy_bundle(site_b / "my_unet")
    _copy_bundle(site_b / UNET)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(PATH_VARIABLE, os.pathsep.join([str(site_a), str(site_b)]))
    assert [p.resolve() for p in search_path()] == [cwd, site_a, site_b, bundles_dir().resolve()]
    assert find_bundle("my_unet") == site_b / "my_unet"
    assert find_bundle(UNET) == site_b / UNET  # the path's copy before the package's own
    _copy_bundle(cwd / UNET)
    assert find_bundle(UNET) == cwd / UNET
    monkeypatch.delenv(PATH_VARIABLE)
    assert find_bundle("../b/my_unet") == site_b / "my_unet"  # a folder, by its path
    shutil.rmtree(cwd / UNET)
    assert find_bundle(UNET) == (bundles_dir() / UNET).resolve()


def test_an_unknown_name_lists_every_folder_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PATH_VARIABLE, str(tmp_path / "missing"))
    with pytest.raises(BundleNotFoundError) as error:
        find_bundle("unet_segmentaton")
    message = str(error.value)
    assert message.startswith("unknown bundle 'unet_segmentaton'")
    assert f"{tmp_path} (no bundles)" in message and f"{tmp_path / 'missing'} (not a folder)" in message
    assert f"{bundles_dir()} (csam_unet_segmentation, " in message and UNET in message
    with pytest.raises(BundleNotFoundError, match="not a bundle folder"):
        find_bundle("some/folder")


# ---------------------------------------------------------------------------- a wheel in a fresh venv
def _scan(path: Path) -> np.ndarray:
    """A small anisotropic, rotated, LPS-ordered scan: a geometry the output must keep exactly."""
    rng = np.random.default_rng(0)
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ rotation @ np.diag([0.9, 1.1, 1.6])
    affine[:3, 3] = [12.0, -30.5, 7.25]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(rng.normal(100, 20, (30, 26, 18)).astype(np.float32), affine), path)
    return affine


def _run(command: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600)


def _assert_segmented(out: Path, scan: Path, affine: np.ndarray) -> dict:
    seg = nib.load(out / "case_seg.nii.gz")
    assert seg.shape == nib.load(scan).shape and np.allclose(seg.affine, affine, atol=1e-5)
    assert seg.get_data_dtype() == np.uint8
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="building the wheel offline (pip wheel --no-build-isolation) needs setuptools here")
def test_wheel_in_a_fresh_venv_segments_by_name_and_by_folder_from_any_folder(tmp_path):
    """``pip wheel`` -> ``pip install`` (not editable) into a new venv that sees torch and MONAI but not this checkout
    -> the console script and ``python -m bundletools.infer`` from an unrelated folder (about 20 s on 2 cores)."""
    python = fresh_venv(tmp_path / "venv")
    wheel = build_wheel(tmp_path / "build")
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}  # nothing points at the checkout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    install = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", wheel],
                   elsewhere, env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    where = _run([python, "-c", "import bundletools, networks, transforms, sysconfig;"
                  "from bundletools.bundles import bundles_dir, bundle_names;"
                  "print(sysconfig.get_paths()['purelib']);"
                  "print(bundletools.__file__, networks.__file__, transforms.__file__, bundles_dir());"
                  "print(*bundle_names())"], elsewhere, env)
    assert where.returncode == 0, where.stderr
    site_dir, modules, names = where.stdout.splitlines()
    assert site_dir.startswith(str(tmp_path / "venv"))
    assert all(path.startswith(site_dir) for path in modules.split()), modules  # not the checkout
    assert names.split() == sorted(p.parent.name for p in BUNDLES.glob("*/spec.json"))

    scan = elsewhere / "IN" / "case.nii.gz"
    affine = _scan(scan)
    model = random_model(UNET, tmp_path / "weights") / "models" / "model.pt"

    # by name: the bundle installed with the package, with a model from elsewhere
    by_name = _run([python.parent / "bundletools-infer", UNET, "IN", "OUT", "--ckpt_path", model,
                    "--num_workers", "0"], elsewhere, env)
    assert by_name.returncode == 0, by_name.stdout[-3000:] + by_name.stderr[-3000:]
    report = _assert_segmented(elsewhere / "OUT", scan, affine)
    assert report["run"]["bundle"]["root"].startswith(site_dir)
    metadata = json.loads((BUNDLES / UNET / "configs" / "metadata.json").read_text())
    assert report["run"]["bundle"]["version"] == metadata["version"]

    # by folder: a copy of the bundle with its own models/model.pt, by a relative path
    copy = _copy_bundle(tmp_path / "copies" / "my_unet")
    (copy / "models").mkdir()
    shutil.copy(model, copy / "models" / "model.pt")
    by_folder = _run([python, "-m", "bundletools.infer", "../copies/my_unet", "IN", "OUT2", "--num_workers", "0"],
                     elsewhere, env)
    assert by_folder.returncode == 0, by_folder.stdout[-3000:] + by_folder.stderr[-3000:]
    assert _assert_segmented(elsewhere / "OUT2", scan, affine)["run"]["bundle"]["root"] == str(copy)

    # a name found nowhere: one line on stderr that names where it looked
    unknown = _run([python.parent / "bundletools-infer", "unet_segmentaton", "IN", "OUT3"], elsewhere, env)
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert f"{site_dir}/bundletools/_bundles ({', '.join(names.split())})" in unknown.stderr
