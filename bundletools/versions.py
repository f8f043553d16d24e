# SPDX-License-Identifier: Apache-2.0
"""Bundle versions kept as the MONAI model zoo keeps them: a change to a bundle's configs comes with a new version
and a changelog entry.

Each bundle's ``spec.json`` gives its ``version`` and ``changelog`` (in ``metadata``; the generator writes them into
``configs/metadata.json``, where MONAI, MONAI Label, the batch report and the DICOM SEG read them).
``bundles/versions.json`` records, per bundle, the version last recorded and a SHA-256 of the bundle's configs as
they were then (:func:`configs_sha256`). :func:`version_problems` (a test, ``bundletools-generate --check``) fails
when the configs changed and the version did not; after a bump, ``bundletools-generate --record-versions``
regenerates the configs and records the new version and hash (and refuses to record changed configs under the
version already recorded).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .bundles import bundle_names, bundles_dir

__all__ = ["RECORD", "SEMVER", "configs_sha256", "read_record", "record_versions", "version_problems",
           "VersionError", "BUMP_HINT"]

RECORD = "versions.json"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_GENERATED_KEY = "_generated_"  # the generator's note (generate.GENERATED_KEY): where the file comes from, no setting
_RELEASE_KEYS = ("version", "changelog")  # what a release changes in metadata.json by itself
BUMP_HINT = ("bump its version in spec.json (metadata.version), add a changelog entry, and record the new hash "
             "with `python -m bundletools.generate --record-versions`")


class VersionError(ValueError):
    """Configs changed under a version already recorded."""


def version_key(version: str) -> tuple[int, ...]:
    match = SEMVER.match(str(version))
    if match is None:
        raise ValueError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    return tuple(int(part) for part in match.groups())


def _normalised(path: Path) -> str:
    """What of a config file counts: JSON without the generated note (and, in metadata.json, without the version and
    changelog), keys sorted; other files without comments, blank lines and trailing blanks."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        config = json.loads(text)
        if isinstance(config, dict):
            config.pop(_GENERATED_KEY, None)
            if path.name == "metadata.json":
                for key in _RELEASE_KEYS:
                    config.pop(key, None)
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    lines = (line.rstrip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.lstrip().startswith(("#", ";")))


def configs_sha256(bundle: str | os.PathLike) -> str:
    """SHA-256 of the bundle's ``configs/`` as they act: every file, normalised (:func:`_normalised`)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (Path(bundle) / "configs").iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + _normalised(path).encode() + b"\0")
    return digest.hexdigest()


def _version(bundle: Path) -> str:
    return str(json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8")).get("version", ""))


def read_record(root: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """``bundles/versions.json``: bundle name -> ``{"version", "configs_sha256"}`` ({} when there is none)."""
    path = Path(root if root is not None else bundles_dir()) / RECORD
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}


def version_problems(root: str | os.PathLike | None = None) -> list[str]:
    """One sentence per bundle whose configs or version disagree with ``versions.json``; [] when all agree."""
    root = Path(root if root is not None else bundles_dir())
    record = read_record(root)
    problems = []
    for name in bundle_names(root):
        bundle = root / name
        version, sha = _version(bundle), configs_sha256(bundle)
        known = record.get(name)
        if known is None:
            problems.append(f"{name} {version} is not recorded in {root / RECORD}: record it with "
                            "`python -m bundletools.generate --record-versions`")
        elif known["configs_sha256"] != sha and known["version"] == version:
            problems.append(f"configs of {name} changed since version {version} was recorded: {BUMP_HINT}")
        elif known["version"] != version:
            older = SEMVER.match(version) and version_key(version) < version_key(known["version"])
            problems.append(f"{name} is at version {version}, which is "
                            + (f"older than the recorded {known['version']}" if older else
                               f"not recorded ({known['version']} is): record it with "
                               "`python -m bundletools.generate --record-versions`"))
    for name in sorted(set(record) - set(bundle_names(root))):
        problems.append(f"{root / RECORD} lists {name}, which is not a bundle (no {root / name / 'spec.json'})")
    return problems


def record_versions(root: str | os.PathLike | None = None) -> list[str]:
    """Record the version and configs hash of every bundle in ``versions.json``; returns the names whose entry
    changed. Raises :class:`VersionError` (and records nothing) when a bundle's configs changed under the version
    already recorded, or its version went backwards."""
    root = Path(root if root is not None else bundles_dir())
    record = read_record(root)
    new, refused = {}, []
    for name in bundle_names(root):
        bundle = root / name
        version, sha = _version(bundle), configs_sha256(bundle)
        version_key(version)
        known = record.get(name)
        if known is not None and known["configs_sha256"] != sha and known["version"] == version:
            refused.append(f"configs of {name} changed since version {version} was recorded: bump its version in "
                           "spec.json (metadata.version) and add a changelog entry first")
        elif known is not None and version_key(version) < version_key(known["version"]):
            refused.append(f"{name} is at version {version}, older than the recorded {known['version']}")
        new[name] = {"version": version, "configs_sha256": sha}
    if refused:
        raise VersionError("; ".join(refused))
    changed = [name for name in new if record.get(name) != new[name]]
    note = ("Per bundle, the version last recorded and the SHA-256 of its configs then (bundletools.versions). "
            "Written by `python -m bundletools.generate --record-versions`; a test fails when a bundle's configs "
            "change without a new version.")
    text = json.dumps({"_comment_": note, **new}, indent=4) + "\n"
    if changed or not (root / RECORD).is_file() or (root / RECORD).read_text(encoding="utf-8") != text:
        (root / RECORD).write_text(text, encoding="utf-8")
    return changed
