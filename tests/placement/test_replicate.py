"""The replica-count rule every policy shares (eplb.placement.policy.replicate): one top-k gives
exactly what giving one replica at a time to the highest load per replica gives, ties included."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.placement.policy.replicate import replicate_heaviest


def one_at_a_time(load: torch.Tensor, num_physical: int) -> list[list[int]]:
    """The rule as stated, the oracle: ``P - E`` steps, each giving a replica to the first expert
    with the highest ``load / count`` (computed in ``load``'s dtype, as the policies do).
    Returns the expert of each extra replica in order, per row."""
    rows, experts = load.shape
    counts = torch.ones(rows, experts, dtype=torch.int64)
    extra: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(num_physical - experts):
        for row in range(rows):
            key = (load[row] / counts[row]).tolist()
            best = max(range(experts), key=lambda e: (key[e], -e))
            extra[row].append(best)
            counts[row, best] += 1
    return extra


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 12), st.integers(0, 20), st.integers(0, 2**31 - 1),
       st.sampled_from(["ties", "sparse", "lognormal"]), st.sampled_from([torch.float32, torch.float64]))
def test_one_top_k_gives_the_one_at_a_time_replicas_in_their_order(experts, extra, seed, kind, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: equal keys across experts and depths
        load = torch.randint(0, 4, (3, experts), generator=gen).to(dtype)
    else:
        load = (torch.randn(3, experts, generator=gen).exp() * 100).round().to(dtype)
        if kind == "sparse":  # idle experts
            load = load * (torch.rand(3, experts, generator=gen) < 0.5)
    replicas = replicate_heaviest(load, experts + extra)
    assert replicas.extra.tolist() == one_at_a_time(load, experts + extra)
    assert replicas.counts.sum(dim=1).tolist() == [experts + extra] * 3
    assert torch.equal(replicas.counts, torch.ones(3, experts, dtype=torch.int64).scatter_add_(
        1, replicas.extra, torch.ones_like(replicas.extra)))


def test_the_worked_example_of_deepseeks_replicate_experts() -> None:
    replicas = replicate_heaviest(torch.tensor([[10.0, 1.0, 4.0]]), 6)
    assert replicas.extra.tolist() == [[0, 0, 2]]  # 10 > 4, then 5 > 4, then 4 > 3.3
    assert replicas.counts.tolist() == [[3, 1, 2]]
