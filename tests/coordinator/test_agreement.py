"""Example-based tests of the leader's side of one epoch (:class:`EpochAgreement`, DESIGN.md §4),
and of how :class:`LeaderCore` retries around it.

Every test drives the sans-IO objects with plain values: messages built by hand, a clock that is a
number. No sockets, no mocks.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from eplb.coordinator.agreement import TERMINAL, AgreementTimeouts, EpochAgreement, Phase
from eplb.coordinator.decision_log import EpochDecided, EpochStarted
from eplb.coordinator.leader import Broadcast, ComputePlan, LeaderConfig, LeaderCore, Persist
from eplb.placement.planner import PlanResult
from eplb.placement.rules import default_placement, placement_hash
from eplb.proto import Abort, Commit, Counts, Done, Hello, Plan, PlanAck, Prepare, Promise, Refuse
from eplb.proto.reasons import AbortCode, RefuseCode

L, E, P = 3, 4, 8
EPOCH = 7
TIMEOUTS = AgreementTimeouts(ack_s=5.0, promise_s=4.0, done_s=30.0)


def make_plan(epoch: int = EPOCH, layers_per_chunk: int = 1) -> Plan:
    """A valid plan that moves experts in layers 0 and 2 (slots 0 and 1 swapped)."""
    phys2log = default_placement(L, E, P)
    phys2log[[0, 2], 0], phys2log[[0, 2], 1] = phys2log[[0, 2], 1].clone(), phys2log[[0, 2], 0].clone()
    return Plan(epoch=epoch, phys2log=phys2log, plan_hash=placement_hash(phys2log),
                layers_per_chunk=layers_per_chunk)


def make_agreement(ranks=(0, 1, 2), margin: int = 3, steps_per_second: float = 0.0,
                   now: float = 100.0, timeouts: AgreementTimeouts = TIMEOUTS) -> EpochAgreement:
    return EpochAgreement(make_plan(), frozenset(ranks), margin, steps_per_second, now, timeouts)


def ack_all(ag: EpochAgreement, steps: dict[int, int], now: float) -> list:
    out: list = []
    for rank, step in steps.items():
        out += ag.on_message(PlanAck(rank=rank, epoch=ag.epoch, step=step), now)
    return out


def promise_all(ag: EpochAgreement, now: float) -> list:
    out: list = []
    for rank in sorted(ag.ranks):
        out += ag.on_message(Promise(rank=rank, epoch=ag.epoch), now)
    return out


def done(rank: int, epoch: int = EPOCH, ok: bool = True, error: str = "") -> Done:
    return Done(rank=rank, epoch=epoch, ok=ok, error=error, bytes_received=10, copy_seconds=0.5,
                hold_seconds=0.0)


def to_committed(ag: EpochAgreement, now: float = 101.0) -> int:
    ack_all(ag, {r: 10 for r in ag.ranks}, now)
    out = promise_all(ag, now + 0.5)
    assert out == [Commit(epoch=ag.epoch, step=ag.switch_step)]
    return ag.switch_step


def snapshot(ag: EpochAgreement) -> dict:
    """Everything an event could change (copied, so that later mutation shows)."""
    state = {f.name: getattr(ag, f.name) for f in dataclasses.fields(ag)}
    state["acked_steps"] = dict(ag.acked_steps)
    state["promised"] = set(ag.promised)
    state["done"] = dict(ag.done)
    return state


# --- construction and the happy path ------------------------------------------------------------

def test_start_broadcasts_the_plan_and_arms_the_ack_deadline():
    ag = make_agreement(now=100.0)
    assert ag.start() == [ag.plan]
    assert ag.phase is Phase.PLANNED
    assert ag.deadline == pytest.approx(100.0 + TIMEOUTS.ack_s)
    assert ag.switch_step is None


def test_an_epoch_without_workers_is_rejected():
    with pytest.raises(ValueError):
        make_agreement(ranks=())


def test_happy_path_prepare_at_max_acked_step_plus_margin_then_commit_then_succeed():
    ag = make_agreement(ranks=(0, 1, 2), margin=3, now=100.0)
    ag.start()
    # PREPARE goes out only when the last PLAN_ACK arrives.
    assert ag.on_message(PlanAck(rank=0, epoch=EPOCH, step=10), 100.1) == []
    assert ag.on_message(PlanAck(rank=2, epoch=EPOCH, step=14), 100.2) == []
    assert ag.phase is Phase.PLANNED
    out = ag.on_message(PlanAck(rank=1, epoch=EPOCH, step=12), 100.3)
    assert out == [Prepare(epoch=EPOCH, step=14 + 3)]
    assert ag.phase is Phase.PREPARING and ag.switch_step == 17 and ag.effective_margin == 3
    assert ag.deadline == pytest.approx(100.3 + TIMEOUTS.promise_s)

    # COMMIT only after every PROMISE.
    assert ag.on_message(Promise(rank=2, epoch=EPOCH), 100.4) == []
    assert ag.on_message(Promise(rank=0, epoch=EPOCH), 100.5) == []
    assert ag.phase is Phase.PREPARING
    assert ag.on_message(Promise(rank=1, epoch=EPOCH), 100.6) == [Commit(epoch=EPOCH, step=17)]
    assert ag.phase is Phase.COMMITTED
    assert ag.agreement_seconds == pytest.approx(0.3)
    assert ag.deadline == pytest.approx(100.6 + TIMEOUTS.done_s)

    # SUCCEEDED only after every DONE ok; DONE sends nothing.
    assert ag.on_message(done(0), 101.0) == []
    assert ag.on_message(done(2), 101.1) == []
    assert ag.phase is Phase.COMMITTED and not ag.finished
    assert ag.on_message(done(1), 101.2) == []
    assert ag.phase is Phase.SUCCEEDED and ag.finished
    assert ag.ended_at == pytest.approx(101.2)
    assert ag.reason == ""


@pytest.mark.parametrize("margin", [-5, 0, 1, 2])
def test_margin_is_never_below_two(margin):
    ag = make_agreement(ranks=(0, 1), margin=margin)
    out = ack_all(ag, {0: 50, 1: 40}, 100.5)
    assert out == [Prepare(epoch=EPOCH, step=52)]
    assert ag.effective_margin == 2


def test_margin_stretches_with_the_measured_round_trip_and_step_rate():
    # PLAN at t=100, last ACK at t=100.5: 3 round trips of 0.5 s at 10 steps/s = 15 steps, + 1.
    ag = make_agreement(ranks=(0, 1), margin=3, steps_per_second=10.0, now=100.0)
    out = ack_all(ag, {0: 50, 1: 40}, 100.5)
    assert ag.effective_margin == 16
    assert out == [Prepare(epoch=EPOCH, step=66)]


def test_a_configured_margin_larger_than_the_rate_estimate_wins():
    ag = make_agreement(ranks=(0, 1), margin=40, steps_per_second=10.0, now=100.0)
    out = ack_all(ag, {0: 50, 1: 40}, 100.5)
    assert out == [Prepare(epoch=EPOCH, step=90)]


def test_duplicate_acks_and_promises_count_once():
    ag = make_agreement(ranks=(0, 1))
    assert ag.on_message(PlanAck(rank=0, epoch=EPOCH, step=5), 100.1) == []
    assert ag.on_message(PlanAck(rank=0, epoch=EPOCH, step=6), 100.2) == []
    assert ag.phase is Phase.PLANNED
    ag.on_message(PlanAck(rank=1, epoch=EPOCH, step=5), 100.3)
    assert ag.phase is Phase.PREPARING
    assert ag.on_message(Promise(rank=0, epoch=EPOCH), 100.4) == []
    assert ag.on_message(Promise(rank=0, epoch=EPOCH), 100.5) == []
    assert ag.phase is Phase.PREPARING


def test_messages_of_the_wrong_phase_are_ignored_and_not_remembered():
    ag = make_agreement(ranks=(0, 1))
    # A PROMISE before PREPARE must not count towards the COMMIT later.
    assert ag.on_message(Promise(rank=0, epoch=EPOCH), 100.1) == []
    assert ag.on_message(done(0), 100.1) == []
    ack_all(ag, {0: 5, 1: 5}, 100.2)
    assert ag.promised == set() and ag.done == {}
    assert ag.on_message(Promise(rank=1, epoch=EPOCH), 100.3) == []
    assert ag.phase is Phase.PREPARING
    # A late PLAN_ACK after PREPARE does not move S.
    before = ag.switch_step
    assert ag.on_message(PlanAck(rank=0, epoch=EPOCH, step=500), 100.4) == []
    assert ag.switch_step == before


# --- refusals -----------------------------------------------------------------------------------

def test_a_refusal_before_prepare_aborts_naming_the_rank():
    ag = make_agreement(ranks=(0, 1, 2))
    ag.on_message(PlanAck(rank=0, epoch=EPOCH, step=5), 100.1)
    out = ag.on_message(Refuse(rank=2, epoch=EPOCH, step=5, reason="invalid plan: x",
                               code=RefuseCode.INVALID_PLAN), 100.2)
    assert len(out) == 1 and isinstance(out[0], Abort) and out[0].epoch == EPOCH
    # Retrying the same plan cannot cure an invalid one: this abort is final.
    assert ag.phase is Phase.ABORTED and not ag.retryable
    assert "rank 2" in ag.reason and "invalid plan: x" in ag.reason
    assert out[0].reason == ag.reason
    assert ag.ended_at == pytest.approx(100.2)


def test_a_timing_refusal_before_prepare_is_retryable():
    ag = make_agreement(ranks=(0, 1))
    ag.on_message(Refuse(rank=1, epoch=EPOCH, step=5, reason="no plan for epoch 7"), 100.2)
    assert ag.phase is Phase.ABORTED and ag.retryable


def test_a_refusal_while_preparing_aborts_naming_the_rank_and_s():
    ag = make_agreement(ranks=(0, 1, 2), margin=2)
    ack_all(ag, {0: 10, 1: 10, 2: 10}, 100.1)
    ag.on_message(Promise(rank=0, epoch=EPOCH), 100.2)
    out = ag.on_message(Refuse(rank=1, epoch=EPOCH, step=12, reason="already at step 12 >= S=12"),
                        100.3)
    assert out == [Abort(epoch=EPOCH, reason=ag.reason, code=AbortCode.REFUSED)]
    assert ag.phase is Phase.ABORTED and ag.retryable
    assert re.search(r"\brank 1\b", ag.reason) and "S=12" in ag.reason
    # Nothing after an abort revives the epoch; in particular no COMMIT.
    assert ag.on_message(Promise(rank=1, epoch=EPOCH), 100.4) == []
    assert ag.on_message(Promise(rank=2, epoch=EPOCH), 100.4) == []
    assert ag.on_tick(1e9) == []
    assert ag.phase is Phase.ABORTED


def test_a_refusal_after_commit_is_ignored():
    ag = make_agreement(ranks=(0, 1))
    to_committed(ag)
    before = snapshot(ag)
    assert ag.on_message(Refuse(rank=0, epoch=EPOCH, step=99, reason="late"), 102.0) == []
    assert snapshot(ag) == before


# --- timeouts (invariant I2) --------------------------------------------------------------------

def test_every_live_phase_has_a_finite_deadline():
    ag = make_agreement(ranks=(0, 1), now=100.0)
    seen = []
    for step in ("start", "ack", "promise"):
        if step == "ack":
            ack_all(ag, {0: 1, 1: 1}, 100.1)
        elif step == "promise":
            promise_all(ag, 100.2)
        assert not ag.finished
        seen.append(ag.phase)
        assert math.isfinite(ag.deadline) and ag.deadline > 100.0
    assert seen == [Phase.PLANNED, Phase.PREPARING, Phase.COMMITTED]


def test_plan_ack_timeout_aborts_naming_the_missing_ranks():
    ag = make_agreement(ranks=(0, 1, 2, 3), now=100.0)
    ag.on_message(PlanAck(rank=2, epoch=EPOCH, step=1), 101.0)
    ag.on_message(PlanAck(rank=0, epoch=EPOCH, step=1), 101.0)
    assert ag.on_tick(104.99) == [] and ag.phase is Phase.PLANNED
    out = ag.on_tick(105.0)
    assert out == [Abort(epoch=EPOCH, reason=ag.reason, code=AbortCode.TIMEOUT)]
    assert ag.phase is Phase.ABORTED and ag.retryable
    assert "[1, 3]" in ag.reason and "PLAN_ACK" in ag.reason
    assert ag.on_tick(200.0) == []


def test_promise_timeout_counts_from_prepare_and_names_the_missing_ranks():
    ag = make_agreement(ranks=(0, 1, 2), now=100.0)
    ack_all(ag, {0: 1, 1: 1, 2: 1}, 104.0)  # PREPARE at 104, promise deadline 108
    ag.on_message(Promise(rank=1, epoch=EPOCH), 104.5)
    assert ag.on_tick(105.5) == [], "the PLAN_ACK deadline must not apply after PREPARE"
    assert ag.on_tick(107.99) == [] and ag.phase is Phase.PREPARING
    out = ag.on_tick(108.0)
    assert out == [Abort(epoch=EPOCH, reason=ag.reason, code=AbortCode.TIMEOUT)]
    assert ag.phase is Phase.ABORTED and ag.retryable
    assert "[0, 2]" in ag.reason and "PROMISE" in ag.reason


def test_done_timeout_after_commit_fails_and_never_aborts():
    ag = make_agreement(ranks=(0, 1, 2), now=100.0)
    ack_all(ag, {0: 1, 1: 1, 2: 1}, 100.5)
    promise_all(ag, 101.0)  # COMMIT at 101, done deadline 131
    ag.on_message(done(1), 102.0)
    assert ag.on_tick(130.99) == [] and ag.phase is Phase.COMMITTED
    out = ag.on_tick(131.0)
    assert out == [], "a committed epoch must never broadcast ABORT"
    assert ag.phase is Phase.FAILED and not ag.retryable
    assert "[0, 2]" in ag.reason and "DONE" in ag.reason
    assert ag.on_tick(1e9) == [] and ag.phase is Phase.FAILED


def test_one_tick_far_in_the_future_ends_every_phase():
    for phase in (Phase.PLANNED, Phase.PREPARING, Phase.COMMITTED):
        ag = make_agreement(ranks=(0, 1), now=100.0)
        if phase is not Phase.PLANNED:
            ack_all(ag, {0: 1, 1: 1}, 100.1)
        if phase is Phase.COMMITTED:
            promise_all(ag, 100.2)
        assert ag.phase is phase
        out = ag.on_tick(1e6)
        assert ag.phase in TERMINAL
        if phase is Phase.COMMITTED:
            assert ag.phase is Phase.FAILED and out == []
        else:
            assert ag.phase is Phase.ABORTED and [type(m) for m in out] == [Abort]


# --- workers leaving ----------------------------------------------------------------------------

@pytest.mark.parametrize("phase", [Phase.PLANNED, Phase.PREPARING])
def test_a_worker_leaving_before_commit_aborts_without_retry(phase):
    ag = make_agreement(ranks=(0, 1, 2))
    if phase is Phase.PREPARING:
        ack_all(ag, {0: 1, 1: 1, 2: 1}, 100.1)
        ag.on_message(Promise(rank=0, epoch=EPOCH), 100.2)
    out = ag.on_worker_left(1, "process died", 100.3)
    assert out == [Abort(epoch=EPOCH, reason=ag.reason, code=AbortCode.WORKER_LEFT)]
    assert ag.phase is Phase.ABORTED and not ag.retryable
    assert "rank 1" in ag.reason and "process died" in ag.reason


def test_a_worker_leaving_after_commit_is_not_evidence_its_late_done_succeeds():
    ag = make_agreement(ranks=(0, 1, 2))
    to_committed(ag)
    ag.on_message(done(0), 102.0)
    assert ag.on_worker_left(2, "sidecar lost", 102.5) == []
    assert ag.phase is Phase.COMMITTED  # waiting, bounded by the DONE deadline
    ag.on_message(done(1), 103.0)
    ag.on_message(done(2), 103.5)  # its sidecar came back with the DONE
    assert ag.phase is Phase.SUCCEEDED


def test_silence_after_commit_fails_at_the_deadline_and_late_dones_ok_clear_it():
    ag = make_agreement(ranks=(0, 1))
    to_committed(ag)
    ag.on_message(done(0), 102.0)
    ag.on_tick(ag.deadline)
    assert ag.phase is Phase.FAILED and ag.failed_on_timeout and "rank" in ag.reason
    assert ag.on_late_done(done(1), ag.deadline + 1) is True
    assert ag.phase is Phase.SUCCEEDED and ag.reason == ""


def test_a_late_done_error_keeps_a_timed_out_epoch_failed():
    ag = make_agreement(ranks=(0, 1))
    to_committed(ag)
    ag.on_tick(ag.deadline)
    bad = Done(rank=1, epoch=EPOCH, ok=False, error="nccl", bytes_received=0, copy_seconds=0.0,
               hold_seconds=0.0)
    assert ag.on_late_done(bad, ag.deadline + 1) is False
    assert ag.on_late_done(done(0), ag.deadline + 2) is False
    assert ag.phase is Phase.FAILED and "nccl" in ag.reason


def test_a_done_error_fails_the_epoch_at_once_and_late_dones_do_not_clear_it():
    ag = make_agreement(ranks=(0, 1))
    to_committed(ag)
    bad = Done(rank=1, epoch=EPOCH, ok=False, error="nccl", bytes_received=0, copy_seconds=0.0,
               hold_seconds=0.0)
    ag.on_message(bad, 102.0)
    assert ag.phase is Phase.FAILED and not ag.failed_on_timeout
    assert ag.on_late_done(done(0), 103.0) is False and ag.phase is Phase.FAILED


def test_a_worker_leaving_after_its_done_does_not_fail_the_epoch():
    ag = make_agreement(ranks=(0, 1))
    to_committed(ag)
    ag.on_message(done(0), 102.0)
    assert ag.on_worker_left(0, "exited", 102.5) == []
    assert ag.phase is Phase.COMMITTED
    ag.on_message(done(1), 103.0)
    assert ag.phase is Phase.SUCCEEDED


def test_an_unknown_rank_leaving_or_a_leave_after_the_end_changes_nothing():
    ag = make_agreement(ranks=(0, 1))
    before = snapshot(ag)
    assert ag.on_worker_left(5, "not ours", 100.1) == []
    assert snapshot(ag) == before
    to_committed(ag)
    ag.on_message(done(0), 102.0)
    ag.on_message(done(1), 102.0)
    assert ag.phase is Phase.SUCCEEDED
    before = snapshot(ag)
    assert ag.on_worker_left(0, "after the end", 103.0) == []
    assert snapshot(ag) == before


# --- messages that must change nothing ---------------------------------------------------------

def _stale_and_foreign_messages():
    for epoch, rank in ((EPOCH - 1, 0), (EPOCH + 1, 0), (EPOCH, 9)):
        yield PlanAck(rank=rank, epoch=epoch, step=1000)
        yield Promise(rank=rank, epoch=epoch)
        yield Refuse(rank=rank, epoch=epoch, step=1000, reason="stale")
        yield done(rank, epoch=epoch, ok=False, error="stale")


@pytest.mark.parametrize("phase", [Phase.PLANNED, Phase.PREPARING, Phase.COMMITTED])
@pytest.mark.parametrize("msg", list(_stale_and_foreign_messages()),
                         ids=lambda m: f"{m.TYPE}-e{m.epoch}-r{m.rank}")
def test_stale_epoch_and_unknown_rank_messages_change_nothing(phase, msg):
    ag = make_agreement(ranks=(0, 1))
    ack_all(ag, {0: 3}, 100.1)
    if phase is not Phase.PLANNED:
        ack_all(ag, {1: 3}, 100.2)
        ag.on_message(Promise(rank=0, epoch=EPOCH), 100.3)
    if phase is Phase.COMMITTED:
        ag.on_message(Promise(rank=1, epoch=EPOCH), 100.4)
        ag.on_message(done(0), 100.5)
    assert ag.phase is phase
    before = snapshot(ag)
    assert ag.on_message(msg, 100.6) == []
    assert snapshot(ag) == before


def test_leader_bound_messages_of_other_types_change_nothing():
    ag = make_agreement(ranks=(0, 1))
    before = snapshot(ag)
    for msg in (Prepare(epoch=EPOCH, step=3), Commit(epoch=EPOCH, step=3),
                Abort(epoch=EPOCH, reason="x"), make_plan()):
        assert ag.on_message(msg, 100.1) == []
    assert snapshot(ag) == before


# --- copy failures ------------------------------------------------------------------------------

def test_done_not_ok_fails_the_epoch_naming_the_rank_and_the_error():
    ag = make_agreement(ranks=(0, 1, 2))
    to_committed(ag)
    ag.on_message(done(0), 102.0)
    out = ag.on_message(done(1, ok=False, error="NCCL timeout on layer 2"), 102.1)
    assert out == [], "a committed epoch must never broadcast ABORT"
    assert ag.phase is Phase.FAILED
    assert "rank 1" in ag.reason and "NCCL timeout on layer 2" in ag.reason
    assert ag.ended_at == pytest.approx(102.1)
    # A later DONE ok from the last rank cannot turn FAILED into SUCCEEDED.
    assert ag.on_message(done(2), 102.2) == []
    assert ag.phase is Phase.FAILED
    assert ag.on_tick(1e9) == [] and ag.phase is Phase.FAILED


def test_done_not_ok_as_the_last_done_still_fails():
    ag = make_agreement(ranks=(0, 1))
    to_committed(ag)
    ag.on_message(done(0), 102.0)
    ag.on_message(done(1, ok=False, error="boom"), 102.1)
    assert ag.phase is Phase.FAILED


def test_every_broadcast_carries_the_epoch_and_commit_carries_s():
    ag = make_agreement(ranks=(0,), margin=2)
    sent = ag.start()
    sent += ack_all(ag, {0: 41}, 100.1)
    sent += promise_all(ag, 100.2)
    assert [type(m) for m in sent] == [Plan, Prepare, Commit]
    assert all(m.epoch == EPOCH for m in sent)
    assert sent[1].step == sent[2].step == 43
    assert torch.equal(sent[0].phys2log, make_plan().phys2log)


# --- LeaderCore around EpochAgreement: retries -------------------------------------------------

def leader_with_epoch(ranks=(0, 1), max_retries: int = 2, now: float = 10.0):
    """A LeaderCore whose group has joined and whose first epoch's PLAN went out."""
    core = LeaderCore(LeaderConfig(min_margin=2, max_retries=max_retries, timeouts=TIMEOUTS))
    for rank in ranks:
        assert core.on_hello(Hello(rank=rank, node=0, world_size=len(ranks), num_layers=L,
                                   num_experts=E, num_physical=P, bytes_per_expert=1, step=10,
                                   pid=100 + rank, phys2log=default_placement(L, E, P)), now) == ""
    core.on_message(Counts(rank=ranks[0], from_step=0, to_step=10,
                           counts=torch.ones(L, E, dtype=torch.int64)), now)
    assert core.request_rebalance(force=True)[0]
    (compute,) = core.on_tick(now)
    assert isinstance(compute, ComputePlan)
    new = make_plan().phys2log
    out = core.on_plan_result(compute.request_id, PlanResult(new, 0.5, 0.9, 4, 0.01, ""), now)
    assert out[0] == Persist(EpochStarted(out[1].msg.epoch)), "the epoch is on record before PLAN"
    assert msgs(out) == [out[1].msg] and isinstance(out[1].msg, Plan)
    return core, out[1].msg


def msgs(outputs) -> list:
    """The broadcast messages of ``outputs``, after checking that every decision (COMMIT or
    ABORT) is put on record right before it is sent."""
    sent = []
    for i, o in enumerate(outputs):
        if isinstance(o, Persist):
            continue
        assert isinstance(o, Broadcast)
        if isinstance(o.msg, (Commit, Abort)):
            record = outputs[i - 1].record if i and isinstance(outputs[i - 1], Persist) else None
            assert isinstance(record, EpochDecided) and record.epoch == o.msg.epoch \
                and record.commit == isinstance(o.msg, Commit), f"{o.msg} sent without its record"
        sent.append(o.msg)
    return sent


def test_leader_retries_a_refused_epoch_with_a_new_epoch_and_a_larger_margin():
    core, plan = leader_with_epoch()
    first = core.agreement
    assert msgs(core.on_message(PlanAck(rank=0, epoch=plan.epoch, step=20), 10.1)) == []
    (prepare,) = msgs(core.on_message(PlanAck(rank=1, epoch=plan.epoch, step=20), 10.1))
    assert prepare.step == 22
    out = msgs(core.on_message(Refuse(rank=1, epoch=plan.epoch, step=23, reason="late"), 10.2))
    assert [type(m) for m in out] == [Abort, Plan]
    assert out[0].epoch == plan.epoch and out[1].epoch > plan.epoch
    assert core.agreement is not first and core.agreement.margin > first.effective_margin
    assert core.history[-1].outcome == "aborted" and "rank 1" in core.history[-1].reason
    # The retry carries the same placement.
    assert torch.equal(out[1].phys2log, plan.phys2log)


def test_leader_stops_retrying_after_max_retries():
    core, plan = leader_with_epoch(max_retries=2)
    epochs = [plan.epoch]
    for _ in range(3):
        out = msgs(core.on_message(Refuse(rank=0, epoch=epochs[-1], step=1, reason="no"), 10.2))
        if len(out) == 2:
            epochs.append(out[1].epoch)
    assert len(epochs) == 3, "one first try and two retries"
    assert core.agreement is None
    assert [r.outcome for r in core.history] == ["aborted"] * 3


def test_leader_does_not_retry_when_a_worker_left():
    core, plan = leader_with_epoch()
    out = msgs(core.on_worker_left(1, "crashed", 10.5))
    assert [type(m) for m in out] == [Abort]
    assert core.agreement is None and core.history[-1].outcome == "aborted"


def test_leader_adopts_the_plan_only_when_every_done_is_ok_and_marks_failed_epochs_unsafe():
    core, plan = leader_with_epoch()
    for rank in (0, 1):
        core.on_message(PlanAck(rank=rank, epoch=plan.epoch, step=20), 10.1)
    for rank in (0, 1):
        core.on_message(Promise(rank=rank, epoch=plan.epoch), 10.2)
    core.on_message(done(0, epoch=plan.epoch), 10.3)
    assert torch.equal(core.placement, default_placement(L, E, P))
    core.on_message(done(1, epoch=plan.epoch), 10.4)
    assert torch.equal(core.placement, plan.phys2log) and core.history[-1].outcome == "committed"

    core, plan = leader_with_epoch()
    for rank in (0, 1):
        core.on_message(PlanAck(rank=rank, epoch=plan.epoch, step=20), 10.1)
    for rank in (0, 1):
        core.on_message(Promise(rank=rank, epoch=plan.epoch), 10.2)
    assert msgs(core.on_message(done(1, epoch=plan.epoch, ok=False, error="oom"), 10.3)) == []
    assert core.history[-1].outcome == "failed" and "oom" in core.unsafe_reason
    assert torch.equal(core.placement, default_placement(L, E, P))
    assert not core.request_rebalance(force=True)[0]


def test_done_deadline_counts_from_when_workers_reach_s_not_from_commit():
    """A large margin at a known step rate must not eat into done_s: workers need
    margin / rate seconds just to reach S after COMMIT."""
    ag = make_agreement(ranks=(0,), margin=3000, steps_per_second=10.0)
    ag.on_message(PlanAck(rank=0, epoch=EPOCH, step=0), 100.0)
    ag.on_message(Promise(rank=0, epoch=EPOCH), 100.0)
    assert ag.phase is Phase.COMMITTED
    ag.on_tick(100.0 + ag.timeouts.done_s + 1)  # before S is reached: still waiting
    assert ag.phase is Phase.COMMITTED
    ag.on_tick(100.0 + 300.0 + ag.timeouts.done_s + 1)
    assert ag.phase is Phase.FAILED
