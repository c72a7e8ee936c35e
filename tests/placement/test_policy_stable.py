"""The stable policy: valid plans on random shapes, the max_moves cap, nothing moved when the
current placement is already good enough, balance as good as deepseek's on the benchmark's kinds
of load, and fewer moves than deepseek on a drifting load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.demo.workload import drift_windows, noise_windows, planner_load, random_placement
from eplb.placement.load import overall_balancedness
from eplb.placement.planner import PlannerSpec, plan_placement, plan_rebalance
from eplb.placement.policy.deepseek import rebalance_deepseek
from eplb.placement.policy.stable.align import keep_slots
from eplb.placement.policy.stable.chain import other_holder
from eplb.placement.policy.stable.plan import DEFAULT_TOLERANCE, rebalance_stable
from eplb.placement.policy.stable.reference import argsort_descending, plan_from_scratch
from eplb.placement.rules import default_placement, validate_placement

sys.path.insert(0, str(Path(__file__).parent))
from placement_helpers import align_to_current, net_costs, shapes  # noqa: E402

STABLE = PlannerSpec("stable")


@settings(max_examples=100, deadline=None)
@given(shapes(), st.integers(0, 2**31 - 1), st.integers(0, 12), st.booleans())
def test_plans_are_valid_and_within_the_cap_for_random_shapes(shape, seed, cap, sparse) -> None:
    layers, experts, physical, gpus = shape
    gen = torch.Generator().manual_seed(seed)
    load = (torch.randn(layers, experts, generator=gen).exp() * 100).round()
    if sparse:  # idle experts and ties
        load = load * (torch.rand(layers, experts, generator=gen) < 0.5)
    current = random_placement(layers, experts, physical, gen)
    phys2log = plan_placement(load, physical, gpus, PlannerSpec("stable", max_moves=cap), current)
    validate_placement(phys2log, experts, physical, gpus, layers)
    if cap:
        assert int((phys2log != current).sum()) <= cap
    validate_placement(plan_placement(load, physical, gpus, STABLE), experts, physical, gpus, layers)


def skewed(layers: int, experts: int, seed: int, sigma: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, experts, generator=gen, dtype=torch.float64) * sigma).exp() * 1000


def test_max_moves_caps_the_slots_changed_and_each_cap_still_helps() -> None:
    load = skewed(8, 64, seed=5)
    current = default_placement(8, 64, 80)
    before = overall_balancedness(load, current, 16)
    free = plan_placement(load, 80, 16, STABLE, current)
    assert int((free != current).sum()) > 60  # so the caps below bind
    previous = before
    for cap in (1, 2, 5, 17, 60):
        capped = plan_placement(load, 80, 16, PlannerSpec("stable", max_moves=cap), current)
        validate_placement(capped, 64, 80, 16, 8)
        assert int((capped != current).sum()) <= cap
        after = overall_balancedness(load, capped, 16)
        assert after > before and after >= previous  # a larger cap never balances worse here
        previous = after


def test_a_placement_already_good_enough_is_kept_so_the_same_load_moves_nothing() -> None:
    """The guarantee: when the current placement's balancedness is within the tolerance of the
    from-scratch reference, stable returns it unchanged. Its own uncapped plan always is, so
    planning the same load again moves nothing."""
    load = skewed(6, 64, seed=8)
    current = default_placement(6, 64, 80)
    first = plan_placement(load, 80, 16, STABLE, current)
    assert int((first != current).sum()) > 0
    again = plan_rebalance(load, first, 16, min_gain=0.0, force=True)
    assert again.experts_moved == 0 and again.skip_reason == "the plan equals the current placement"
    reference = plan_from_scratch(load, 80, 16)
    assert torch.equal(rebalance_stable(load, 80, 16, reference), reference)
    # and the tolerance is what it says: the reference is never undercut by more than it
    assert (overall_balancedness(load, first, 16)
            >= overall_balancedness(load, reference, 16) - DEFAULT_TOLERANCE - 1e-12)


def test_alignment_keeps_the_gpus_and_slots_that_do_not_change() -> None:
    current = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])  # GPUs {0,1} {2,3} {4,5} {6,7}
    plan = torch.tensor([[7, 6, 3, 0, 5, 4, 1, 2]])  # {7,6} {3,0} {5,4} {1,2}
    aligned = align_to_current(plan, current, 4)
    # {5,4} and {7,6} match whole GPUs; {3,0} and {1,2} share one expert with {0,1} and {2,3}:
    # only two slots change (the plan as given changes all eight)
    assert int((aligned != current).sum()) == 2 and aligned[0, 4:].tolist() == [4, 5, 6, 7]
    assert sorted(aligned[0, :4].tolist()) == [0, 1, 2, 3]
    assert keep_slots(torch.tensor([[[3, 9, 1]]]), torch.tensor([[[1, 2, 3]]])).tolist() == [[[1, 9, 3]]]


@settings(max_examples=60, deadline=None)
@given(shapes(), st.integers(0, 2**31 - 1))
def test_alignment_only_renumbers_gpus_and_reorders_their_slots(shape, seed) -> None:
    layers, experts, physical, gpus = shape
    gen = torch.Generator().manual_seed(seed)
    plan = random_placement(layers, experts, physical, gen)
    current = random_placement(layers, experts, physical, gen)
    aligned = align_to_current(plan, current, gpus)

    def contents(p: torch.Tensor) -> list[list[tuple[int, ...]]]:
        return [sorted(map(tuple, row.view(gpus, -1).sort(dim=1).values.tolist())) for row in p]

    assert contents(aligned) == contents(plan)
    assert torch.equal(align_to_current(current, current, gpus), current)


# The benchmark's kinds of load (bench/planner.py) at DeepSeek-V3 width, with fewer layers.
LAYERS, EXPERTS, PHYSICAL, GROUPS = 12, 256, 288, 8


def bench_load(kind: str, seed: int) -> torch.Tensor:
    return planner_load(kind, LAYERS, EXPERTS, seed)


def run_drift(gpus: int, nodes: int, kind: str, windows: int, model: str = "pairs"
              ) -> tuple[list[float], list[float], list[int], list[int]]:
    """Balancedness and slots moved per window of the benchmark's drift ``model`` (``pairs`` or
    ``noise``): stable from its own last plan, deepseek from scratch, each counted against the
    placement it served."""
    load = bench_load(kind, seed=gpus)
    drift = (drift_windows(load, windows, seed=gpus + 1) if model == "pairs"
             else noise_windows(load, windows, seed=gpus + 1, sigma=0.1))
    stable = plan_placement(load, PHYSICAL, gpus, STABLE, default_placement(LAYERS, EXPERTS, PHYSICAL))
    deep = rebalance_deepseek(load, PHYSICAL, GROUPS, nodes, gpus)
    b_stable = [overall_balancedness(load, stable, gpus)]
    b_deep = [overall_balancedness(load, deep, gpus)]
    m_stable, m_deep = [], []
    for window in drift:
        s = plan_placement(window, PHYSICAL, gpus, STABLE, stable)
        d = rebalance_deepseek(window, PHYSICAL, GROUPS, nodes, gpus)
        validate_placement(s, EXPERTS, PHYSICAL, gpus, LAYERS)
        b_stable.append(overall_balancedness(window, s, gpus))
        b_deep.append(overall_balancedness(window, d, gpus))
        m_stable.append(int((s != stable).sum()))
        m_deep.append(int((d != deep).sum()))
        stable, deep = s, d
    return b_stable, b_deep, m_stable, m_deep


@pytest.mark.parametrize("model", ["pairs", "noise"])
@pytest.mark.parametrize("gpus, nodes", [(32, 4), (72, 9), (144, 18)])
@pytest.mark.parametrize("kind", ["lognormal=0.5", "lognormal=1.0", "zipf=1.1"])
def test_stable_balances_within_half_a_percent_of_deepseek(gpus: int, nodes: int, kind: str,
                                                          model: str) -> None:
    b_stable, b_deep, m_stable, m_deep = run_drift(gpus, nodes, kind, windows=3, model=model)
    for ours, theirs in zip(b_stable, b_deep):
        assert ours >= theirs - 0.005
    assert sum(m_stable) < sum(m_deep)


def test_on_drift_stable_moves_at_most_a_third_of_hierarchical_deepseek() -> None:
    _, _, m_stable, m_deep = run_drift(32, 4, "lognormal=1.0", windows=3)
    assert 3 * sum(m_stable) <= sum(m_deep)


@pytest.mark.parametrize("gpus, nodes, kind, share", [(144, 18, "lognormal=1.0", 0.48),
                                                     (72, 9, "zipf=1.1", 0.68)])
def test_on_drift_the_repair_chain_finishes_layers_instead_of_falling_back(gpus, nodes, kind, share) -> None:
    """With every GPU as a swap target (few slots per GPU), a longer chain and costs net of the
    chain's earlier changes, stable moves clearly fewer slots than the from-scratch plan where it
    used to fall back to the aligned reference (before: 0.56 and 0.80 of deepseek's here)."""
    b_stable, b_deep, m_stable, m_deep = run_drift(gpus, nodes, kind, windows=3)
    assert all(ours >= theirs - 0.005 for ours, theirs in zip(b_stable, b_deep))
    assert sum(m_stable) <= share * sum(m_deep)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_net_costs_are_the_change_in_slots_moved_of_each_candidate(layers, experts, per_gpu, seed) -> None:
    """Each candidate applied to the chain's state changes ``(state != current).sum()`` by
    exactly its net cost: a swap by -2..2, a split by -1..1."""
    gen = torch.Generator().manual_seed(seed)
    gpus = 3
    slots = gpus * per_gpu
    current = torch.randint(experts, (layers, slots), generator=gen)
    # the chain's state: current with some slots changed (a few given back later by a candidate)
    state = torch.where(torch.rand(layers, slots, generator=gen) < 0.5,
                        torch.randint(experts, (layers, slots), generator=gen), current)
    hot = torch.randint(gpus, (layers, 1), generator=gen)
    source = hot * per_gpu + torch.arange(per_gpu)
    target = torch.randint(slots, (layers, 5), generator=gen)
    donor = torch.randint(slots, (layers, 4), generator=gen)
    es = state.gather(1, source)
    got = net_costs(state, current, source, target, donor, es)
    assert got.shape == (layers, per_gpu, 9)
    for layer in range(layers):
        before = int((state[layer] != current[layer]).sum())
        for i in range(per_gpu):
            src = int(source[layer, i])
            for c in range(9):
                after = state[layer].clone()
                if c < 5:  # swap src with target c
                    dst = int(target[layer, c])
                    after[src], after[dst] = state[layer, dst], state[layer, src]
                else:  # split: the donor slot takes src's expert
                    after[int(donor[layer, c - 5])] = state[layer, src]
                assert float(got[layer, i, c]) == int((after != current[layer]).sum()) - before


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_other_holder_is_the_max_over_the_other_listed_slots_of_the_expert(width, experts, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    slot = torch.randint(0, 2 * width, (2, width), generator=gen)
    expert = slot % experts  # a slot listed twice has one expert
    gpu = (torch.rand(2, 2 * width, generator=gen, dtype=torch.float64) * 4).round().gather(1, slot)
    got = other_holder(slot, expert, gpu, torch.zeros(2, experts, dtype=torch.float64))
    for row in range(2):
        for i in range(width):
            others = [float(gpu[row, j]) for j in range(width)
                      if int(expert[row, j]) == int(expert[row, i]) and int(slot[row, j]) != int(slot[row, i])]
            assert float(got[row, i]) == max(others, default=0.0)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31 - 1), st.sampled_from(["ties", "zeros", "wide", "negative"]))
def test_argsort_descending_is_the_stable_float_argsort(rows, width, seed, kind) -> None:
    """The int64 sort keys give torch's stable descending argsort exactly: ties in index order,
    -0.0 equal to 0.0, tiny and huge values; a negative value takes the float sort."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (rows, width), generator=gen).double()  # many ties
    if kind == "zeros":  # 0.0 and -0.0 mixed with ties
        values = torch.where(torch.rand(rows, width, generator=gen) < 0.5, -0.0, values)
    elif kind == "wide":
        values = values * torch.tensor([1e-300, 1.0, 1e300, float("inf")]).repeat(width)[:width]
    elif kind == "negative":
        values[0, 0] = -1.0
    assert torch.equal(argsort_descending(values), values.argsort(dim=1, descending=True, stable=True))


def test_on_noise_drift_the_repack_takes_the_place_of_the_aligned_reference() -> None:
    """When every load moves a little, dozens of GPUs per layer are over the ceiling and the chain
    stops short; a targeted repack then changes far fewer slots than the aligned reference (before
    the repack stable moved 0.51 of deepseek's slots here, now 0.28)."""
    b_stable, b_deep, m_stable, m_deep = run_drift(144, 18, "lognormal=0.5", windows=3, model="noise")
    assert all(ours >= theirs - 0.005 for ours, theirs in zip(b_stable, b_deep))
    assert sum(m_stable) <= 0.35 * sum(m_deep)
