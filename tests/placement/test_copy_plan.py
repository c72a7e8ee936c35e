"""Property tests of the pure copy planner (eplb.placement.copy_plan)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.placement.copy_plan import (LayerCopyPlan, changed_layers, chunk_layers, plan_copies,
                                      plan_layer)
from eplb.placement.rules import validate_placement

SETTINGS = settings(max_examples=100, deadline=None)


@dataclass(frozen=True)
class Case:
    """A switch ``old -> new`` (both ``[L, P]``) on ``num_gpus`` ranks."""

    old: torch.Tensor
    new: torch.Tensor
    num_experts: int
    num_gpus: int
    ranks_per_node: int

    @property
    def slots(self) -> int:
        return self.old.shape[1] // self.num_gpus

    def plans(self) -> list[LayerCopyPlan]:
        return plan_copies(self.old, self.new, list(range(self.old.shape[0])), self.num_gpus,
                           self.ranks_per_node)


@st.composite
def placement_rows(draw: st.DrawFn, num_experts: int, num_physical: int) -> list[int]:
    """A random ``[P]`` row holding every expert at least once."""
    row = list(draw(st.permutations(range(num_experts))))
    row += draw(st.lists(st.integers(0, num_experts - 1), min_size=num_physical - num_experts,
                         max_size=num_physical - num_experts))
    order = draw(st.permutations(range(num_physical)))
    return [row[i] for i in order]


@st.composite
def next_rows(draw: st.DrawFn, old: list[int], num_experts: int) -> list[int]:
    """A new row related to ``old`` the way rebalances are: fresh, shuffled (swaps and cycles),
    unchanged, or with replicas moved to other experts."""
    mode = draw(st.sampled_from(["fresh", "shuffle", "same", "replicas"]))
    if mode == "fresh":
        return draw(placement_rows(num_experts, len(old)))
    if mode == "shuffle":
        return [old[i] for i in draw(st.permutations(range(len(old))))]
    new = list(old)
    if mode == "replicas":
        seen: set[int] = set()
        for p, expert in enumerate(old):
            if expert in seen and draw(st.booleans()):  # a redundant replica: free to reassign
                new[p] = draw(st.integers(0, num_experts - 1))
            seen.add(expert)
    return new


@st.composite
def cases(draw: st.DrawFn) -> Case:
    num_gpus = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    ranks_per_node = draw(st.sampled_from([d for d in range(1, num_gpus + 1) if num_gpus % d == 0]))
    num_physical = num_gpus * draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, num_physical))
    old_rows, new_rows = [], []
    for _ in range(draw(st.integers(1, 3))):
        old_rows.append(draw(placement_rows(num_experts, num_physical)))
        new_rows.append(draw(next_rows(old_rows[-1], num_experts)))
    old, new = torch.tensor(old_rows), torch.tensor(new_rows)
    for placement in (old, new):  # only valid placements reach the planner
        validate_placement(placement, num_experts, num_physical, num_gpus)
    return Case(old, new, num_experts, num_gpus, ranks_per_node)


def run_plan(plan: LayerCopyPlan, old_row: list[int], max_transfers: int) -> list[int]:
    """Execute ``plan`` on expert ids the way the executor orders it; return the ``[P]`` result.

    Sends read the old contents (staged copy if staged, else the live slot, which must then never
    be written); receives take what the matching send carried; local copies run last.
    """
    s, g = plan.slots_per_gpu, plan.num_gpus
    contents = list(old_row)
    staged = {r: {slot: contents[r * s + slot] for slot in plan.staged_slots(r)} for r in range(g)}
    written = {r: {t.dst_local_slot for t in plan.recvs_of(r)}
               | {c.dst_local_slot for c in plan.local_copies_of(r)} for r in range(g)}

    def old_contents(rank: int, slot: int) -> int:
        if slot in staged[rank]:
            return staged[rank][slot]
        assert slot not in written[rank], f"rank {rank} reads overwritten slot {slot} unstaged"
        return contents[rank * s + slot]

    for batch in plan.batches(max_transfers):
        in_flight: dict[tuple[int, int, int], int] = {}
        for r in range(g):
            for op in plan.ops_for(r, batch):
                if op.kind == "send":
                    in_flight[(r, op.peer, op.index)] = old_contents(r, op.local_slot)
        for r in range(g):
            for op in plan.ops_for(r, batch):
                if op.kind == "recv":
                    contents[r * s + op.local_slot] = in_flight.pop((op.peer, r, op.index))
        assert not in_flight, f"sends without a receive: {in_flight}"
    for c in plan.local_copies:
        src = old_contents(c.rank, c.src_local_slot) if c.from_old else contents[
            c.rank * s + c.src_local_slot]
        contents[c.rank * s + c.dst_local_slot] = src
    return contents


@SETTINGS
@given(cases(), st.integers(1, 5))
def test_executing_the_plan_yields_the_new_placement(case: Case, max_transfers: int) -> None:
    for layer, plan in enumerate(case.plans()):
        result = run_plan(plan, case.old[layer].tolist(), max_transfers)
        assert result == case.new[layer].tolist()


@SETTINGS
@given(cases())
def test_every_receive_has_exactly_one_matching_send(case: Case) -> None:
    for plan in case.plans():
        sends = Counter((op.rank, op.peer, op.index, op.expert)
                        for r in range(case.num_gpus) for op in plan.ops_for(r) if op.kind == "send")
        recvs = Counter((op.peer, op.rank, op.index, op.expert)
                        for r in range(case.num_gpus) for op in plan.ops_for(r) if op.kind == "recv")
        assert sends == recvs
        assert all(n == 1 for n in sends.values())
        assert sum(sends.values()) == len(plan.recvs)
        for t in plan.recvs:
            assert t.src_rank != t.dst_rank


@SETTINGS
@given(cases())
def test_sources_hold_the_expert_in_the_old_placement(case: Case) -> None:
    s = case.slots
    for layer, plan in enumerate(case.plans()):
        old = case.old[layer].tolist()
        for t in plan.recvs:
            assert old[t.src_rank * s + t.src_local_slot] == t.expert
            # Received only when the rank did not already hold the expert.
            assert t.expert not in old[t.dst_rank * s:(t.dst_rank + 1) * s]


@SETTINGS
@given(cases())
def test_exactly_the_changed_slots_are_written_once(case: Case) -> None:
    s = case.slots
    for layer, plan in enumerate(case.plans()):
        old, new = case.old[layer].tolist(), case.new[layer].tolist()
        writes = [t.dst_rank * s + t.dst_local_slot for t in plan.recvs]
        writes += [c.rank * s + c.dst_local_slot for c in plan.local_copies]
        assert sorted(writes) == [p for p in range(len(old)) if old[p] != new[p]]
        for t in plan.recvs:
            assert new[t.dst_rank * s + t.dst_local_slot] == t.expert
        for c in plan.local_copies:
            assert new[c.rank * s + c.dst_local_slot] == c.expert


@SETTINGS
@given(cases())
def test_local_copies_read_old_local_contents_or_a_received_slot(case: Case) -> None:
    s = case.slots
    for layer, plan in enumerate(case.plans()):
        old = case.old[layer].tolist()
        for c in plan.local_copies:
            if c.from_old:
                assert old[c.rank * s + c.src_local_slot] == c.expert
            else:
                assert any(t.dst_rank == c.rank and t.dst_local_slot == c.src_local_slot
                           and t.expert == c.expert for t in plan.recvs)
                assert c.expert not in old[c.rank * s:(c.rank + 1) * s]


@SETTINGS
@given(cases())
def test_a_remote_expert_is_received_once_per_rank(case: Case) -> None:
    for plan in case.plans():
        per_rank = Counter((t.dst_rank, t.expert) for t in plan.recvs)
        assert all(n == 1 for n in per_rank.values())


@SETTINGS
@given(cases())
def test_plan_is_deterministic(case: Case) -> None:
    first, second = case.plans(), case.plans()
    assert first == second
    for a, b in zip(first, second):
        for r in range(case.num_gpus):
            assert a.ops_for(r) == b.ops_for(r)
        assert a.batches(2) == b.batches(2)


@SETTINGS
@given(cases())
def test_a_same_node_holder_is_preferred(case: Case) -> None:
    s, rpn = case.slots, case.ranks_per_node
    for layer, plan in enumerate(case.plans()):
        old = case.old[layer].tolist()
        for t in plan.recvs:
            holders = {p // s for p, e in enumerate(old) if e == t.expert}
            if any(h // rpn == t.dst_rank // rpn for h in holders):
                assert t.src_rank // rpn == t.dst_rank // rpn


@SETTINGS
@given(cases(), st.integers(1, 4))
def test_batches_cover_every_transfer_within_the_cap(case: Case, cap: int) -> None:
    for plan in case.plans():
        batches = plan.batches(cap)
        assert sorted(i for b in batches for i in b) == list(range(len(plan.recvs)))
        for batch in batches:
            for r in range(case.num_gpus):
                assert len(plan.ops_for(r, batch)) <= cap


@SETTINGS
@given(cases())
def test_stats_add_up(case: Case) -> None:
    for plan in case.plans():
        stats = plan.stats(bytes_per_expert=10)
        assert sum(stats.bytes_sent) == sum(stats.bytes_received) == 10 * len(plan.recvs)
        assert sum(stats.p2p_ops) == 2 * len(plan.recvs)
        assert sum(stats.local_copies) == len(plan.local_copies)
        for r in range(case.num_gpus):
            assert stats.p2p_ops[r] == len(plan.ops_for(r))


@SETTINGS
@given(cases())
def test_changed_layers_are_those_with_a_changed_slot(case: Case) -> None:
    changed = changed_layers(case.old, case.new)
    assert changed == [l for l in range(case.old.shape[0]) if not case.plans()[l].is_empty]


def test_holders_share_the_sends() -> None:
    # Expert 0 is on ranks 0 and 1, all on one node; ranks 2 and 3 both need it.
    old = torch.tensor([0, 1, 0, 2, 3, 4, 3, 4])
    new = torch.tensor([0, 1, 0, 2, 3, 0, 4, 0])
    plan = plan_layer(0, old, new, num_gpus=4, ranks_per_node=4)
    assert sorted(t.src_rank for t in plan.recvs if t.expert == 0) == [0, 1]


def test_same_node_wins_over_load() -> None:
    # Nodes {0, 1} and {2, 3}. Rank 2 already sends expert 5 to rank 1, yet rank 3 still takes
    # expert 0 from rank 2 (its node) rather than from the idle rank 0.
    old = torch.tensor([0, 1, 1, 2, 2, 4, 0, 5, 5, 3, 4, 4])
    new = torch.tensor([0, 1, 1, 2, 5, 4, 0, 5, 5, 3, 4, 0])
    plan = plan_layer(0, old, new, num_gpus=4, ranks_per_node=2)
    assert {t.dst_rank: t.src_rank for t in plan.recvs} == {1: 2, 3: 2}


def test_swap_between_ranks_stages_both_sources() -> None:
    old = torch.tensor([0, 1])
    new = torch.tensor([1, 0])
    plan = plan_layer(3, old, new, num_gpus=2, ranks_per_node=2)
    assert plan.staged_slots(0) == [0] and plan.staged_slots(1) == [0]
    assert run_plan(plan, old.tolist(), 1) == new.tolist()


def test_cycle_inside_a_rank_uses_local_copies_only() -> None:
    old = torch.tensor([0, 1, 2, 3])
    new = torch.tensor([1, 2, 0, 3])
    plan = plan_layer(0, old, new, num_gpus=1, ranks_per_node=1)
    assert not plan.recvs and len(plan.local_copies) == 3
    assert plan.staged_slots(0) == [0, 1, 2]
    assert run_plan(plan, old.tolist(), 1) == new.tolist()


def test_a_source_that_keeps_its_expert_is_not_staged() -> None:
    # Rank 0 holds expert 1 twice; slot 1 keeps it, slot 0 turns into expert 2.
    old = torch.tensor([1, 1, 0, 2])
    new = torch.tensor([2, 1, 1, 0])
    plan = plan_layer(0, old, new, num_gpus=2, ranks_per_node=2)
    send = plan.sends_of(0)
    assert [t.src_local_slot for t in send] == [1]
    assert plan.staged_slots(0) == []


def test_missing_expert_is_refused() -> None:
    with pytest.raises(ValueError, match="expert 2"):
        plan_layer(0, torch.tensor([0, 1]), torch.tensor([2, 1]), num_gpus=2, ranks_per_node=1)


@pytest.mark.parametrize(("kwargs", "chunks"), [
    ({"layers_per_chunk": 2}, [[1, 4], [5, 7], [9]]),
    ({"bytes_per_layer": 3, "bytes_per_chunk": 7}, [[1, 4], [5, 7], [9]]),
    ({"bytes_per_layer": 3, "bytes_per_chunk": 1}, [[1], [4], [5], [7], [9]]),
    ({"bytes_per_layer": [1, 9, 1, 1, 1], "bytes_per_chunk": 3}, [[1], [4], [5, 7, 9]]),
    ({"layers_per_chunk": 2, "bytes_per_layer": 1, "bytes_per_chunk": 10}, [[1, 4], [5, 7], [9]]),
])
def test_chunk_layers(kwargs: dict, chunks: list[list[int]]) -> None:
    assert chunk_layers([1, 4, 5, 7, 9], **kwargs) == chunks


def test_chunk_layers_needs_a_limit() -> None:
    with pytest.raises(ValueError):
        chunk_layers([0, 1])
    assert chunk_layers([], layers_per_chunk=3) == []
