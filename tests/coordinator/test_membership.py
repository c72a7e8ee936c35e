"""The leader's node membership, driven through LeaderCore with plain values (no sockets): lost
nodes, incarnations of a restarted follower, the relayed-HELLO conflict, rejoin throttling, and
the shutdown decision."""

from __future__ import annotations

import pytest
import torch

from eplb.coordinator.agreement import AgreementTimeouts, Phase
from eplb.coordinator.decision_log import EpochDecided
from eplb.coordinator.leader import SHUTDOWN_REASON, LeaderConfig, LeaderCore
from eplb.coordinator.membership import NodeMembership
from eplb.coordinator.outputs import Broadcast, ComputePlan, Persist, Reject, SendTo
from eplb.placement.planner import PlanResult
from eplb.coordinator.worker_registry import Impostor
from eplb.placement.rules import default_placement
from eplb.proto import (Abort, Commit, Counts, ControlRequest, Done, Heartbeat, Hello,
                        IdentityMismatch, InvalidField, NodeHeartbeat, NodeHello, PlanAck, Promise,
                        Rejoin, Relay, StaleIncarnation, Unauthenticated, Welcome, WorkerLeft,
                        encode)
from eplb.proto.reasons import AbortCode, EpochOutcome

L, E, P, WORLD = 2, 4, 8, 2
OLD = default_placement(L, E, P)
A, B = b"node-1-aaaa", b"node-1-bbbb"  # two incarnations of node 1's sidecar
TIMEOUTS = AgreementTimeouts(ack_s=5.0, promise_s=5.0, done_s=30.0)


def new_placement() -> torch.Tensor:
    p = OLD.clone()
    p[0, 0], p[0, 1] = OLD[0, 1], OLD[0, 0]
    return p


def hello(rank: int, phys2log: torch.Tensor = OLD) -> Hello:
    return Hello(rank=rank, node=rank, world_size=WORLD, num_layers=L, num_experts=E,
                 num_physical=P, bytes_per_expert=1, step=10, pid=100 + rank, phys2log=phys2log)


def node_hello(incarnation: bytes) -> NodeHello:
    return NodeHello(node=1, pid=7, incarnation=incarnation.decode()[-4:])


def relayed(*msgs) -> tuple[Relay, list[tuple[int, bytes]]]:
    """A RELAY from node 1 carrying ``msgs`` (each with a rank)."""
    return Relay(node=1, ranks=tuple(m.rank for m in msgs)), [(m.rank, encode(m)) for m in msgs]


def msgs(outputs, kind=None) -> list:
    return [o.msg for o in outputs if isinstance(o, (Broadcast, SendTo))
            and (kind is None or isinstance(o.msg, kind))]


def joined_core(num_nodes: int = 2, now: float = 10.0) -> LeaderCore:
    """Rank 0 on the leader's node, rank 1 through node 1 (incarnation A)."""
    core = LeaderCore(LeaderConfig(min_margin=2, timeouts=TIMEOUTS),
                      NodeMembership(num_nodes=num_nodes, node_timeout_s=3.0))
    assert core.on_peer(A, node_hello(A), [], now) == []
    out = core.on_worker(0, hello(0), now, local_ranks={0})
    assert msgs(out) == [Welcome(rank=0, ok=True, error="")] and out[0].node == 0
    out = core.on_peer(A, *relayed(hello(1)), now)
    assert msgs(out) == [Welcome(rank=1, ok=True, error="")] and out[0].node == 1
    assert core.group_complete and core.members.node_of(1) == 1
    return core


def start_epoch(core: LeaderCore, now: float) -> int:
    """Count, force a rebalance and plan: an epoch in PLANNED. Returns its number."""
    core.on_message(Counts(rank=0, from_step=0, to_step=10,
                           counts=torch.ones(L, E, dtype=torch.int64)), now)
    assert core.request_rebalance(force=True)[0]
    (compute,) = [o for o in core.on_tick(now) if isinstance(o, ComputePlan)]
    core.on_plan_result(compute.request_id,
                        PlanResult(new_placement(), 0.5, 0.9, 2, 0.01, ""), now)
    assert core.agreement is not None and core.agreement.phase is Phase.PLANNED
    return core.agreement.epoch


def commit_epoch(core: LeaderCore, now: float) -> tuple[int, int]:
    """An epoch through PREPARE to COMMIT, rank 1's frames relayed by incarnation A."""
    epoch = start_epoch(core, now)
    core.on_worker(0, PlanAck(rank=0, epoch=epoch, step=20), now)
    core.on_peer(A, *relayed(PlanAck(rank=1, epoch=epoch, step=20)), now)
    core.on_worker(0, Promise(rank=0, epoch=epoch), now)
    out = core.on_peer(A, *relayed(Promise(rank=1, epoch=epoch)), now)
    (commit,) = msgs(out, Commit)
    return epoch, commit.step


def test_a_lost_node_s_ranks_leave_and_the_epoch_aborts() -> None:
    core = joined_core()
    epoch = start_epoch(core, 10.0)
    out: list = []
    for i in range(1, 9):  # ticks every 0.5 s (no pause); node 1 says nothing after t=10
        core.on_worker(0, Heartbeat(rank=0, step=11), 10.0 + 0.5 * i)
        out += core.on_tick(10.0 + 0.5 * i)
    (abort,) = msgs(out, Abort)
    assert abort.epoch == epoch and abort.code is AbortCode.NODE_LOST
    assert "node 1 lost" in abort.reason
    assert core.workers.keys() == {0} and core.members.node_of(1) is None
    assert 1 not in core.members.nodes
    record = core.history[-1]
    assert record.outcome == EpochOutcome.ABORTED and record.abort_code is AbortCode.NODE_LOST
    assert record.outcome == "aborted"  # the history's strings are unchanged


def test_a_paused_leader_does_not_lose_its_followers() -> None:
    core = joined_core()
    core.on_tick(10.1)
    assert core.on_tick(14.0) == []  # 3.9 s between ticks: the leader itself was paused
    assert 1 in core.members.nodes and core.workers.keys() == {0, 1}
    for i in range(1, 8):  # then ticks every 0.5 s: node 1's silence is real
        core.on_tick(14.0 + 0.5 * i)
    assert 1 not in core.members.nodes and core.workers.keys() == {0}


def test_a_relayed_hello_for_a_rank_another_live_node_lists_is_refused_for_now() -> None:
    core = joined_core(num_nodes=3)
    core.on_peer(A, NodeHeartbeat(node=1, ranks=(1,)), [], 10.5)
    c = b"node-2-cccc"
    core.on_peer(c, NodeHello(node=2, pid=8, incarnation="cccc"), [], 10.5)
    out = core.on_peer(c, Relay(node=2, ranks=(1,)), [(1, encode(hello(1)))], 10.6)
    assert isinstance(out[0], Reject) and isinstance(out[0].error, Impostor)
    assert out[1] == SendTo(1, Welcome(rank=1, ok=False, error=out[1].msg.error, retry=True), 2)
    assert out[1].node == 2 and "node 1" in out[1].msg.error
    assert core.members.node_of(1) == 1 and core.workers.keys() == {0, 1}
    # once node 1 no longer lists it, the rank may move
    core.on_peer(A, NodeHeartbeat(node=1, ranks=()), [], 10.7)
    out = core.on_peer(c, Relay(node=2, ranks=(1,)), [(1, encode(hello(1)))], 10.8)
    assert msgs(out) == [Welcome(rank=1, ok=True, error="")] and core.members.node_of(1) == 2


def test_a_relayed_hello_for_a_rank_of_the_leader_s_own_node_is_refused() -> None:
    core = joined_core()
    out = core.on_peer(A, *relayed(hello(0)), 10.5, local_ranks={0})
    assert isinstance(out[0].error, Impostor) and out[1].msg.retry and out[1].node == 1
    assert core.members.node_of(0) == 0


def test_a_local_hello_for_a_rank_a_live_follower_lists_is_refused_too() -> None:
    core = joined_core()
    core.on_peer(A, NodeHeartbeat(node=1, ranks=(1,)), [], 10.5)
    out = core.on_worker(0, hello(1), 10.6, local_ranks={0, 1})
    assert out[1].msg.retry and not out[1].msg.ok and out[1].node == 0


def test_a_rank_the_leader_does_not_know_is_asked_to_rejoin_at_most_once_a_second() -> None:
    core = joined_core()
    unknown = Heartbeat(rank=1, step=12)
    core.members.rank_node.pop(1)  # as after a leader restart: rank 1 never said HELLO here
    out = core.on_peer(A, *relayed(unknown), 11.0)
    assert out == [SendTo(1, Rejoin(rank=1, reason=out[0].msg.reason), 1)] and out[0].node == 1
    assert core.on_peer(A, *relayed(unknown), 11.5) == []
    assert core.on_peer(A, *relayed(unknown), 11.99) == []
    assert msgs(core.on_peer(A, *relayed(unknown), 12.0), Rejoin)


def test_a_relayed_frame_of_another_rank_than_its_envelope_is_rejected_alone() -> None:
    core = joined_core()
    header = Relay(node=1, ranks=(1, 1))
    frames = [(1, encode(Heartbeat(rank=0, step=99))), (1, encode(Heartbeat(rank=1, step=15)))]
    out = core.on_peer(A, header, frames, 10.5)
    assert len(out) == 1 and isinstance(out[0].error, IdentityMismatch)
    assert core.workers[1].step == 15 and core.workers[0].step == 10


def test_shutdown_aborts_an_uncommitted_epoch_on_record_first() -> None:
    core = joined_core()
    epoch = start_epoch(core, 10.0)
    out = core.shutdown(10.5)
    assert out == [Persist(EpochDecided(epoch, commit=False, reason=SHUTDOWN_REASON)),
                   Broadcast(Abort(epoch=epoch, reason=SHUTDOWN_REASON, code=AbortCode.SHUTDOWN))]
    assert core.agreement is None and core.decided[epoch] == out[1].msg


def test_shutdown_repeats_a_committed_commit_and_never_aborts_it() -> None:
    core = joined_core()
    epoch, switch = commit_epoch(core, 10.0)
    assert core.shutdown(10.5) == [Broadcast(Commit(epoch=epoch, step=switch))]
    assert core.agreement is not None and core.agreement.phase is Phase.COMMITTED
    assert core.shutdown(10.6) == [Broadcast(Commit(epoch=epoch, step=switch))]


def test_shutdown_without_an_epoch_sends_nothing() -> None:
    assert joined_core().shutdown(10.5) == []


@pytest.mark.parametrize("phase", ["planned", "committed"])
def test_a_follower_restarted_mid_epoch_gets_its_ranks_back(phase: str) -> None:
    """The lost-instance sequence: node 1's sidecar restarts (incarnation B) mid-epoch while
    frames of incarnation A still wait in the leader's socket. A's ranks are released once, A's
    late frames are refused as stale and cannot take the node back, and rank 1 rejoins through
    B: WELCOME, and the committed epoch's COMMIT again."""
    core = joined_core()
    if phase == "planned":
        epoch = start_epoch(core, 10.0)
    else:
        epoch, switch = commit_epoch(core, 10.0)
    out = core.on_peer(B, node_hello(B), [], 11.0)  # B says NODE_HELLO: A is replaced
    assert core.members.identity_of(1) == B and core.members.node_of(1) is None
    if phase == "planned":
        (abort,) = msgs(out, Abort)
        assert abort.code is AbortCode.NODE_LOST and "restarted" in abort.reason
    else:
        assert msgs(out) == [] and core.agreement.phase is Phase.COMMITTED  # never aborted
    # A's frames, read after B's hello (fair queuing), are stale: node 1 stays B
    for header, frames in [(NodeHeartbeat(node=1, ranks=(1,)), []), relayed(Heartbeat(rank=1, step=30)),
                           (WorkerLeft(node=1, rank=1, reason="x"), [])]:
        with pytest.raises(StaleIncarnation):
            core.on_peer(A, header, frames, 11.1)
    assert core.members.identity_of(1) == B
    # rank 1 rejoins through B
    out = core.on_peer(B, *relayed(hello(1, OLD)), 11.2)
    assert msgs(out)[0] == Welcome(rank=1, ok=True, error="") and out[0].node == 1
    assert core.members.node_of(1) == 1
    if phase == "committed":
        assert msgs(out, Commit) == [Commit(epoch=epoch, step=switch)]
        core.on_peer(B, *relayed(Done(rank=1, epoch=epoch, ok=True, error="",
                                       bytes_received=1, copy_seconds=0.1,
                                       hold_seconds=0.0)), 11.3)
        core.on_worker(0, Done(rank=0, epoch=epoch, ok=True, error="", bytes_received=1,
                               copy_seconds=0.1, hold_seconds=0.0), 11.4)
        assert core.history[-1].outcome == EpochOutcome.COMMITTED and not core.unsafe_reason
    # B's heartbeats keep node 1 alive: no second release
    core.on_peer(B, NodeHeartbeat(node=1, ranks=(1,)), [], 11.5)
    assert core.workers.keys() == {0, 1}


def test_a_restarted_leader_takes_a_follower_s_first_relay_as_its_hello() -> None:
    """The leader restarted after its follower: the follower's NODE_HELLO went to the previous
    leader. Its first RELAY (a rank's HELLO) is not dropped; it makes node 1 known."""
    core = LeaderCore(LeaderConfig(timeouts=TIMEOUTS), NodeMembership(2, 3.0))
    core.on_worker(0, hello(0), 1.0, local_ranks={0})
    out = core.on_peer(A, *relayed(hello(1)), 1.1)
    assert msgs(out) == [Welcome(rank=1, ok=True, error="")] and core.members.identity_of(1) == A
    assert core.group_complete


def test_a_relay_from_an_unknown_connection_does_not_displace_a_live_node() -> None:
    core = joined_core()
    with pytest.raises(InvalidField, match="has not said NODE_HELLO"):
        core.on_peer(b"node-1-zzzz", *relayed(Heartbeat(rank=1, step=40)), 10.5)
    assert core.members.identity_of(1) == A and core.workers.keys() == {0, 1}


def test_a_node_outside_num_nodes_is_refused_and_reported() -> None:
    core = joined_core()
    with pytest.raises(InvalidField):
        core.on_peer(b"node-5-x", NodeHeartbeat(node=5, ranks=()), [], 10.5)
    assert "node(s) [5]" in core.node_count_mismatch(10.6)
    assert core.node_count_mismatch(10.6 + 9.1) == ""  # forgotten after 3 x --node-timeout


def test_control_over_tcp_needs_a_key_or_a_node_that_spoke() -> None:
    core = joined_core()
    status = ControlRequest(request_id="r", op="status")
    with pytest.raises(Unauthenticated):
        core.on_peer_control(b"stranger", None, status, {}, "inc", 10.5)
    reply = core.on_peer_control(A, None, status, {"node": 0}, "inc", 10.5)
    assert reply.ok and reply.result["nodes"] == {"1": 0.5} and reply.result["leader"] == {"node": 0}
    reply = core.on_control(ControlRequest(request_id="q", op="rebalance", args={"force": True}),
                            "node 1", {}, "inc", 10.5)
    assert reply.ok and reply.result["incarnation"] == "inc"


def test_the_step_rate_follows_the_lowest_joined_rank_also_after_it_leaves():
    """The decode rate is sampled from the lowest joined rank's progress only (kept as ranks join
    and leave, not recomputed per frame: that was O(ranks) per frame)."""
    core = joined_core()
    core.on_message(Heartbeat(rank=1, step=50), 11.0)  # not the lowest rank: no sample
    assert [step for _, step in core._rate_samples] == []
    core.on_message(Heartbeat(rank=0, step=20), 11.0)
    assert [step for _, step in core._rate_samples] == [20]
    core.on_worker_left(0, "test", 12.0)
    core.on_message(Heartbeat(rank=1, step=60), 13.0)  # rank 1 is the lowest now
    assert [step for _, step in core._rate_samples] == [20, 60]
