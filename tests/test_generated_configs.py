# SPDX-License-Identifier: Apache-2.0
"""Bundle configs are generated from bundletools/templates plus each bundle's spec.json: keep them in sync."""

from __future__ import annotations

import json
import re

import pytest
from monai.bundle import ConfigParser

from bundletools.generate import (CONFIG_FILES, EXTENSION_POINTS, GENERATED_KEY, TEMPLATES, generate, main,
                                  render_bundle)
from tests.utils import ALL_BUNDLES, BUNDLES, UNET

TEMPLATE_METADATA = json.loads((TEMPLATES / "metadata.json").read_text())

REQUIRED_TOP_LEVEL = ("bundle_root", "dataset_dir", "output_dir", "ckpt_dir", "device", "num_workers",
                      "network_def", "network")


def test_committed_configs_match_templates_and_specs():
    stale = generate(check=True)
    assert not stale, "run `python -m bundletools.generate`; out of date:\n" + "\n".join(diff for _, diff in stale)


def test_every_bundle_has_the_collection_keys_and_files():
    assert ALL_BUNDLES, "no bundles found"
    for bundle in (BUNDLES / name for name in ALL_BUNDLES):
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


RELEASE = {"version": "0.1.0", "changelog": {"0.1.0": "initial release"}}


def _toy_bundle(tmp_path, spec: dict):
    bundle = tmp_path / "bundles" / "toy_segmentation"
    bundle.mkdir(parents=True)
    spec = {"common": {"network_def": {"_target_": "UNet"}}, **spec}
    spec["metadata"] = {**RELEASE, **spec.get("metadata", {})}  # every bundle has its version and changelog
    (bundle / "spec.json").write_text(json.dumps(spec))
    return bundle


def test_spec_overrides_land_in_the_rendered_config(tmp_path):
    bundle = _toy_bundle(tmp_path, {
        "common": {"network_def": {"_target_": "UNet"}, "extra_key": 3},
        "train": {"epochs": 7, "validate#inferer#overlap": 0.5, "train#trainer#new_argument": 1},
        "metadata": {"version": "9.9.9", "changelog": {"9.9.9": "toy", "0.1.0": "first"},
                     "references": ["Toy paper", TEMPLATE_METADATA["references"][0]]},
    })
    files = render_bundle(bundle)
    train = json.loads(files["configs/train.json"])
    assert train["epochs"] == 7 and train["extra_key"] == 3
    assert list(train).index("datalist") < list(train).index("extra_key") < list(train).index("network_def")
    assert train["validate"]["inferer"]["overlap"] == 0.5 and train["train"]["trainer"]["new_argument"] == 1
    assert "toy_segmentation" in json.dumps(train)
    metadata = json.loads(files["configs/metadata.json"])
    assert metadata["version"] == "9.9.9" and metadata["changelog"] == {"9.9.9": "toy", "0.1.0": "first"}
    assert list(metadata)[:4] == [GENERATED_KEY, "schema", "version", "changelog"]  # where the model zoo has them
    # lists of the metadata are merged: the spec's items first, then the template's it lacks, none twice
    assert metadata["references"] == ["Toy paper", *TEMPLATE_METADATA["references"]]
    # nested lists are values: a spec's shape replaces the template's
    assert metadata["network_data_format"] == TEMPLATE_METADATA["network_data_format"]


def test_extension_points_insert_items_in_place_and_are_empty_by_default(tmp_path):
    extra = {"_target_": "ScaleIntensityd", "keys": "image"}
    bundle = _toy_bundle(tmp_path, {"extend": {"inference": {"before_network_input": [extra]},
                                               "train": {"initialize": ["$print('toy')"]}}})
    files = render_bundle(bundle)
    inference = json.loads(files["configs/inference.json"])
    targets = [t["_target_"] for t in inference["preprocessing"]["transforms"]]
    assert targets[-3:] == ["NormalizeIntensityd", "ScaleIntensityd", "EnsureTyped"]
    train = json.loads(files["configs/train.json"])
    assert train["initialize"] == ["$bundletools.training.set_determinism(seed=@seed, deterministic=@deterministic)",
                                   "$print('toy')"]
    # a point no spec fills leaves nothing behind
    assert "_extension_" not in "".join(files.values())
    assert [t["_target_"] for t in train["train"]["deterministic_transforms"]] == [
        "LoadImaged", "Orientationd", "Spacingd", "NormalizeIntensityd", "EnsureTyped"]
    # every extension point of the generator is in its template, and only those (render_bundle checks both ways)
    for name, points in EXTENSION_POINTS.items():
        text = (TEMPLATES / f"{name}.json").read_text()
        assert sorted(re.findall(r'"_extension_": "(\w+)"', text)) == sorted(points)


@pytest.mark.parametrize("spec, message", [
    ({"inference": {"preprocessing#transforms#5": {}}}, "addresses a list item by its position"),
    ({"train": {"train#dataloadr": 1}}, "does not exist in the template"),
    ({"train": {"validate#nowhere#x": 1}}, "does not exist in the template"),
    ({"extend": {"train": {"after_everything": []}}}, "no extension point 'after_everything'"),
    ({"extend": {"inference": {"after_orientation": {}}}}, "must be a list"),
    ({"trian": {}}, "unknown section(s) ['trian']"),
    ({"metadata": {"version": None}}, "metadata.version must be the bundle's version, MAJOR.MINOR.PATCH"),
    ({"metadata": {"version": "1.0"}}, "MAJOR.MINOR.PATCH (not '1.0')"),
    ({"metadata": {"version": "0.2.0"}}, "metadata.changelog must have an entry for version 0.2.0"),
    ({"metadata": {"version": "0.2.0", "changelog": {"0.1.0": "a", "0.2.0": "b"}}}, "newest first"),
    ({"metadata": {"changelog": {"0.1.0": "a", "first": "b"}}}, "keys must be versions"),
])
def test_bad_spec_is_an_error_naming_the_spec_and_the_id(tmp_path, spec, message):
    bundle = _toy_bundle(tmp_path, spec)
    with pytest.raises((KeyError, TypeError, ValueError)) as e:
        render_bundle(bundle)
    assert message in str(e.value) and str(bundle / "spec.json") in str(e.value)


def test_every_generated_file_says_it_is_generated(tmp_path):
    files = render_bundle(_toy_bundle(tmp_path, {}))
    for rel, text in files.items():
        if rel.endswith(".json"):
            config = json.loads(text)
            assert list(config)[0] == GENERATED_KEY
            assert "bundles/toy_segmentation/spec.json" in config[GENERATED_KEY]
        elif rel.endswith(".conf"):
            assert text.startswith("# Generated by `python -m bundletools.generate`")
    # MONAI reads a config with the key: a workflow's ids resolve as before
    parser = ConfigParser()
    parser.read_config(BUNDLES / UNET / "configs" / "inference.json")
    assert parser.get_parsed_content("sw_overlap") == 0.5 and GENERATED_KEY in parser.get()


def test_check_prints_a_diff_of_each_out_of_date_file(tmp_path, capsys):
    bundle = _toy_bundle(tmp_path, {"train": {"epochs": 7}})
    generate(tmp_path / "bundles")
    assert generate(tmp_path / "bundles", check=True) == []
    train = bundle / "configs" / "train.json"
    train.write_text(train.read_text().replace('"epochs": 7', '"epochs": 8'))
    stale = generate(tmp_path / "bundles", check=True)
    assert [path for path, _ in stale] == [train]
    diff = stale[0][1]
    assert '-    "epochs": 8,' in diff and '+    "epochs": 7,' in diff
    assert main(["--check", "--bundles_dir", str(tmp_path / "bundles")]) == 1
    out = capsys.readouterr().out
    assert f"out of date: {train}" in out and '+    "epochs": 7,' in out
