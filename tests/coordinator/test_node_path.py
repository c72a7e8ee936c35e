"""A follower's core (with its node aggregator, the default) and the leader's core wired to
each other through the real envelopes, no sockets: every frame is encoded by one core and
opened (:func:`open_peer`) for the other, as the drivers do. The per-worker path (no
aggregator) runs the same epoch for comparison."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from eplb.coordinator.agreement import AgreementTimeouts, Phase
from eplb.coordinator.aggregate import AggregatorConfig, NodeAggregator
from eplb.coordinator.follower import FollowerCore
from eplb.coordinator.leader import LeaderConfig, LeaderCore
from eplb.coordinator.membership import NodeMembership
from eplb.coordinator.outputs import Admitted, Broadcast, ComputePlan, SendTo, ToLocal, Up
from eplb.placement.planner import PlanResult
from eplb.placement.rules import default_placement
from eplb.proto import (Abort, Commit, Counts, Done, Heartbeat, Hello, Message, NodeCounts, NodePromises, Plan, PlanAck,
                        Prepare, Promise, Refuse, Rejoin, Welcome, encode)
from eplb.proto.envelope import BROADCAST, open_peer, relay
from eplb.proto.reasons import AbortCode, RefuseCode

L, E, P = 2, 4, 8
NODE1 = (1, 2, 3)  # ranks behind the follower; rank 0 is on the leader's node
IDENTITY = b"node-1-aaaa"


@dataclass
class Wire:
    """The two cores and what crossed between them."""

    leader: LeaderCore
    follower: FollowerCore
    now: float = 10.0
    up_types: list[str] = field(default_factory=list)  # header type of every message sent up
    delivered: dict[int, list[Message]] = field(default_factory=dict)  # node-1 rank -> received

    def send(self, *msgs: Message) -> None:
        """Frames of node-1 workers, admitted in one burst."""
        self.up(self.follower.relay([Admitted(m.rank, m, encode(m)) for m in msgs], self.now))

    def local(self, msg: Message) -> None:
        """A frame of rank 0, on the leader's own node."""
        self.down(self.leader.on_worker(0, msg, self.now, local_ranks={0}))

    def up(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, ToLocal):
                for rank in NODE1 if out.rank == BROADCAST else (out.rank,):
                    self.delivered.setdefault(rank, []).append(out.msg)
            elif isinstance(out, Up):
                header, frames = open_peer(out.parts)
                self.up_types.append(header.TYPE)
                self.down(self.leader.on_peer(IDENTITY, header, frames, self.now, {0}))

    def down(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, Broadcast):
                parts = relay(0, [BROADCAST], [encode(out.msg)])
            elif isinstance(out, SendTo) and out.rank != 0:
                parts = relay(0, [out.rank], [encode(out.msg)])
            elif isinstance(out, ComputePlan):
                self.down(self.leader.on_plan_result(out.request_id, PlanResult(
                    moved(), 0.5, 0.9, 2, 0.01, ""), self.now))
                continue
            else:
                continue
            header, frames = open_peer(parts)
            self.up(self.follower.on_leader(header, parts[0], frames, self.now))

    def last(self, rank: int, kind: type) -> Message:
        return [m for m in self.delivered.get(rank, []) if isinstance(m, kind)][-1]


def moved() -> torch.Tensor:
    p = default_placement(L, E, P)
    p[0, 0], p[0, 1] = p[0, 1].clone(), p[0, 0].clone()
    return p


def hello(rank: int) -> Hello:
    return Hello(rank=rank, node=0 if rank == 0 else 1, world_size=4, num_layers=L, num_experts=E,
                 num_physical=P, bytes_per_expert=1, step=10, pid=100 + rank,
                 phys2log=default_placement(L, E, P))


def counts(rank: int, value: int) -> Counts:
    return Counts(rank=rank, from_step=0, to_step=10,
                  counts=torch.full((L, E), value, dtype=torch.int64))


def new_leader() -> LeaderCore:
    return LeaderCore(LeaderConfig(min_margin=2, timeouts=AgreementTimeouts(5.0, 5.0, 30.0)),
                      NodeMembership(num_nodes=2, node_timeout_s=3.0))


def wired(aggregate: bool = True, answer_wait_s: float = 1.0) -> Wire:
    leader = new_leader()
    aggregator = (NodeAggregator(1, AggregatorConfig(answer_wait_s=answer_wait_s))
                  if aggregate else None)
    follower = FollowerCore(1, "tcp://leader:5555", "aaaa", pid=7, aggregator=aggregator)
    w = Wire(leader, follower)
    w.up(follower.start())
    w.local(hello(0))
    for rank in NODE1:
        w.send(hello(rank))
        assert w.last(rank, Welcome).ok
    assert leader.group_complete and all(leader.members.node_of(r) == 1 for r in NODE1)
    if aggregate:
        assert follower.aggregator is not None and follower.aggregator.joined == set(NODE1)
    w.up_types.clear()
    return w


def planned(w: Wire) -> int:
    """Counts from every rank, a forced rebalance: the PLAN reached node 1. Returns the epoch."""
    w.local(counts(0, 1))
    w.send(*(counts(r, r) for r in NODE1))
    assert w.leader.request_rebalance(force=True)[0]
    w.down(w.leader.on_tick(w.now))
    plan = w.last(1, Plan)
    assert w.leader.agreement is not None and w.leader.agreement.phase is Phase.PLANNED
    return plan.epoch


def prepared(w: Wire) -> int:
    """:func:`planned`, every rank acked, and rank 0 promised: the leader waits for node 1's
    promises. Returns the epoch."""
    epoch = planned(w)
    w.local(PlanAck(rank=0, epoch=epoch, step=11))
    for rank in NODE1:
        w.send(PlanAck(rank=rank, epoch=epoch, step=11))
    assert w.leader.agreement.phase is Phase.PREPARING
    w.local(Promise(rank=0, epoch=epoch))
    return epoch


@pytest.mark.parametrize("aggregate", [True, False], ids=["per-node", "per-worker"])
def test_an_epoch_commits_only_once_every_rank_promised(aggregate: bool) -> None:
    w = wired(aggregate)
    epoch = planned(w)
    # the window holds every rank's counts exactly once, summed over the node or not
    assert torch.equal(w.leader.window_load(), torch.full((L, E), 1 + 1 + 2 + 3))  # rank 0: 1
    assert {r: w.leader.workers[r].step for r in NODE1} == {1: 10, 2: 10, 3: 10}
    w.local(PlanAck(rank=0, epoch=epoch, step=11))
    for rank in NODE1:
        w.send(PlanAck(rank=rank, epoch=epoch, step=11))
    assert w.leader.agreement.phase is Phase.PREPARING
    w.local(Promise(rank=0, epoch=epoch))
    for rank in NODE1:
        assert w.leader.agreement.phase is Phase.PREPARING  # I1: not before rank 3 promised
        w.send(Promise(rank=rank, epoch=epoch))
    commit = w.last(3, Commit)
    assert commit.epoch == epoch and w.leader.agreement.phase is Phase.COMMITTED
    w.local(Done(rank=0, epoch=epoch, ok=True, error="", bytes_received=1, copy_seconds=0.1,
                 hold_seconds=0.0))
    for rank in NODE1:
        w.send(Done(rank=rank, epoch=epoch, ok=True, error="", bytes_received=rank,
                    copy_seconds=0.1, hold_seconds=0.0))
    assert w.leader.agreement is None and w.leader.history[-1].outcome == "committed"
    assert torch.equal(w.leader.placement, moved())
    if aggregate:  # one frame per node and question
        assert w.up_types == ["NODE_COUNTS", "NODE_ACKS", "NODE_PROMISES", "NODE_DONE"]
    else:
        assert w.up_types == ["RELAY"] * (1 + 3 * len(NODE1))  # the counts came in one burst


def test_a_refusal_goes_up_at_once_and_aborts_the_epoch() -> None:
    w = wired()
    epoch = planned(w)
    w.send(PlanAck(rank=1, epoch=epoch, step=11))
    w.send(Refuse(rank=2, epoch=epoch, step=11, reason="too late for S", code=RefuseCode.TOO_LATE))
    assert w.up_types[-1] == "NODE_PROMISES"  # rank 3 not awaited: a refusal decides
    abort = w.last(1, Abort)
    assert abort.epoch == epoch and abort.code is AbortCode.REFUSED
    assert "too late for S" in abort.reason


def test_a_rank_that_leaves_is_no_longer_awaited_and_the_epoch_aborts() -> None:
    w = wired()
    epoch = prepared(w)
    w.send(Promise(rank=1, epoch=epoch), Promise(rank=2, epoch=epoch))
    assert w.up_types[-1] == "NODE_ACKS"  # the two promises wait for rank 3
    w.up(w.follower.worker_left(3, "BYE", w.now))
    assert w.up_types[-2:] == ["NODE_PROMISES", "WORKER_LEFT"]  # what is known goes up first
    assert w.last(1, Abort).code is AbortCode.WORKER_LEFT
    assert 3 not in w.leader.workers and 3 not in w.follower.aggregator.joined


def test_a_slow_rank_s_answers_go_up_after_the_wait_and_the_rest_follow() -> None:
    w = wired(answer_wait_s=0.5)
    epoch = planned(w)
    w.send(PlanAck(rank=1, epoch=epoch, step=11), PlanAck(rank=2, epoch=epoch, step=11))
    assert "NODE_ACKS" not in w.up_types
    w.now += 0.4
    w.up(w.follower.on_tick(w.now))
    assert "NODE_ACKS" not in w.up_types
    w.now += 0.2
    w.up(w.follower.on_tick(w.now))
    assert w.up_types.count("NODE_ACKS") == 1
    assert w.leader.agreement.phase is Phase.PLANNED  # rank 0 and rank 3 have not acked
    w.local(PlanAck(rank=0, epoch=epoch, step=11))
    w.send(PlanAck(rank=3, epoch=epoch, step=12))
    assert w.up_types.count("NODE_ACKS") == 2 and w.leader.agreement.phase is Phase.PREPARING
    assert isinstance(w.last(3, Prepare), Prepare)


def test_node_counts_naming_a_rank_of_another_node_are_dropped_and_it_is_asked_to_rejoin() -> None:
    w = wired()
    before = w.leader.window_load()
    stray = NodeCounts(node=1, ranks=(1, 9), steps=(12, 12), from_step=0, to_step=10,
                       counts=torch.ones(L, E, dtype=torch.int64))
    out = w.leader.on_peer(IDENTITY, stray, [], w.now, {0})
    assert [o.msg for o in out if isinstance(o, SendTo)] == [
        Rejoin(rank=9, reason="the leader does not know rank 9")]
    assert torch.equal(w.leader.window_load(), before)  # a sum cannot be split: all dropped
    assert w.leader.workers[1].step == 12  # the known rank's progress still counts
    assert w.leader.counters["rejected_counts"] == 1


def test_a_rejoin_passing_down_takes_the_rank_out_until_it_is_welcomed_again() -> None:
    w = wired()
    w.up(w.follower.on_leader(*_relayed_down(Rejoin(rank=2, reason="leader restarted")),
                              w.now))
    assert w.follower.aggregator.joined == {1, 3}
    w.send(hello(2))
    assert w.follower.aggregator.joined == set(NODE1)


def _relayed_down(msg: Message):
    parts = relay(0, [msg.rank], [encode(msg)])  # type: ignore[attr-defined]
    header, frames = open_peer(parts)
    return header, parts[0], frames


def test_worker_heartbeats_stop_at_the_node_and_its_heartbeat_carries_their_steps() -> None:
    w = wired()
    w.send(*(Heartbeat(rank=r, step=50 + r) for r in NODE1))
    assert w.up_types == []
    w.up(w.follower.heartbeat(list(NODE1)))
    assert w.up_types == ["NODE_HEARTBEAT"]
    assert {r: w.leader.workers[r].step for r in NODE1} == {1: 51, 2: 52, 3: 53}


def test_a_restarted_leader_asks_the_ranks_a_node_reports_to_join_again() -> None:
    w = wired()
    w.send(*(Heartbeat(rank=r, step=50) for r in NODE1))
    w.leader = new_leader()  # it knows no rank; the node's heartbeat is its first frame
    w.up(w.follower.heartbeat(list(NODE1)))
    assert all(isinstance(w.delivered[r][-1], Rejoin) for r in NODE1)
    assert w.follower.aggregator.joined == set()  # their frames pass through until welcomed
    w.send(*(hello(r) for r in NODE1))
    assert w.follower.aggregator.joined == set(NODE1)
    assert all(w.leader.members.node_of(r) == 1 for r in NODE1)


def test_node_answers_naming_a_rank_not_joined_there_go_rank_by_rank() -> None:
    w = wired()
    epoch = prepared(w)
    # node 1 claims rank 0's promise too (rank 0 joined through node 0): that one is not taken
    # from it, the rank is asked to join through node 1 again, the others' promises count
    claim = NodePromises(node=1, epoch=epoch, promised=(0, 1, 2), refused=())
    out = w.leader.on_peer(IDENTITY, claim, [], w.now, {0})
    assert [o.msg for o in out if isinstance(o, SendTo)] == [
        Rejoin(rank=0, reason="the leader does not know rank 0")]
    assert w.leader.agreement.promised == {0, 1, 2} and w.leader.agreement.phase is Phase.PREPARING
    w.send(*(Promise(rank=r, epoch=epoch) for r in NODE1))  # the node's own answer
    assert w.leader.agreement.phase is Phase.COMMITTED
