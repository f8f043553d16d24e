# SPDX-License-Identifier: Apache-2.0
"""Bundle versions as the model zoo keeps them: each bundle has its own version and changelog (spec.json ->
metadata.json), and its configs may not change without a new version (``bundles/versions.json`` records the hash
of each version's configs; ``bundletools.versions``)."""

from __future__ import annotations

import json
import shutil

import pytest

from bundletools.generate import generate, main
from bundletools.versions import (BUMP_HINT, SEMVER, VersionError, configs_sha256, read_record, record_versions,
                                  version_key, version_problems)
from tests.utils import ALL_BUNDLES, BUNDLES, UNET


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_each_bundle_has_its_version_and_a_changelog_newest_first(bundle):
    metadata = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    version, changelog = metadata["version"], metadata["changelog"]
    assert SEMVER.match(version) and version_key(version) > (0, 1, 0), version  # not the first release's 0.1.0
    assert list(changelog)[0] == version and list(changelog) == sorted(changelog, key=version_key, reverse=True)
    assert all(len(text) > 20 for text in changelog.values()), changelog
    spec = json.loads((BUNDLES / bundle / "spec.json").read_text())
    assert spec["metadata"]["version"] == version  # where it is set


def test_no_bundle_changed_its_configs_without_a_new_version():
    """Fails when a template or a spec.json changed a bundle's configs and its version stayed the same."""
    problems = version_problems()
    assert not problems, "\n".join(problems)
    assert sorted(read_record()) == ALL_BUNDLES


@pytest.fixture
def bundles(tmp_path):
    """A bundles folder with a copy of the UNet bundle, its version recorded."""
    root = tmp_path / "bundles"
    shutil.copytree(BUNDLES / UNET, root / UNET, ignore=shutil.ignore_patterns("models", "eval", "segmentations"))
    assert version_problems(root) == [f"{UNET} {_version(root)} is not recorded in {root / 'versions.json'}: record "
                                      "it with `python -m bundletools.generate --record-versions`"]
    assert record_versions(root) == [UNET] and version_problems(root) == []
    return root


def _version(root) -> str:
    return json.loads((root / UNET / "configs" / "metadata.json").read_text())["version"]


def _edit_spec(root, change) -> None:
    path = root / UNET / "spec.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec, indent=4))
    generate(root)


def test_a_config_change_needs_a_new_version_and_its_record(bundles, capsys):
    recorded = _version(bundles)
    _edit_spec(bundles, lambda spec: spec["train"].update(epochs=51))
    problem = f"configs of {UNET} changed since version {recorded} was recorded: {BUMP_HINT}"
    assert version_problems(bundles) == [problem]
    assert "bump its version in spec.json" in problem and "--record-versions" in problem
    assert main(["--check", "--bundles_dir", str(bundles)]) == 1 and f"version: {problem}" in capsys.readouterr().out
    with pytest.raises(VersionError, match="bump its version in spec.json"):  # nothing is recorded without a bump
        record_versions(bundles)
    assert read_record(bundles)[UNET]["version"] == recorded

    def bump(spec):
        spec["metadata"]["version"] = "9.0.0"
        spec["metadata"]["changelog"] = {"9.0.0": "51 epochs", **spec["metadata"]["changelog"]}

    _edit_spec(bundles, bump)
    assert version_problems(bundles) == [f"{UNET} is at version 9.0.0, which is not recorded ({recorded} is): "
                                         "record it with `python -m bundletools.generate --record-versions`"]
    assert main(["--record-versions", "--bundles_dir", str(bundles)]) == 0
    assert "recorded: unet_segmentation" in capsys.readouterr().out
    assert version_problems(bundles) == [] and read_record(bundles)[UNET]["version"] == "9.0.0"


def test_the_hash_ignores_the_release_fields_and_the_generated_note(bundles):
    before = configs_sha256(bundles / UNET)
    metadata_path = bundles / UNET / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata.update(version="0.0.1", changelog={"0.0.1": "x"}, _generated_="another note")
    metadata_path.write_text(json.dumps(metadata, indent=2))
    assert configs_sha256(bundles / UNET) == before
    assert version_problems(bundles) == [f"{UNET} is at version 0.0.1, which is older than the recorded "
                                         f"{read_record(bundles)[UNET]['version']}"]
    with pytest.raises(VersionError, match="older than the recorded"):
        record_versions(bundles)
    metadata["description"] = "changed"
    metadata_path.write_text(json.dumps(metadata))
    assert configs_sha256(bundles / UNET) != before  # any other metadata is part of the release
