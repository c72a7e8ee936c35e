"""Example-based tests of the worker's side of the step agreement (:class:`WorkerAgreement`,
DESIGN.md §4, invariants I1 and I5). Plain values only: no sockets, no engine, no mocks."""

from __future__ import annotations

import pytest
import torch

from eplb.placement.rules import default_placement, placement_hash
from eplb.placement.copy_plan import plan_copies
from eplb.proto import Abort, Commit, Done, Plan, PlanAck, Prepare, Promise, Refuse
from eplb.proto.reasons import RefuseCode
from eplb.worker_hook.agreement import (
    CopyChunk, Hold, LandChunk, Prefetch, StartChunk, WorkerAgreement, WorkerState,
    chunk_changed_layers,
)

L, E, P, G = 4, 4, 8, 2
RANK = 1
EPOCH = 3
S = 20


def current_placement() -> torch.Tensor:
    return default_placement(L, E, P)  # [L, P], slot p holds expert p % E


def changed_placement(layers=(0, 2, 3)) -> torch.Tensor:
    """The current placement with slots 0 and 5 swapped in ``layers`` (experts 0 and 1 trade
    places between the two GPUs), still valid."""
    new = current_placement()
    for layer in layers:
        new[layer, 0], new[layer, 5] = int(new[layer, 5]), int(new[layer, 0])
    return new


def plan_for(phys2log: torch.Tensor, epoch: int = EPOCH, layers_per_chunk: int = 2,
             plan_hash: str | None = None) -> Plan:
    return Plan(epoch=epoch, phys2log=phys2log,
                plan_hash=placement_hash(phys2log) if plan_hash is None else plan_hash,
                layers_per_chunk=layers_per_chunk)


def new_worker() -> WorkerAgreement:
    return WorkerAgreement(RANK, E, G, current_placement())


def planned(plan: Plan | None = None, step: int = 10) -> WorkerAgreement:
    w = new_worker()
    out = w.on_message(plan or plan_for(changed_placement()), step)
    assert out == [PlanAck(rank=RANK, epoch=(plan or plan_for(changed_placement())).epoch,
                           step=step)]
    return w


def promised(plan: Plan | None = None, step: int = S - 5) -> WorkerAgreement:
    w = planned(plan)
    assert w.on_message(Prepare(epoch=w.epoch, step=S), step) == [Promise(rank=RANK, epoch=w.epoch)]
    return w


def worker_state(w: WorkerAgreement) -> tuple:
    return (w.state, w.epoch, w.switch_step, w.phys2log.clone().tolist(), w.pending_done)


# --- PLAN ---------------------------------------------------------------------------------------

def test_a_valid_plan_is_acked_with_the_current_step_and_changes_no_placement():
    w = new_worker()
    out = w.on_message(plan_for(changed_placement()), 11)
    assert out == [PlanAck(rank=RANK, epoch=EPOCH, step=11)]
    assert w.state is WorkerState.PLANNED and w.epoch == EPOCH
    assert torch.equal(w.phys2log, current_placement())
    assert w.actions_at(12) == ()


def test_the_worker_keeps_its_own_copy_of_the_initial_placement():
    initial = current_placement()
    w = WorkerAgreement(RANK, E, G, initial)
    initial[0, 0] = 3
    assert torch.equal(w.phys2log, current_placement())


def _invalid_plans():
    missing = changed_placement()
    missing[1][missing[1] == 3] = 0  # expert 3 has no slot in layer 1
    yield "missing expert", plan_for(missing)
    yield "one layer too many", plan_for(torch.cat([changed_placement(), changed_placement()[:1]]))
    yield "two slots too few", plan_for(changed_placement()[:, : P - 2].contiguous())
    yield "one-dimensional", plan_for(changed_placement().flatten())
    out_of_range = changed_placement()
    out_of_range[2, 3] = E
    yield "expert id out of range", plan_for(out_of_range)
    negative = changed_placement()
    negative[0, 0] = -1
    yield "negative expert id", plan_for(negative)
    yield "float dtype", plan_for(changed_placement().to(torch.float32))
    yield "hash mismatch", plan_for(changed_placement(), plan_hash=placement_hash(current_placement()))


@pytest.mark.parametrize("plan", [p for _, p in _invalid_plans()], ids=[n for n, _ in _invalid_plans()])
def test_an_invalid_plan_is_refused_and_changes_nothing(plan):
    w = new_worker()
    before = worker_state(w)
    out = w.on_message(plan, 11)
    assert len(out) == 1 and isinstance(out[0], Refuse)
    assert out[0].rank == RANK and out[0].epoch == EPOCH and out[0].step == 11
    assert "invalid plan" in out[0].reason and out[0].code is RefuseCode.INVALID_PLAN
    assert worker_state(w) == before
    # Nobody can act on it afterwards: no promise, no copies.
    assert isinstance(w.on_message(Prepare(epoch=EPOCH, step=S), 12)[0], Refuse)
    assert w.on_message(Commit(epoch=EPOCH, step=S), 12) == []
    for step in range(12, S + 5):
        assert w.actions_at(step) == ()
    assert worker_state(w) == before


def test_a_plan_while_promised_or_copying_is_refused_as_busy():
    w = promised()
    state = worker_state(w)
    out = w.on_message(plan_for(changed_placement((1,)), epoch=EPOCH + 1), 16)
    assert len(out) == 1 and isinstance(out[0], Refuse) and "busy" in out[0].reason
    assert out[0].epoch == EPOCH + 1
    assert worker_state(w) == state
    assert w.actions_at(S) == (Hold(epoch=EPOCH, step=S),)

    w.on_message(Commit(epoch=EPOCH, step=S), 17)
    state = worker_state(w)
    out = w.on_message(plan_for(changed_placement((1,)), epoch=EPOCH + 1), 18)
    assert isinstance(out[0], Refuse) and "busy" in out[0].reason
    assert worker_state(w) == state


# --- PREPARE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [0, 10, S - 1])
def test_promise_when_the_current_step_is_below_s(step):
    w = planned()
    assert w.on_message(Prepare(epoch=EPOCH, step=S), step) == [Promise(rank=RANK, epoch=EPOCH)]
    assert w.state is WorkerState.PROMISED and w.switch_step == S


@pytest.mark.parametrize("step", [S, S + 1, S + 100])
def test_refuse_when_the_current_step_is_at_or_past_s(step):
    w = planned()
    out = w.on_message(Prepare(epoch=EPOCH, step=S), step)
    assert out == [Refuse(rank=RANK, epoch=EPOCH, step=step, reason=out[0].reason)]
    assert str(S) in out[0].reason
    assert w.state is WorkerState.PLANNED, "a refusal promises nothing"
    assert w.actions_at(step + 1) == ()
    # A COMMIT that somehow arrives anyway is ignored: no copies without a promise.
    assert w.on_message(Commit(epoch=EPOCH, step=S), step + 1) == []
    assert w.actions_at(step + 2) == ()


def test_prepare_without_a_plan_or_for_another_epoch_is_refused():
    w = new_worker()
    out = w.on_message(Prepare(epoch=EPOCH, step=S), 5)
    assert len(out) == 1 and isinstance(out[0], Refuse) and out[0].epoch == EPOCH
    w = planned()
    out = w.on_message(Prepare(epoch=EPOCH + 1, step=S), 5)
    assert len(out) == 1 and isinstance(out[0], Refuse) and out[0].epoch == EPOCH + 1
    assert w.state is WorkerState.PLANNED and w.actions_at(S) == ()


# --- the hold at S ------------------------------------------------------------------------------

def test_a_promised_worker_proceeds_below_s_and_holds_at_s():
    w = promised(step=S - 3)
    assert w.actions_at(S - 2) == ()
    assert w.actions_at(S - 1) == ()
    assert w.actions_at(S) == (Hold(epoch=EPOCH, step=S),)
    assert w.actions_at(S) == (Hold(epoch=EPOCH, step=S),), "asking again changes nothing"
    assert w.actions_at(S + 1) == (Hold(epoch=EPOCH, step=S),)
    assert torch.equal(w.phys2log, current_placement())


# --- COMMIT and the copies ----------------------------------------------------------------------

def holds(w: WorkerAgreement, step: int) -> bool:
    return any(isinstance(a, Hold) for a in w.actions_at(step))


def copy_work(w: WorkerAgreement, step: int) -> list:
    """The actions at ``step`` that touch the copy engine."""
    return [a for a in w.actions_at(step) if isinstance(a, (Prefetch, StartChunk, LandChunk))]


def run_copies(w: WorkerAgreement, first_step: int) -> tuple[list[CopyChunk], list]:
    """Drive the decode loop from ``first_step`` (the depth-0 schedule: one landing per step)
    until the worker stops asking for copies."""
    chunks, replies, step = [], [], first_step
    while True:
        lands = [a.chunk for a in w.actions_at(step) if isinstance(a, LandChunk)]
        if not lands:
            return chunks, replies
        (chunk,) = lands
        chunks.append(chunk)
        replies += w.chunk_landed(chunk, bytes_received=100 * (chunk.index + 1), seconds=0.25)
        step += 1


def test_commit_copies_exactly_the_changed_layers_in_chunks_from_s():
    new = changed_placement((0, 2, 3))
    w = promised(plan_for(new, layers_per_chunk=2))
    assert w.on_message(Commit(epoch=EPOCH, step=S), S - 3) == []
    assert w.state is WorkerState.COPYING and w.pending_done
    # Below S nothing is copied (chunk 0 is offered for prefetch) and the old placement serves.
    (early,) = w.actions_at(S - 2)
    assert isinstance(early, Prefetch) and early.chunk.index == 0 and early.chunk.layers == (0, 2)
    assert w.actions_at(S - 1) == (early,)
    assert torch.equal(w.phys2log, current_placement())

    land, prefetch = w.actions_at(S)
    assert isinstance(land, LandChunk) and isinstance(prefetch, Prefetch)
    first = land.chunk
    assert prefetch.chunk.index == 1, "the next chunk is prefetched right after a landing"
    assert (first.epoch, first.index, first.num_chunks, first.layers) == (EPOCH, 0, 2, (0, 2))
    assert torch.equal(first.new, new)
    assert torch.equal(first.old[[0, 2]], current_placement()[[0, 2]])
    # The rows switch only once the engine says the copy is done.
    assert torch.equal(w.phys2log, current_placement())
    assert w.actions_at(S) == (land, prefetch), "asking again returns the same actions"
    assert w.chunk_landed(first, bytes_received=700, seconds=0.5) == []
    expected = current_placement()
    expected[[0, 2]] = new[[0, 2]]
    assert torch.equal(w.phys2log, expected), "only the chunk's layers switch"

    (land,) = w.actions_at(S + 1)
    second = land.chunk
    assert isinstance(land, LandChunk)
    assert (second.index, second.num_chunks, second.layers) == (1, 2, (3,))
    assert torch.equal(w.phys2log, expected)
    out = w.chunk_landed(second, bytes_received=300, seconds=0.25)
    assert out == [Done(rank=RANK, epoch=EPOCH, ok=True, error="", bytes_received=1000,
                        copy_seconds=0.75, hold_seconds=0.0)]
    assert torch.equal(w.phys2log, new)
    assert w.state is WorkerState.IDLE and not w.pending_done
    assert w.actions_at(S + 2) == ()


@pytest.mark.parametrize("layers_per_chunk", [1, 2, 3, 4, 50])
@pytest.mark.parametrize("changed", [(0,), (3,), (1, 3), (0, 1, 2, 3)])
def test_chunks_cover_each_changed_layer_once_in_order(layers_per_chunk, changed):
    new = changed_placement(changed)
    w = promised(plan_for(new, layers_per_chunk=layers_per_chunk))
    w.on_message(Commit(epoch=EPOCH, step=S), S - 1)
    chunks, replies = run_copies(w, S)
    expected = [tuple(changed[i:i + layers_per_chunk]) for i in range(0, len(changed), layers_per_chunk)]
    assert [c.layers for c in chunks] == expected
    assert [c.index for c in chunks] == list(range(len(expected)))
    assert {c.num_chunks for c in chunks} == {len(expected)}
    assert [type(m) for m in replies] == [Done] and replies[0].ok
    assert torch.equal(w.phys2log, new)
    assert chunk_changed_layers(current_placement(), new, layers_per_chunk) == expected


def test_with_pipeline_depth_1_chunk_i_starts_at_s_plus_i_and_lands_a_step_later():
    new = changed_placement((0, 2, 3))
    w = WorkerAgreement(RANK, E, G, current_placement(), pipeline_depth=1)
    w.on_message(plan_for(new, layers_per_chunk=1), 10)
    w.on_message(Prepare(epoch=EPOCH, step=S), 11)
    assert w.on_message(Commit(epoch=EPOCH, step=S), 12) == []
    (early,) = w.actions_at(S - 1)
    assert isinstance(early, Prefetch) and early.chunk.index == 0
    w.prefetched(early.chunk)
    assert w.actions_at(S - 1) == (), "each chunk is offered for prefetch once"
    done, seen = [], []
    for step in range(S, S + 5):
        for action in w.actions_at(step):
            seen.append((step, type(action).__name__, action.chunk.index, action.chunk.layers))
            if isinstance(action, StartChunk):
                assert torch.equal(w.phys2log[list(action.chunk.layers)],
                                   current_placement()[list(action.chunk.layers)])
                w.chunk_started(action.chunk, seconds=0.125)
            else:
                assert isinstance(action, LandChunk)
                done += w.chunk_landed(action.chunk, bytes_received=10, seconds=0.25)
    assert seen == [(S, "StartChunk", 0, (0,)),
                    (S + 1, "LandChunk", 0, (0,)), (S + 1, "StartChunk", 1, (2,)),
                    (S + 2, "LandChunk", 1, (2,)), (S + 2, "StartChunk", 2, (3,)),
                    (S + 3, "LandChunk", 2, (3,))]
    assert done == [Done(rank=RANK, epoch=EPOCH, ok=True, error="", bytes_received=30,
                         copy_seconds=3 * 0.125 + 3 * 0.25, hold_seconds=0.0)]
    assert torch.equal(w.phys2log, new) and w.state is WorkerState.IDLE


def test_a_chunk_landed_out_of_schedule_is_a_bug_not_a_state():
    w = WorkerAgreement(RANK, E, G, current_placement(), pipeline_depth=1)
    w.on_message(plan_for(changed_placement((0, 2)), layers_per_chunk=1), 10)
    w.on_message(Prepare(epoch=EPOCH, step=S), 11)
    w.on_message(Commit(epoch=EPOCH, step=S), 12)
    (start,) = w.actions_at(S)
    with pytest.raises(AssertionError):
        w.chunk_landed(start.chunk, bytes_received=0, seconds=0.0)  # never started
    w.chunk_started(start.chunk, seconds=0.0)
    with pytest.raises(AssertionError):
        w.chunk_started(start.chunk, seconds=0.0)  # started twice


def test_a_plan_equal_to_the_current_placement_is_done_at_commit_without_copies():
    w = promised(plan_for(current_placement()))
    out = w.on_message(Commit(epoch=EPOCH, step=S), S - 1)
    assert [type(m) for m in out] == [Done] and out[0].ok and out[0].epoch == EPOCH
    assert w.state is WorkerState.IDLE
    assert all(w.actions_at(s) == () for s in range(S - 1, S + 3))
    assert torch.equal(w.phys2log, current_placement())


def test_hold_time_reported_after_the_hold_ends_is_in_done():
    # The hook calls held() once the wait at S is over, i.e. after the COMMIT arrived.
    w = promised()
    assert holds(w, S)
    w.on_message(Commit(epoch=EPOCH, step=S), S - 1)
    w.held(0.25)
    _, replies = run_copies(w, S)
    assert replies[-1].hold_seconds == pytest.approx(0.25)


@pytest.mark.parametrize("case", ["idle", "planned", "other epoch", "wrong step", "after abort",
                                  "refused prepare"])
def test_a_commit_for_an_epoch_not_promised_is_ignored(case):
    if case == "idle":
        w = new_worker()
    elif case == "planned":
        w = planned()
    elif case == "refused prepare":
        w = planned()
        w.on_message(Prepare(epoch=EPOCH, step=S), S)
    else:
        w = promised()
    msg = Commit(epoch=EPOCH, step=S)
    if case == "other epoch":
        msg = Commit(epoch=EPOCH + 1, step=S)
    elif case == "wrong step":
        msg = Commit(epoch=EPOCH, step=S + 1)
    elif case == "after abort":
        w.on_message(Abort(epoch=EPOCH, reason="rank 0 refused"), S - 2)
    before = worker_state(w)
    assert w.on_message(msg, S - 1) == []
    assert worker_state(w) == before
    assert copy_work(w, S) == [] and copy_work(w, S - 1) == []
    assert torch.equal(w.phys2log, current_placement())


# --- ABORT --------------------------------------------------------------------------------------

def test_abort_while_planned_clears_the_plan():
    w = planned()
    assert w.on_message(Abort(epoch=EPOCH, reason="timeout"), 12) == []
    assert w.state is WorkerState.IDLE and not w.pending_done
    assert isinstance(w.on_message(Prepare(epoch=EPOCH, step=S), 13)[0], Refuse)
    assert torch.equal(w.phys2log, current_placement())


def test_abort_while_promised_releases_the_hold():
    w = promised()
    assert holds(w, S)
    assert w.on_message(Abort(epoch=EPOCH, reason="rank 0 refused"), S - 1) == []
    assert w.state is WorkerState.IDLE
    assert all(w.actions_at(s) == () for s in range(S, S + 4))
    assert torch.equal(w.phys2log, current_placement())
    # A new epoch can start afterwards.
    assert w.on_message(plan_for(changed_placement((1,)), epoch=EPOCH + 1), S + 4) == [
        PlanAck(rank=RANK, epoch=EPOCH + 1, step=S + 4)]


def test_abort_of_another_epoch_is_ignored():
    w = promised()
    before = worker_state(w)
    assert w.on_message(Abort(epoch=EPOCH - 1, reason="old"), S - 1) == []
    assert worker_state(w) == before
    assert w.actions_at(S) == (Hold(epoch=EPOCH, step=S),)


def test_abort_after_commit_is_ignored_and_the_copies_go_on():
    new = changed_placement()
    w = promised(plan_for(new))
    w.on_message(Commit(epoch=EPOCH, step=S), S - 1)
    before = worker_state(w)
    assert w.on_message(Abort(epoch=EPOCH, reason="late"), S - 1) == []
    assert worker_state(w) == before
    _, replies = run_copies(w, S)
    assert replies and replies[-1].ok and torch.equal(w.phys2log, new)


# --- copy failure -------------------------------------------------------------------------------

def test_a_copy_failure_reports_done_not_ok_and_refuses_later_plans():
    w = promised(plan_for(changed_placement(), layers_per_chunk=1))
    w.on_message(Commit(epoch=EPOCH, step=S), S - 1)
    land = w.actions_at(S)[0]
    assert isinstance(land, LandChunk)
    chunk = land.chunk
    out = w.on_message(Prepare(epoch=EPOCH, step=S), S - 1)  # stray PREPARE: no second promise
    assert isinstance(out[0], Refuse)
    out = w.copy_failed(chunk, "NCCL error 5")
    assert len(out) == 1 and isinstance(out[0], Done)
    assert not out[0].ok and "NCCL error 5" in out[0].error and out[0].epoch == EPOCH
    assert out[0].rank == RANK
    assert w.state is WorkerState.FAILED
    assert w.actions_at(S + 1) == (), "nothing more is scheduled after a copy failure"
    refused = w.on_message(plan_for(changed_placement((1,)), epoch=EPOCH + 1), S + 1)
    assert isinstance(refused[0], Refuse)


def test_hold_time_reported_before_the_commit_reaches_done():
    """held() may be reported while still promised; the COMMIT must not erase it."""
    new = default_placement(L, E, P).clone()
    new[0] = new[0].roll(1)
    w = WorkerAgreement(0, E, G, default_placement(L, E, P))
    w.on_message(Plan(epoch=1, phys2log=new, plan_hash=placement_hash(new), layers_per_chunk=8), 0)
    w.on_message(Prepare(epoch=1, step=3), 0)
    assert holds(w, 3)
    w.held(0.5)
    w.on_message(Commit(epoch=1, step=3), 3)
    (land,) = w.actions_at(3)
    (done,) = w.chunk_landed(land.chunk, bytes_received=10, seconds=0.1)
    assert done.ok and done.hold_seconds == 0.5


def test_a_bytes_budget_splits_chunks_by_what_the_busiest_rank_receives():
    """With bytes_per_chunk, layers are grouped so that no rank receives more than the budget
    per step (a layer above it goes alone); every worker derives the same chunks."""
    old = default_placement(L, E, P)
    new = old.clone()
    new[0] = torch.tensor([1, 0, 2, 3, 0, 1, 2, 3])  # rank 0: swap inside the rank, no receive
    new[1] = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])  # rank 1 receives nothing either (local)
    new[2] = torch.tensor([3, 1, 2, 0, 0, 1, 2, 3])  # local again
    new[3] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # unchanged
    chunks = chunk_changed_layers(old, new, layers_per_chunk=8, bytes_per_chunk=100,
                                  bytes_per_expert=60, num_gpus=G)
    assert chunks == [(0, 1, 2)]  # no rank receives anything: one chunk
    # Now each rank starts with only half of the experts, so the new layers need receives.
    old = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).repeat(L, 1)
    gen = torch.Generator().manual_seed(0)
    new = torch.stack([torch.randperm(P, generator=gen) % E for _ in range(L)])
    plans_bytes = chunk_changed_layers(old, new, layers_per_chunk=8, bytes_per_chunk=60,
                                       bytes_per_expert=60, num_gpus=G)
    received = {p.layer: max(p.stats(60).bytes_received)
                for p in plan_copies(old, new, list(range(L)), G, 1)}
    assert any(received.values())
    for c in plans_bytes:  # within the budget, or a single layer above it
        assert len(c) == 1 or sum(received[l] for l in c) <= 60, (c, received)
    by_layers = chunk_changed_layers(old, new, layers_per_chunk=8)
    assert [l for c in plans_bytes for l in c] == [l for c in by_layers for l in c]
    assert len(plans_bytes) > len(by_layers)
    w = [WorkerAgreement(r, E, G, old, bytes_per_expert=60) for r in range(G)]
    plan = Plan(epoch=1, phys2log=new, plan_hash=placement_hash(new), layers_per_chunk=8,
                bytes_per_chunk=60)
    for x in w:
        x.on_message(plan, 0)
    assert w[0]._chunks == w[1]._chunks == plans_bytes


def test_a_rank_without_copy_fn_refuses_plans_that_move_its_layers_for_good():
    """Promising and then failing at S would take the instance down; refusing up front keeps it
    serving, and the leader does not retry a configuration error."""
    from eplb.coordinator.agreement import EpochAgreement, Phase

    old = default_placement(L, E, P)
    new = old.clone()
    new[0] = new[0].roll(1)
    plan = Plan(epoch=1, phys2log=new, plan_hash=placement_hash(new), layers_per_chunk=1)
    w = WorkerAgreement(0, E, G, old, can_copy=False)
    (reply,) = w.on_message(plan, 5)
    assert isinstance(reply, Refuse) and reply.reason.startswith("cannot copy")
    assert reply.code is RefuseCode.CANNOT_COPY and not reply.code.retryable
    assert w.state is WorkerState.IDLE and torch.equal(w.phys2log, old)
    leader = EpochAgreement(plan, frozenset({0}), 2, 0.0, 0.0)
    leader.on_message(reply, 0.1)
    assert leader.phase is Phase.ABORTED and not leader.retryable
    same = Plan(epoch=2, phys2log=old, plan_hash=placement_hash(old), layers_per_chunk=1)
    assert isinstance(w.on_message(same, 6)[0], PlanAck)  # nothing to copy: fine
