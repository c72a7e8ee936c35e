"""The deepseek policy: DeepSeek's worked example exactly, valid plans on random shapes, and the
layer-vectorized packing equal to a one-row-at-a-time reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.placement.planner import PlannerSpec, plan_rebalance
from eplb.placement.policy.deepseek import balanced_packing, rebalance_deepseek
from eplb.placement.rules import default_placement, validate_placement


def test_reproduces_the_worked_example_of_deepseeks_readme() -> None:
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phys2log = rebalance_deepseek(weight, num_physical=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert phys2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                 [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def packing_reference(weight: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """One row, plain Python: heaviest first (ties by lower index), to the lightest pack with
    room (ties by lower pack)."""
    per_pack = len(weight) // num_packs
    order = sorted(range(len(weight)), key=lambda i: (-weight[i], i))
    load, count = [0.0] * num_packs, [0] * num_packs
    pack, rank = [0] * len(weight), [0] * len(weight)
    for item in order:
        best = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: (load[p], p))
        pack[item], rank[item] = best, count[best]
        load[best] += weight[item]
        count[best] += 1
    return pack, rank


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_vectorized_packing_matches_the_row_by_row_reference(rows, packs, per_pack, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 1000, (rows, packs * per_pack), generator=gen).float()
    pack, rank = balanced_packing(weight, packs)
    for r in range(rows):
        if per_pack == 1:
            assert pack[r].tolist() == list(range(packs)) and rank[r].tolist() == [0] * packs
            continue
        ref_pack, ref_rank = packing_reference(weight[r].tolist(), packs)
        # Equal weights may be taken in either order; the pack loads must agree exactly.
        loads = torch.zeros(packs).index_add_(0, pack[r], weight[r])
        ref_loads = torch.zeros(packs).index_add_(0, torch.tensor(ref_pack), weight[r])
        assert torch.equal(loads, ref_loads)
        assert torch.bincount(pack[r], minlength=packs).tolist() == [per_pack] * packs
        if len(set(weight[r].tolist())) == weight.shape[1]:  # no ties: identical assignment
            assert pack[r].tolist() == ref_pack and rank[r].tolist() == ref_rank


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 4), (3, 1)]),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_plans_are_valid_for_random_shapes(layers, groups_nodes, group_size, extra, seed) -> None:
    groups, nodes = groups_nodes
    experts = groups * group_size
    gpus = nodes * 2
    physical = gpus * (-(-experts // gpus) + extra - 1)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 500, (layers, experts), generator=gen)
    phys2log = rebalance_deepseek(weight, physical, groups, nodes, gpus)
    validate_placement(phys2log, experts, physical, gpus, layers)


def test_the_planner_runs_the_deepseek_policy_when_asked() -> None:
    gen = torch.Generator().manual_seed(1)
    load = torch.randn(4, 16, generator=gen).exp() * 100
    current = default_placement(4, 16, 24)
    result = plan_rebalance(load, current, 4, 0.0, spec=PlannerSpec("deepseek", 4, 2))
    assert torch.equal(result.phys2log, rebalance_deepseek(load, 24, 4, 2, 4))
    assert result.balancedness_after > result.balancedness_before
    with pytest.raises(ValueError, match="unknown policy"):
        PlannerSpec("magic")
