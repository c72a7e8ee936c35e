"""The planner and the placement rules (invariant I5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.placement.load import balancedness, gpu_loads, overall_balancedness
from eplb.placement.planner import POLICIES, PlannerSpec, plan_placement, plan_rebalance
from eplb.placement.policy.replicate import replicate_heaviest
from eplb.placement.rules import InvalidPlacement, default_placement, validate_placement

sys.path.insert(0, str(Path(__file__).parent))
from placement_helpers import shapes  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(shapes(), st.integers(0, 2**31 - 1))
def test_plans_are_valid_for_random_shapes_and_loads(shape, seed) -> None:
    layers, experts, physical, gpus = shape
    gen = torch.Generator().manual_seed(seed)
    load = (torch.randn(layers, experts, generator=gen).exp() * 100).round()
    phys2log = plan_placement(load, physical, gpus)
    validate_placement(phys2log, experts, physical, gpus, layers)
    assert replicate_heaviest(load, physical).counts.sum(dim=1).tolist() == [physical] * layers


def test_plan_beats_default_placement_on_skewed_load() -> None:
    gen = torch.Generator().manual_seed(3)
    load = torch.randn(8, 64, generator=gen).mul(1.0).exp() * 1000
    current = default_placement(8, 64, 80)
    result = plan_rebalance(load, current, 16, min_gain=0.01)
    assert result.skip_reason == ""
    assert result.balancedness_after > result.balancedness_before + 0.1
    assert result.balancedness_after == pytest.approx(overall_balancedness(load, result.phys2log, 16))
    assert result.experts_moved == int((result.phys2log != current).sum())


@pytest.mark.parametrize("policy", POLICIES)
def test_small_gain_is_skipped_unless_forced(policy: str) -> None:
    spec = PlannerSpec(policy)
    load = torch.ones(2, 8) * 10
    current = default_placement(2, 8, 8)
    skipped = plan_rebalance(load, current, 4, min_gain=0.01, spec=spec)
    assert skipped.skip_reason  # already perfectly balanced
    # GPUs hold {0, 1} {2, 3} {4, 5} {6, 7}: loads 21, 19, 20, 20; pairing 11 with 9 balances
    load[:, 0], load[:, 2] = 11, 9
    result = plan_rebalance(load, current, 4, min_gain=0.5, spec=spec)
    assert "below min_gain" in result.skip_reason
    assert result.balancedness_after == pytest.approx(1.0) and result.experts_moved > 0
    forced = plan_rebalance(load, current, 4, min_gain=0.5, force=True, spec=spec)
    assert forced.skip_reason == "" and forced.balancedness_after == pytest.approx(1.0)


def test_planner_spec_defaults_to_stable_and_checks_max_moves() -> None:
    assert PlannerSpec().policy == "stable" and PlannerSpec().max_moves == 0
    with pytest.raises(ValueError, match="max_moves"):
        PlannerSpec(max_moves=-1)
    with pytest.raises(ValueError, match="current placement"):
        plan_placement(torch.ones(2, 4), 4, 2, current=default_placement(3, 4, 4))


def test_balancedness_is_mean_over_max_gpu_load() -> None:
    phys2log = torch.tensor([[0, 1, 2, 0]])  # expert 0 has two replicas
    load = torch.tensor([[10.0, 4.0, 6.0]])
    # GPU0 slots {0,1}: 5 + 4 = 9; GPU1 slots {2,0}: 6 + 5 = 11
    assert gpu_loads(load, phys2log, 2).tolist() == [[9.0, 11.0]]
    assert balancedness(load, phys2log, 2).tolist() == [pytest.approx(10 / 11)]


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0, 1, 1, 1]]), "no slot for logical experts \\[2\\]"),
    (torch.tensor([[0, 1, 2, 3]]), "range"),
    (torch.tensor([[0, -1, 2, 1]]), "range"),
    (torch.tensor([0, 1, 2, 1]), "\\[L, P\\]"),
    (torch.tensor([[0, 1, 2]]), "3 slots"),
    (torch.tensor([[0.0, 1.0, 2.0, 1.0]]), "integer"),
])
def test_invalid_placements_are_refused_with_the_rule_named(bad, match) -> None:
    with pytest.raises(InvalidPlacement, match=match):
        validate_placement(bad, num_experts=3, num_physical=4, num_gpus=2)


def test_divisibility_is_checked() -> None:
    with pytest.raises(InvalidPlacement, match="not divisible"):
        validate_placement(torch.tensor([[0, 1, 2]]), 3, 3, 2)
