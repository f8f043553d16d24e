# SPDX-License-Identifier: Apache-2.0
"""Bundle configs are generated from bundletools/templates plus each bundle's spec.json: keep them in sync."""

from __future__ import annotations

import json

from bundletools.generate import CONFIG_FILES, generate, render_bundle
from tests.conftest import BUNDLES

REQUIRED_TOP_LEVEL = ("bundle_root", "dataset_dir", "output_dir", "ckpt_dir", "device", "num_workers",
                      "network_def", "network")


def test_committed_configs_match_templates_and_specs():
    stale = generate(check=True)
    assert not stale, f"run `python -m bundletools.generate`; out of date: {[str(p) for p in stale]}"


def test_every_bundle_has_the_collection_keys_and_files():
    bundles = sorted(p.parent for p in BUNDLES.glob("*/spec.json"))
    assert bundles, "no bundles found"
    for bundle in bundles:
        for name in (*CONFIG_FILES, "metadata"):
            assert (bundle / "configs" / f"{name}.json").is_file()
        for name in ("configs/logging.conf", "docs/README.md", "LICENSE"):
            assert (bundle / name).is_file(), f"{bundle.name}: {name} missing"
        train = json.loads((bundle / "configs" / "train.json").read_text())
        inference = json.loads((bundle / "configs" / "inference.json").read_text())
        for key in (*REQUIRED_TOP_LEVEL, "epochs", "val_interval", "run", "training", "initialize"):
            assert key in train, f"{bundle.name}/train.json lacks {key}"
        for key in (*REQUIRED_TOP_LEVEL, "run"):
            assert key in inference, f"{bundle.name}/inference.json lacks {key}"
        assert train["network_def"] == inference["network_def"], "MONAI Label builds network_def from each file"


def test_spec_overrides_land_in_the_rendered_config(tmp_path):
    bundle = tmp_path / "toy_segmentation"
    bundle.mkdir()
    (bundle / "spec.json").write_text(json.dumps({
        "common": {"network_def": {"_target_": "UNet"}, "extra_key": 3},
        "train": {"epochs": 7, "train#handlers#1#print_lr": True},
        "metadata": {"version": "9.9.9"},
    }))
    files = render_bundle(bundle)
    train = json.loads(files["configs/train.json"])
    assert train["epochs"] == 7 and train["extra_key"] == 3
    assert list(train).index("datalist") < list(train).index("extra_key") < list(train).index("network_def")
    assert train["train"]["handlers"][1]["print_lr"] is True
    assert "toy_segmentation" in train["bundle_root"]
    assert json.loads(files["configs/metadata.json"])["version"] == "9.9.9"
