# SPDX-License-Identifier: Apache-2.0
"""The recipe search (`python -m benchmarks.recipe_search`): its candidates apply to their bundles' configs, and a
quick CPU search trains, scores and derives candidates end to end and appends them to the table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.utils import REPO, subprocess_env



def _search():
    from benchmarks import recipe_search

    return recipe_search


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.recipe_search", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", cwd=REPO, env=subprocess_env(), timeout=timeout)


def _parser(bundle: str, files: list[str]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / f) for f in files])
    return parser


def test_every_candidate_applies_to_its_bundle(synthetic_msd):
    """Each training candidate's overrides (and its evaluations') resolve on its bundle's configs: the network, the
    loss, the optimizer, the training handlers and transforms, the validation inferer and postprocessing, so a typo
    in the candidates' file shows here, not on the GPU."""
    search = _search()
    spec = search.load_candidates(search.CANDIDATES)
    names = {c["name"] for c in spec["training"]}
    for group in spec["groups"].values():
        assert set(group) <= names
    for candidate in spec["training"]:
        for overrides in [{}, *candidate.get("evaluations", {}).values()]:
            parser = _parser(candidate["bundle"], ["train.json", "evaluate.json"])
            parser.update({"bundle_root": str(REPO / "bundles" / candidate["bundle"]), "dataset_dir": str(synthetic_msd),
                           "check_data": False, "time_budget_s": 60.0})
            search.apply_overrides(parser, candidate)
            search.apply_overrides(parser, overrides)
            for key in ("network_def", "loss", "optimizer", "train#handlers", "train#preprocessing",
                        "validate#inferer", "validate#postprocessing"):
                assert parser.get_parsed_content(key) is not None, (candidate["name"], key)
    refs = [ref for d in spec["derived"] for ref in d.get("ensemble", [])]
    assert all(ref.split("@")[0] in names for ref in refs)
    assert all(d["from"] in names for d in spec["derived"] if "from" in d)


def test_overrides_set_insert_and_wrap():
    search = _search()
    parser = _parser("unet_segmentation", ["train.json"])
    search.apply_overrides(parser, {
        "set": {"network_def#norm": "instance", "learning_rate": 0.01},
        "insert": [{"into": "train#random_transforms", "after": "RandFlipd", "items": [{"_target_": "Identityd",
                                                                                       "keys": "image"}]},
                   {"into": "train#handlers", "items": [{"_target_": "Marker"}]}],
        "wrap": [{"id": "validate#inferer", "as": "inferer", "in": {"_target_": "bundletools.inferers.MirroredInferer",
                                                                    "axes": [0]}}],
    })
    targets = [t["_target_"] for t in parser["train#random_transforms"]]
    assert targets[targets.index("RandFlipd") + 1] == "Identityd"
    assert parser["train#handlers"][-1] == {"_target_": "Marker"}
    assert parser["network_def#norm"] == "instance" and parser["learning_rate"] == 0.01
    inferer = parser.get_parsed_content("validate#inferer")
    assert type(inferer).__name__ == "MirroredInferer" and type(inferer.inferer).__name__ == "SlidingWindowInferer"
    with pytest.raises(ValueError, match="no item with _target_ NoSuchTransform"):
        search.apply_overrides(parser, {"insert": [{"into": "train#random_transforms", "after": "NoSuchTransform",
                                                    "items": []}]})


def test_largest_component_keeps_each_labels_largest_object():
    search = _search()
    labels = np.zeros((10, 10, 4), np.uint8)
    labels[1:4, 1:4, 1:3] = 1
    labels[7, 7, 1] = 1  # a stray voxel of label 1
    labels[5:9, 1:3, 1:3] = 2
    kept = search.largest_component(labels, 3)
    expected = labels.copy()
    expected[7, 7, 1] = 0
    np.testing.assert_array_equal(kept, expected)


def test_a_plan_longer_than_the_limit_is_refused():
    proc = _run(["--device", "cpu", "--only", "unet-default,unet-poly", "--minutes", "6"])
    assert proc.returncode != 0
    assert "4 trainings, 1 at once, of 6 min each (+150 s) need about 35.0 min, over --max_minutes 10" in proc.stderr


@pytest.mark.slow
def test_quick_search_trains_scores_derives_and_appends(tmp_path, synthetic_msd):
    """Two candidates on the CPU with tiny budgets, then their derived candidates (the largest component, the two
    averaged); every result is appended to the CSV, whose earlier rows stay, and the table is written from it."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = "date,device,parallel,candidate,bundle,about,recipe,seed,budget_min,train_s,epochs,dice_mean," \
              "dice_anterior,dice_posterior,hd95_mean_mm,hd95_anterior_mm,hd95_posterior_mm,status,command\n" \
              "2026-01-01 00:00 UTC,cpu,1,old,unet_segmentation,an earlier search,{},0,5,300,9,0.5,0.5,0.5,3,3,3,ok,x\n"
    (out / "recipe_search.csv").write_text(earlier, encoding="utf-8")
    proc = _run(["--device", "cpu", "--quick", "--minutes", "0.4", "--dataset_dir", str(synthetic_msd), "--work_dir",
                 str(tmp_path / "work"), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out / "recipe_search.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["candidate"] == "old"
    found = {r["candidate"]: r for r in rows[1:]}
    assert set(found) == {"unet-default", "unet-poly", "unet-poly+mirror0", "unet-poly+largest",
                          "unet-default + unet-poly averaged"}, found
    for row in found.values():
        assert row["status"] == "ok" and row["device"] == "cpu" and row["seed"] in ("0", "0,0"), row
        assert 0.0 <= float(row["dice_mean"]) <= 1.0 and float(row["train_s"]) > 0
    assert json.loads(found["unet-poly"]["recipe"])["insert"][0]["items"][0]["_target_"] == \
        "bundletools.handlers.PolyLR"
    probabilities = sorted((tmp_path / "work" / "unet-poly" / "seed0" / "eval" / "probabilities").glob("*_prob.nii.gz"))
    assert probabilities, "no class probabilities saved for the derived candidates"
    table = (out / "recipe_search.md").read_text(encoding="utf-8")
    assert table.index("## ") < table.index("| unet-poly+largest | unet_segmentation | 0 |") < \
        table.index("## 2026-01-01 00:00 UTC, cpu")
    assert "| old | unet_segmentation | 0 | 300 | 9 | 0.5 |" in table
