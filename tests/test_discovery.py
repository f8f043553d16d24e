# SPDX-License-Identifier: Apache-2.0
"""Bundles are found, not listed: every folder of ``bundles/`` with a ``spec.json`` (``bundletools.bundles``)."""

from __future__ import annotations

import json

import pytest

import bundletools
from bundletools.bundles import bundle_dir, bundle_names, default_task, short_names


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
