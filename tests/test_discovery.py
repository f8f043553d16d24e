# SPDX-License-Identifier: Apache-2.0
"""Bundles and networks are found, not listed: every folder of ``bundles/`` with a ``spec.json``
(``bundletools.bundles``) and every module of ``networks/nets`` (``networks.list_networks``). A scratch sixth
bundle, made in a temporary folder, is found by the runner, the benchmarks and the tests with no other file
edited."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bundletools
from bundletools.bundles import bundle_dir, bundle_names, default_task, short_names
from bundletools.generate import generate, render_bundle
from networks import create_network, list_networks
from tests.utils import ALL_BUNDLES, BUNDLES, REPO, assert_network_conventions, subprocess_env


def _spec(root, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "spec.json").write_text(json.dumps({"common": {"network_def": {"_target_": "UNet"}}}))


def test_the_bundles_are_the_folders_with_a_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(bundletools, "REPO_ROOT", tmp_path)
    for name in ("unet_segmentation", "dnet_segmentation"):
        _spec(tmp_path / "bundles", name)
    (tmp_path / "bundles" / "notes").mkdir()  # no spec.json: not a bundle
    assert bundle_names() == ["dnet_segmentation", "unet_segmentation"]
    assert bundle_dir("dnet_segmentation") == tmp_path / "bundles" / "dnet_segmentation"
    for wrong in ("notes", "nope", "../bundles", ""):
        with pytest.raises(FileNotFoundError, match="the bundles are dnet_segmentation, unet_segmentation"):
            bundle_dir(wrong)


def test_short_names_are_the_first_word_unless_it_is_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(bundletools, "REPO_ROOT", tmp_path)
    for name in ("unet_segmentation", "unet_thick_segmentation", "csam_unet_segmentation"):
        _spec(tmp_path / "bundles", name)
    assert short_names() == {"csam_unet_segmentation": "csam", "unet_segmentation": "unet",
                             "unet_thick_segmentation": "unet_thick"}


def test_default_task_is_the_folder_the_bundle_trains_on_by_default(tmp_path, monkeypatch):
    tasks = {name: default_task(name) for name in bundle_names()}
    assert tasks["csam_unet_segmentation"] == "Task04_Hippocampus_thick3mm"
    assert tasks["unet_segmentation"] == "Task04_Hippocampus"

    monkeypatch.setattr(bundletools, "REPO_ROOT", tmp_path)
    _spec(tmp_path / "bundles", "odd_segmentation")
    (tmp_path / "bundles" / "odd_segmentation" / "configs").mkdir()
    train = tmp_path / "bundles" / "odd_segmentation" / "configs" / "train.json"
    train.write_text(json.dumps({"dataset_dir": "$bundletools.default_dataset_dir('MyTask')"}))
    assert default_task("odd_segmentation") == "MyTask"
    train.write_text(json.dumps({"dataset_dir": "/data/MyTask"}))
    with pytest.raises(ValueError, match="must default to .bundletools.default_dataset_dir"):
        default_task("odd_segmentation")


# ------------------------------------------------------------------------------------------- a sixth bundle
SCRATCH = "scratch_segmentation"
SCRATCH_SPEC = {
    "common": {
        "channels": 8,
        "network_def": {"_target_": "networks.nets.scratch_net.ScratchNet", "spatial_dims": 3,
                        "in_channels": "@in_channels", "out_channels": "@num_classes", "channels": "@channels"},
    },
    "metadata": {"version": "0.1.0", "changelog": {"0.1.0": "initial release"},
                 "description": "A scratch bundle: a tiny network, to show what adding a bundle takes."},
}
WATCHED = ("benchmarks", "bundles", "bundletools", "networks", "tests", "transforms", "README.md", "setup.cfg")


def _snapshot() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of the checkout that adding a bundle might have made someone edit."""
    files = [p for name in WATCHED for p in ([REPO / name] if (REPO / name).is_file() else (REPO / name).rglob("*"))]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture
def sixth_bundle(tmp_path, monkeypatch, scratch_network) -> Path:
    """A checkout whose bundles/ holds the five bundles and a scratch sixth, made of its hand-written files only
    (a network file, tests/conftest.py's scratch_network; spec.json; a card) and the configs the generator writes
    from the spec. Yields the scratch bundle's folder; no file of the checkout may have changed afterwards."""
    before = _snapshot()
    repo = tmp_path / "repo"
    (repo / "bundles").mkdir(parents=True)
    for name in bundle_names():
        (repo / "bundles" / name).symlink_to(BUNDLES / name)
    monkeypatch.setattr(bundletools, "REPO_ROOT", repo)
    folder = repo / "bundles" / SCRATCH
    (folder / "docs").mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(SCRATCH_SPEC, indent=4))
    (folder / "docs" / "README.md").write_text(f"# {SCRATCH}: a scratch bundle\n")
    for relative, text in render_bundle(folder).items():  # what `bundletools-generate` writes
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    yield folder
    assert _snapshot() == before, "adding the bundle changed files of the checkout"


def test_a_sixth_bundle_is_found_by_the_runner_the_benchmarks_and_the_tests(sixth_bundle, scratch_network):
    """Adding a bundle is four hand-written files (network module, spec.json, card, network test) plus the
    generated configs: nothing that lists bundles or networks needs an edit, because nothing lists them."""
    names = bundle_names()  # tests.utils.ALL_BUNDLES, batch_inference's and gpu_check's default --bundles
    assert names == sorted([*ALL_BUNDLES, SCRATCH])
    assert bundle_dir(SCRATCH) == sixth_bundle  # the lookup by name (bundletools.bundle_path, the runner's)
    assert bundletools.bundle_path(SCRATCH) == str(sixth_bundle)
    assert default_task(SCRATCH) == "Task04_Hippocampus"  # the data the benchmarks give it
    assert generate(check=True) == []  # the generator walks the same bundles

    # the network: registered by its file, listed with the others, checked like them (tests/networks)
    assert scratch_network in list_networks()
    assert_network_conventions(scratch_network)

    # the benchmarks
    from benchmarks import collection, speed

    configs = speed.configurations()
    assert {"scratch-tiny", "scratch-bundle"} <= set(configs)
    assert {"dnet-official", "dnet-paper", "transunet-r50-vit-b16", "ukan-official", "unet-bundle", "dnet-bundle",
            "transunet-bundle", "ukan-bundle", "csam-bundle"} <= set(configs)
    bundle_config = configs["scratch-bundle"]
    batch = bundle_config.shape()
    assert batch[2:] == json.loads((sixth_bundle / "configs" / "train.json").read_text())["roi_size"]
    with torch.no_grad():
        assert bundle_config.build().eval()(torch.zeros(batch)).shape == (batch[0], 3, *batch[2:])
    entries = {e.key: e for e in collection.bundle_entries(collection.ISO)}
    assert entries["scratch"].bundle == SCRATCH and entries["scratch"].name == SCRATCH


@pytest.mark.slow
def test_the_runner_segments_with_the_sixth_bundle_by_its_name(sixth_bundle, tmp_path):
    """``bundletools.infer <name>``, in a fresh process that sees the scratch bundle and network as the test does."""
    from bundletools.demo import make_synthetic_dataset

    scans = make_synthetic_dataset(tmp_path / "data", num_cases=1, shape=(24, 24, 24)) / "imagesTr"
    ckpt = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(create_network("scratch_tiny").state_dict(), ckpt)
    script = textwrap.dedent(f"""
        from pathlib import Path
        import bundletools, networks.nets
        networks.nets.__path__.append({str(tmp_path / "nets")!r})  # as the scratch_network fixture does
        bundletools.REPO_ROOT = Path({str(sixth_bundle.parents[1])!r})
        from bundletools.infer import main
        main([{SCRATCH!r}, {str(scans)!r}, {str(tmp_path / "out")!r}, "--ckpt_path", {str(ckpt)!r},
              "--num_workers", "0"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out" / "synthetic_000_seg.nii.gz").is_file()
