# SPDX-License-Identifier: Apache-2.0
"""A bundle folder works wherever it is copied, with the code from the installed package.

The user's path: copy ``bundles/<name>`` anywhere (or into MONAI Label's ``model/`` folder) and run
``python -m monai.bundle run ... --config_file <copy>/configs/train.json`` without ``--bundle_root``: models,
evaluation and segmentations go into the copy, nothing into this checkout. Once with the package as the tests
import it (an editable install or this checkout), once from a wheel built from this checkout and installed
(non-editable) into a folder of its own.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import ALL_BUNDLES, BUNDLES, UNET, copy_source, run_bundle, subprocess_env

PACKAGE = "monai-segmentation-bundles"
# top-level modules the configs name -> the distribution that brings them
MODULE_DISTRIBUTIONS = {"bundletools": PACKAGE, "networks": PACKAGE, "transforms": PACKAGE, "ignite": "pytorch-ignite"}
# what MONAI itself reads or writes for the configs without naming a module: NIfTI, DICOM/NRRD/MetaImage,
# TensorBoard logs, ignite's progress bar, the batch runner's QC pictures, the `python -m monai.bundle` command line
IMPLICIT = {"nibabel", "itk", "tensorboard", "tqdm", "pillow", "fire"}
BASE = {"monai", "torch", "numpy"}  # in monai_version, pytorch_version, numpy_version


def _modules_named_in(config) -> set[str]:
    text = json.dumps(config)
    names = set(re.findall(r'"_target_": "([A-Za-z_][\w]*)\.', text))
    names |= set(re.findall(r"\$import ([A-Za-z_]\w*)", text))
    names |= set(re.findall(r"[$ (@]([A-Za-z_]\w*)\.[A-Za-z_]", text)) & {"bundletools", "networks", "transforms"}
    return names


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_metadata_names_every_package_the_configs_need(bundle):
    configs = BUNDLES / bundle / "configs"
    metadata = json.loads((configs / "metadata.json").read_text())
    required = metadata["required_packages_version"]
    modules = set()
    for name in ("train", "evaluate", "inference", "multi_gpu_train"):
        modules |= _modules_named_in(json.loads((configs / f"{name}.json").read_text()))
    assert {"bundletools", "transforms", "ignite"} <= modules  # the regexes do find them
    needed = {MODULE_DISTRIBUTIONS.get(m, m) for m in modules if m not in BASE and m not in sys.stdlib_module_names}
    needed |= IMPLICIT
    assert needed <= set(required), f"missing from required_packages_version: {sorted(needed - set(required))}"
    for name in required:  # every name is a real distribution (installed here)
        importlib.metadata.version(name)
    assert required[PACKAGE] == importlib.metadata.version(PACKAGE)
    # the measured Dice of the default recipe and the budget that reached it
    metrics = metadata["eval_metrics"]
    assert 0.5 < metrics["val_mean_dice"] < 1.0 and "minutes" in metrics["budget"] and "epochs" in metrics["budget"]


def _copy_bundle(name: str, dest: Path) -> Path:
    shutil.copytree(BUNDLES / name, dest, ignore=shutil.ignore_patterns("models", "eval", "segmentations", "runs"))
    return dest


def _wheel_site(tmp_path: Path) -> Path:
    """This checkout's package built as a wheel and installed, not editable, into a folder of its own."""
    src, site = copy_source(tmp_path / "src"), tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True, text=True,
                   timeout=600)
    return site


@pytest.mark.slow
@pytest.mark.parametrize("install", ["tested", "wheel"])
def test_copied_bundle_trains_evaluates_and_infers_in_the_copy(install, tmp_path, synthetic_msd):
    env = subprocess_env()
    if install == "wheel":
        env["PYTHONPATH"] = str(_wheel_site(tmp_path))
    where = subprocess.run([sys.executable, "-c", "import bundletools, networks, transforms, importlib.resources as r;"
                            "print(bundletools.__file__, networks.__file__, transforms.__file__);"
                            "print(r.files('bundletools').joinpath('templates/train.json').is_file())"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    if install == "wheel":  # the code comes from the installed wheel, with its templates
        assert all(p.startswith(str(tmp_path / "site")) for p in where[:3]), where
        assert where[3] == "True"
    checkout_models = BUNDLES / UNET / "models"
    before = sorted(p.stat().st_mtime_ns for p in checkout_models.glob("*")) if checkout_models.exists() else None

    copy = _copy_bundle(UNET, tmp_path / "anywhere" / "my_unet")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    configs = copy / "configs"
    common = ["--dataset_dir", synthetic_msd, "--num_workers", "0"]
    run = dict(cwd=cwd, env=env)
    _run(["run", "training", "--config_file", configs / "train.json", "--epochs", "1", *common], **run)
    assert (copy / "models" / "model.pt").is_file() and (copy / "models" / "training_state.pt").is_file()
    assert list((copy / "eval").glob("events.out.tfevents.*"))
    _run(["run", "--config_file", f"['{configs / 'train.json'}','{configs / 'evaluate.json'}']", *common], **run)
    assert (copy / "eval" / "metrics.csv").is_file()
    _run(["run", "--config_file", configs / "inference.json", *common], **run)
    cases = sorted(p.name.replace(".nii.gz", "") for p in (synthetic_msd / "imagesTr").iterdir())
    assert sorted(p.name for p in (copy / "segmentations").glob("*_seg.nii.gz")) == [f"{c}_seg.nii.gz" for c in cases]
    # nothing went into the checkout or the working directory
    after = sorted(p.stat().st_mtime_ns for p in checkout_models.glob("*")) if checkout_models.exists() else None
    assert after == before
    assert not any(cwd.iterdir())


def _run(args, cwd, env):
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def test_bundle_root_outside_a_workflow_is_a_clear_error():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(BUNDLES / UNET / "configs" / "train.json")
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("ckpt_dir")
    messages = []
    error = e.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    assert any("set bundle_root to the bundle's folder" in m for m in messages), messages
    parser["bundle_root"] = "/somewhere/my_bundle"
    assert parser.get_parsed_content("ckpt_dir") == "/somewhere/my_bundle/models"


@pytest.mark.parametrize("config, workflow_type", [("train.json", "train"), ("inference.json", "infer")])
def test_bundle_root_is_the_folder_of_the_running_configs(tmp_path, config, workflow_type):
    from monai.bundle import ConfigWorkflow

    copy = _copy_bundle("csam_unet_segmentation", tmp_path / "copied")
    workflow = ConfigWorkflow(config_file=str(copy / "configs" / config), logging_file=False,
                              workflow_type=workflow_type)
    workflow.initialize()
    assert workflow.bundle_root == os.path.abspath(copy)  # MONAI's bundle_root property, resolved by the workflow


def test_runtime_needs_neither_simpleitk_nor_einops(tmp_path, synthetic_msd):
    """Only the tests (SimpleITK) and the benchmark's MONAI networks (einops) use them: the package imports, builds
    every bundle's network and checks training data and DICOM series without them."""
    code = f"""
import sys
sys.modules["SimpleITK"] = None  # any import of it fails
sys.modules["einops"] = None
import bundletools, bundletools.data, bundletools.batch, bundletools.qc, networks, transforms
from monai.bundle import ConfigParser
for bundle in {ALL_BUNDLES!r}:
    parser = ConfigParser()
    parser.read_config({str(BUNDLES)!r} + "/" + bundle + "/configs/inference.json")
    parser.get_parsed_content("network_def")
bundletools.data.training_split({str(synthetic_msd)!r}, num_classes=3, in_channels=1)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
