"""A leader that restarts keeps its word (decision log), answers promised workers that ask, takes
over a committed epoch, and declares the instance unsafe only on evidence."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from eplb.coordinator.agreement import AgreementTimeouts, Phase
from eplb.coordinator.decision_log import (DecisionLog, DecisionLogError, EpochDecided, EpochEnded,
                                           EpochStarted, read_log)
from eplb.coordinator.leader import (Broadcast, ComputePlan, LeaderConfig, LeaderCore, Persist,
                                     SendTo)
from eplb.placement.planner import PlanResult
from eplb.placement.rules import default_placement
from eplb.proto import (Abort, Commit, Counts, Done, Heartbeat, Hello, OutcomeQuery, Plan, PlanAck,
                        Promise)
from eplb.proto.reasons import AbortCode

L, E, P, WORLD = 3, 4, 8, 2
TIMEOUTS = AgreementTimeouts(ack_s=5.0, promise_s=5.0, done_s=30.0)
OLD = default_placement(L, E, P)


def new_placement() -> torch.Tensor:
    p = OLD.clone()
    p[[0, 2], 0], p[[0, 2], 1] = p[[0, 2], 1].clone(), p[[0, 2], 0].clone()
    return p


def hello(rank: int, phys2log: torch.Tensor = OLD, applied_epoch: int = 0, step: int = 10) -> Hello:
    return Hello(rank=rank, node=rank, world_size=WORLD, num_layers=L, num_experts=E,
                 num_physical=P, bytes_per_expert=1, step=step, pid=100 + rank,
                 phys2log=phys2log, applied_epoch=applied_epoch)


def done(rank: int, epoch: int, ok: bool = True) -> Done:
    return Done(rank=rank, epoch=epoch, ok=ok, error="" if ok else "nccl", bytes_received=1,
                copy_seconds=0.1, hold_seconds=0.0)


class Disk:
    """What a :class:`DecisionLog` would hold: every Persist, in order."""

    def __init__(self) -> None:
        self.records: list = []

    def run(self, outputs: list) -> list:
        """Persist what must be persisted; return the messages (Broadcast or SendTo)."""
        sent = []
        for o in outputs:
            if isinstance(o, Persist):
                self.records.append(o.record)
            else:
                sent.append(o)
        return sent


def new_core() -> LeaderCore:
    return LeaderCore(LeaderConfig(min_margin=2, timeouts=TIMEOUTS))


def committed_core(disk: Disk, now: float = 10.0) -> tuple[LeaderCore, int, int]:
    """A joined group whose first epoch just committed. Returns (core, epoch, S)."""
    core = new_core()
    for r in range(WORLD):
        assert core.on_hello(hello(r), now) == ""
    core.on_message(Counts(rank=0, from_step=0, to_step=10, counts=torch.ones(L, E, dtype=torch.int64)),
                    now)
    core.request_rebalance(force=True)
    (compute,) = core.on_tick(now)
    assert isinstance(compute, ComputePlan)
    sent = disk.run(core.on_plan_result(compute.request_id,
                                        PlanResult(new_placement(), 0.5, 0.9, 4, 0.01, ""), now))
    plan = sent[0].msg
    assert isinstance(plan, Plan)
    for r in range(WORLD):
        disk.run(core.on_message(PlanAck(rank=r, epoch=plan.epoch, step=20), now))
    for r in range(WORLD):
        sent = disk.run(core.on_message(Promise(rank=r, epoch=plan.epoch), now))
    assert [type(o.msg) for o in sent] == [Commit]
    return core, plan.epoch, sent[0].msg.step


def test_every_epoch_start_and_decision_is_on_record_before_it_is_sent() -> None:
    disk = Disk()
    core, epoch, switch = committed_core(disk)
    assert disk.records[0] == EpochStarted(epoch)
    decided = disk.records[-1]
    assert isinstance(decided, EpochDecided) and decided.commit and decided.switch_step == switch
    old, new = decided.placements()
    assert torch.equal(old, OLD) and torch.equal(new, new_placement())
    assert decided.world_size == WORLD and decided.num_experts == E


def test_a_restarted_leader_finishes_a_committed_epoch_with_ranks_rejoining_mid_copy() -> None:
    disk = Disk()
    _, epoch, switch = committed_core(disk)
    core = new_core()  # the restart: only the log survives
    assert disk.run(core.restore(disk.records, 100.0)) == []
    assert core.agreement is not None and core.agreement.phase is Phase.COMMITTED
    # rank 0 finished its copies; rank 1 rejoins with layer 0 switched, layer 2 not yet
    mid = OLD.clone()
    mid[0] = new_placement()[0]
    assert core.on_hello(hello(0, new_placement(), applied_epoch=epoch), 100.1) == ""
    assert core.on_joined(0) == [SendTo(0, Commit(epoch=epoch, step=switch))]
    assert core.on_hello(hello(1, mid), 100.2) == ""
    disk.run(core.on_message(done(0, epoch), 100.3))
    out = disk.run(core.on_message(done(1, epoch), 100.4))
    assert out == [] and core.agreement is None and not core.unsafe_reason
    assert torch.equal(core.placement, new_placement())
    assert disk.records[-1] == EpochEnded(epoch, succeeded=True)
    # and a second restart adopts that placement from the log
    again = new_core()
    again.restore(disk.records, 200.0)
    assert again.agreement is None and torch.equal(again.placement, new_placement())
    assert again.on_hello(hello(0, new_placement(), applied_epoch=epoch), 200.1) == ""


def test_an_epoch_never_decided_before_the_restart_is_aborted_on_record_and_answered() -> None:
    disk = Disk()
    core = new_core()
    for r in range(WORLD):
        core.on_hello(hello(r), 10.0)
    core.on_message(Counts(rank=0, from_step=0, to_step=10, counts=torch.ones(L, E, dtype=torch.int64)),
                    10.0)
    core.request_rebalance(force=True)
    (compute,) = core.on_tick(10.0)
    sent = disk.run(core.on_plan_result(compute.request_id,
                                        PlanResult(new_placement(), 0.5, 0.9, 4, 0.01, ""), 10.0))
    epoch = sent[0].msg.epoch
    for r in range(WORLD):
        disk.run(core.on_message(PlanAck(rank=r, epoch=epoch, step=20), 10.1))
    disk.run(core.on_message(Promise(rank=0, epoch=epoch), 10.2))  # then the leader dies

    restarted = new_core()
    out = restarted.restore(disk.records, 50.0)
    assert isinstance(out[0], Persist) and out[0].record.epoch == epoch \
        and not out[0].record.commit, "the abort is on record before it is sent"
    assert isinstance(out[1], Broadcast) and isinstance(out[1].msg, Abort)
    disk.run(out)
    assert restarted.on_hello(hello(0), 50.1) == ""
    assert restarted.on_message(OutcomeQuery(rank=0, epoch=epoch), 50.2) == \
        [SendTo(0, out[1].msg)]
    assert restarted._next_epoch > epoch, "an epoch number is never used twice"


def test_a_question_about_an_epoch_not_on_record_is_answered_abort_and_never_committed() -> None:
    disk = Disk()
    core = new_core()
    assert core.on_hello(hello(0), 1.0) == ""
    out = core.on_message(OutcomeQuery(rank=0, epoch=41), 1.1)
    assert isinstance(out[0], Persist) and out[0].record == EpochDecided(41, False,
                                                                         reason=out[1].msg.reason)
    assert out[1] == SendTo(0, Abort(epoch=41, reason=out[1].msg.reason,
                                        code=AbortCode.NOT_ON_RECORD))
    assert core._next_epoch == 42
    # asked again: the same answer, without a second record
    assert core.on_message(OutcomeQuery(rank=0, epoch=41), 1.2) == [out[1]]


def test_a_question_while_the_epoch_is_being_decided_gets_no_answer_yet() -> None:
    disk = Disk()
    core, epoch, switch = committed_core(disk)
    assert core.on_message(OutcomeQuery(rank=1, epoch=epoch), 11.0) == \
        [SendTo(1, Commit(epoch=epoch, step=switch))]
    # a new epoch in PLANNED: undecided
    core2 = new_core()
    for r in range(WORLD):
        core2.on_hello(hello(r), 1.0)
    core2.on_message(Counts(rank=0, from_step=0, to_step=10,
                            counts=torch.ones(L, E, dtype=torch.int64)), 1.0)
    core2.request_rebalance(force=True)
    (compute,) = core2.on_tick(1.0)
    sent = Disk().run(core2.on_plan_result(compute.request_id,
                                           PlanResult(new_placement(), 0.5, 0.9, 4, 0.01, ""), 1.0))
    assert core2.on_message(OutcomeQuery(rank=0, epoch=sent[0].msg.epoch), 1.1) == []


def test_a_worker_leaving_after_commit_is_waited_for_not_declared_unsafe() -> None:
    disk = Disk()
    core, epoch, _ = committed_core(disk)
    assert core.on_worker_left(1, "node 1 lost: its sidecar restarted", 11.0) == []
    assert not core.unsafe_reason and core.agreement.phase is Phase.COMMITTED
    assert core.on_hello(hello(1, new_placement()), 12.0) == ""  # it finished meanwhile
    disk.run(core.on_message(done(0, epoch), 12.1))
    disk.run(core.on_message(done(1, epoch), 12.2))
    assert core.agreement is None and not core.unsafe_reason
    assert core.history[-1].outcome == "committed"


def test_a_failure_on_the_deadline_is_cleared_by_late_dones_ok() -> None:
    disk = Disk()
    core, epoch, _ = committed_core(disk)
    disk.run(core.on_message(done(0, epoch), 11.0))
    disk.run(core.on_tick(11.0 + 10 * TIMEOUTS.done_s))
    assert core.unsafe_reason and core.history[-1].outcome == "failed"
    assert disk.records[-1] == EpochEnded(epoch, succeeded=False, reason=core.unsafe_reason.split(": ", 1)[1])
    disk.run(core.on_message(done(1, epoch), 400.0))
    assert not core.unsafe_reason and torch.equal(core.placement, new_placement())
    assert core.history[-1].outcome == "committed"
    assert disk.records[-1] == EpochEnded(epoch, succeeded=True)


def test_a_done_error_is_evidence_and_late_dones_do_not_clear_it() -> None:
    disk = Disk()
    core, epoch, _ = committed_core(disk)
    disk.run(core.on_message(done(1, epoch, ok=False), 11.0))
    assert "nccl" in core.unsafe_reason
    disk.run(core.on_message(done(0, epoch), 11.1))
    assert "nccl" in core.unsafe_reason and torch.equal(core.placement, OLD)


def test_a_rank_rejoining_with_a_placement_it_must_not_serve_is_evidence_of_divergence() -> None:
    disk = Disk()
    core, epoch, _ = committed_core(disk)
    for r in range(WORLD):
        disk.run(core.on_message(done(r, epoch), 11.0))
    core.on_worker_left(1, "restarted", 12.0)
    error = core.on_hello(hello(1, OLD, applied_epoch=epoch), 12.1)  # says it applied it: it lies
    assert "serves placement" in error and "rejoined" in core.unsafe_reason


def test_a_fresh_engine_after_everyone_left_defines_a_new_group() -> None:
    disk = Disk()
    core, epoch, _ = committed_core(disk)
    for r in range(WORLD):
        disk.run(core.on_message(done(r, epoch), 11.0))
    for r in range(WORLD):
        core.on_worker_left(r, "engine restarted", 12.0)
    assert core.on_hello(hello(0, OLD, applied_epoch=0), 13.0) == ""
    assert torch.equal(core.placement, OLD) and not core.unsafe_reason
    # while a rank is joined, a fresh rank with another placement is refused (not unsafe)
    assert "serves placement" in core.on_hello(hello(1, new_placement()), 13.1)
    assert not core.unsafe_reason


def test_a_burst_of_queued_reports_does_not_inflate_the_step_rate() -> None:
    core = new_core()
    core.on_hello(hello(0), 0.0)
    core.on_hello(hello(1), 0.0)
    for i in range(200):  # queued while the leader was down, read within 20 ms
        core.on_message(Heartbeat(rank=0, step=10 + 25 * i), 100.0 + i * 1e-4)
    assert core.steps_per_second() == 0.0
    for i in range(1, 21):  # then 100 steps/s for 2 s
        core.on_message(Heartbeat(rank=0, step=10 + 25 * 199 + 10 * i), 100.02 + 0.1 * i)
    assert core.steps_per_second() == pytest.approx(100, rel=0.1)


def test_the_count_window_is_a_running_sum_equal_to_the_sum_of_its_frames() -> None:
    core = LeaderCore(LeaderConfig(window_steps=50))
    core.on_hello(hello(0), 0.0)
    core.on_hello(hello(1), 0.0)
    rng = random.Random(3)
    frames = []
    for step in range(0, 400, 8):
        for rank in range(WORLD):
            c = torch.randint(0, 100, (L, E), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
            msg = Counts(rank=rank, from_step=step, to_step=step + 8, counts=c)
            frames.append(msg)
            core.on_message(msg, 1.0)
            newest = max(f.to_step for f in frames)
            expect = sum((f.counts for f in frames if f.to_step > newest - 50), torch.zeros(L, E, dtype=torch.int64))
            assert torch.equal(core.window_load(), expect)


def test_the_decision_log_survives_a_torn_last_line_and_refuses_a_corrupt_middle(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    records = [EpochStarted(1), EpochDecided(1, True, 40, old=OLD.tolist(), new=new_placement().tolist(),
                                             world_size=2, num_experts=E),
               EpochEnded(1, True), EpochStarted(2), EpochDecided(2, False, reason="refused")]
    for r in records:
        log.append(r)
    log.close()
    assert read_log(path) == records
    with open(path, "a") as f:
        f.write('{"kind":"decided","epoch":3,"com')  # the leader died mid-write
    assert read_log(path) == records
    reopened = DecisionLog(path)  # compacts: keeps every decision, the torn line is gone
    assert reopened.records == records
    reopened.close()
    text = path.read_text().split("\n")
    text.insert(1, "garbage")
    path.write_text("\n".join(text))
    with pytest.raises(DecisionLogError, match="move the file away"):
        read_log(path)
