"""Targeted repacking (eplb.placement.policy.stable.repack): what it returns keeps every expert, stays under
the ceiling and the replica limit, and changes only what it must."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.placement.load import gpu_loads, replica_counts
from eplb.placement.policy.stable.reference import plan_from_scratch
from eplb.placement.policy.stable.repack import counts_within_limit, needed, repack_layer


def loads_of(load: list[float], plan: list[int], num_gpus: int) -> list[float]:
    return gpu_loads(torch.tensor([load], dtype=torch.float64), torch.tensor([plan]), num_gpus)[0].tolist()


def test_needed_is_the_fewest_replicas_within_the_limit() -> None:
    assert needed(10.0, 5.0) == 2
    assert needed(10.0, 4.9) == 3
    assert needed(0.0, 1.0) == 1
    assert needed(7.0, 7.0) == 1
    for weight, limit in [(1e6, 3.3), (0.3, 0.1), (5.0, 0.7)]:
        c = needed(weight, limit)
        assert weight / c <= limit < weight / (c - 1) if c > 1 else weight <= limit


def test_replica_counts_keep_current_counts_where_the_limit_allows() -> None:
    # expert 0 needs 3 replicas for limit 4; expert 3's spare is the cheapest to give up
    assert counts_within_limit([12.0, 3.0, 3.0, 1.0], [1, 1, 1, 3], 6, 4.0) == [3, 1, 1, 1]
    assert counts_within_limit([12.0, 3.0], [1, 1], 2, 4.0) is None  # 4 replicas needed, 2 slots


def test_a_hot_pair_is_fixed_with_one_swap() -> None:
    # 3 GPUs x 2 slots; GPU 0 holds the two heaviest experts
    load = [9.0, 8.0, 1.0, 2.0, 5.0, 5.0]
    current = [0, 1, 2, 3, 4, 5]
    plan = repack_layer(load, current, 3, ceiling=11.0, limit=9.0)
    assert plan is not None
    assert max(loads_of(load, plan, 3)) <= 11.0
    assert sorted(plan) == sorted(current)
    assert sum(a != b for a, b in zip(plan, current)) == 2


def test_nothing_changes_when_every_gpu_is_under_the_ceiling() -> None:
    load = [4.0, 1.0, 3.0, 2.0]
    current = [0, 1, 2, 3]
    assert repack_layer(load, current, 2, ceiling=5.0, limit=4.0) == current


def test_an_impossible_ceiling_gives_none() -> None:
    load = [4.0, 4.0, 4.0, 4.0]
    assert repack_layer(load, [0, 1, 2, 3], 2, ceiling=7.0, limit=4.0) is None  # mean load is 8


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(0, 6), st.integers(0, 2**31 - 1),
       st.floats(1.0, 1.3))
def test_a_repacked_layer_is_valid_under_the_ceiling_and_the_limit(gpus, per_gpu, spare, seed,
                                                                  room) -> None:
    slots = gpus * per_gpu
    experts = max(1, slots - spare)
    gen = torch.Generator().manual_seed(seed)
    load_t = (torch.randn(1, experts, generator=gen, dtype=torch.float64) * 0.8).exp() * 100
    # the ceiling and limit of a from-scratch plan, loosened by ``room``
    reference = plan_from_scratch(load_t, slots, gpus)
    ref_counts = replica_counts(reference, experts)[0]
    limit = float((load_t[0] / ref_counts).max()) * room
    ceiling = float(gpu_loads(load_t, reference, gpus).max()) * room
    current = torch.cat([torch.arange(experts), torch.randint(experts, (slots - experts,), generator=gen)])
    current = current[torch.randperm(slots, generator=gen)].tolist()
    load = load_t[0].tolist()
    plan = repack_layer(load, current, gpus, ceiling, limit)
    if plan is None:
        return
    assert len(plan) == slots and set(plan) == set(range(experts))
    assert max(loads_of(load, plan, gpus)) <= ceiling * (1 + 1e-12)
    counts = [plan.count(e) for e in range(experts)]
    assert all(w / c <= limit * (1 + 1e-12) for w, c in zip(load, counts))
    # a GPU takes no second copy of an expert it did not hold twice already
    for g in range(gpus):
        mine, before = plan[g * per_gpu:(g + 1) * per_gpu], current[g * per_gpu:(g + 1) * per_gpu]
        for e in set(mine):
            assert mine.count(e) <= max(1, before.count(e))
