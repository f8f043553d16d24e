# SPDX-License-Identifier: Apache-2.0
"""The U-KAN bundle's own settings: the paper's learning-rate split and the network options as top-level keys."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from networks import KANConv, KANLinear
from tests.utils import BUNDLES

CONFIGS = BUNDLES / "ukan_segmentation" / "configs"


def parsed(config_id: str, **overrides):
    parser = ConfigParser()
    parser.read_config(CONFIGS / "train.json")
    parser.update(overrides)
    return parser, parser.get_parsed_content(config_id)


def kan_parameter_ids(net: torch.nn.Module) -> set[int]:
    return {id(p) for m in net.modules() if isinstance(m, (KANLinear, KANConv)) for p in m.parameters()}


@pytest.mark.parametrize("options", [{}, {"use_kan_conv": True}, {"token_shift": True}])
def test_optimizer_gives_spline_parameters_the_kan_learning_rate(options):
    parser, optimizer = parsed("optimizer", learning_rate=2e-3, kan_learning_rate=3e-2, **options)
    net = parser.get_parsed_content("network")
    base, kan = optimizer.param_groups
    assert (base["lr"], kan["lr"]) == (2e-3, 3e-2)
    assert base["weight_decay"] == kan["weight_decay"] == parser["weight_decay"]
    assert {id(p) for p in kan["params"]} == kan_parameter_ids(net)
    assert len(base["params"]) + len(kan["params"]) == len(list(net.parameters()))


def test_without_kan_one_group_holds_every_parameter():
    parser, optimizer = parsed("optimizer", use_kan=False)
    net = parser.get_parsed_content("network")
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["lr"] == parser["learning_rate"]
    assert len(optimizer.param_groups[0]["params"]) == len(list(net.parameters()))


def test_cosine_schedule_keeps_the_ratio_of_the_two_learning_rates():
    parser, scheduler = parsed("lr_scheduler", epochs=4)
    optimizer = parser.get_parsed_content("optimizer")
    ratio = parser["kan_learning_rate"] / parser["learning_rate"]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        base, kan = (g["lr"] for g in optimizer.param_groups)
        assert kan == pytest.approx(base * ratio)


@pytest.mark.parametrize(
    "options, expected",
    [({}, 11_053_427), ({"token_shift": True}, 11_053_427), ({"use_kan_conv": True}, 11_509_619),
     ({"use_kan": False}, 7_461_299)],
)
def test_network_options_are_top_level_keys(options, expected):
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    parser.update(options)
    net = parser.get_parsed_content("network_def")
    assert sum(p.numel() for p in net.parameters()) == expected
    assert any(isinstance(m, KANLinear) for m in net.modules()) == options.get("use_kan", True)
    assert any(isinstance(m, KANConv) for m in net.modules()) == options.get("use_kan_conv", False)
