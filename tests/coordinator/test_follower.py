"""The follower's core and the local admission both roles share, driven with plain values."""

from __future__ import annotations

import pytest

from eplb.coordinator.follower import FollowerCore
from eplb.coordinator.outputs import Admitted, LocalLeft, Reject, ToControl, ToLocal, Up
from eplb.coordinator.worker_registry import Impostor, LocalAdmission
from eplb.placement.rules import default_placement
from eplb.proto import (Bye, ControlReply, ControlRequest, Heartbeat, Hello, InvalidField,
                        NodeHeartbeat, NodeHello, Plan, Rejoin, Relay, Welcome, WorkerLeft, decode,
                        encode)
from eplb.proto.envelope import BROADCAST, open_peer

L, E, P = 2, 4, 8


def follower() -> FollowerCore:
    return FollowerCore(1, "tcp://leader:5555", "inc1", node_timeout_s=3.0,
                        control_timeout_s=5.0, pid=42)


def hello(rank: int, pid: int = 100) -> Hello:
    return Hello(rank=rank, node=1, world_size=4, num_layers=L, num_experts=E, num_physical=P,
                 bytes_per_expert=1, step=3, pid=pid, phys2log=default_placement(L, E, P))


def up_messages(outputs) -> list:
    return [decode(o.parts[0]) for o in outputs if isinstance(o, Up)]


def test_node_hello_goes_first_and_again_after_the_leader_was_silent() -> None:
    f = follower()
    assert up_messages(f.start()) == [NodeHello(node=1, pid=42, incarnation="inc1")]
    beat = NodeHeartbeat(node=0, ranks=(0,))
    assert f.on_leader(beat, encode(beat), [], 10.0) == []
    assert f.on_leader(beat, encode(beat), [], 12.9) == []  # within the node time-out
    again = f.on_leader(beat, encode(beat), [], 16.0)  # a restarted leader never had the first
    assert up_messages(again) == [NodeHello(node=1, pid=42, incarnation="inc1")]
    assert f.link_readiness(16.5)[0] and not f.link_readiness(19.6)[0]


def test_a_forwarded_control_request_times_out_with_an_error_reply() -> None:
    f = follower()
    req = ControlRequest(request_id="r1", op="rebalance", args={})
    out = f.on_control(b"client", req, encode(req), 10.0, local_status=dict)
    assert out == [Up([encode(req)])]
    assert f.on_tick(14.9) == []
    (reply,) = f.on_tick(15.1)
    assert isinstance(reply, ToControl) and reply.identity == b"client"
    answer = decode(reply.frame)
    assert not answer.ok and answer.request_id == "r1" and "did not answer within 5s" in answer.error
    assert f.pending_control == {}
    # a reply that comes after the time-out goes nowhere
    late = ControlReply(request_id="r1", ok=True, result={}, error="")
    assert f.on_leader(late, encode(late), [], 15.2) == []


def test_a_control_reply_goes_to_the_client_that_asked() -> None:
    f = follower()
    req = ControlRequest(request_id="r2", op="status", args={})
    f.on_control(b"client", req, encode(req), 10.0, local_status=dict)
    reply = ControlReply(request_id="r2", ok=True, result={"x": 1}, error="")
    assert f.on_leader(reply, encode(reply), [], 10.1) == [ToControl(b"client", encode(reply))]


def test_a_local_status_is_answered_without_the_leader() -> None:
    f = follower()
    req = ControlRequest(request_id="r3", op="status", args={"local": True})
    (out,) = f.on_control(b"c", req, encode(req), 10.0, local_status=lambda: {"node": 1})
    assert decode(out.frame).result == {"node": 1} and f.pending_control == {}


def test_frames_from_the_leader_are_decoded_before_they_reach_a_worker() -> None:
    f = follower()
    plan = Plan(epoch=3, phys2log=default_placement(L, E, P), plan_hash="x", layers_per_chunk=1)
    parts = [encode(Relay(node=0, ranks=(BROADCAST, 2))), encode(plan), b"junk"]
    header, frames = open_peer(parts)
    out = f.on_leader(header, parts[0], frames, 10.0)
    assert isinstance(out[0], ToLocal) and out[0].rank == BROADCAST
    assert out[0].frame == encode(plan) and out[0].msg.epoch == 3 and out[0].identity is None
    assert isinstance(out[1], Reject) and len(out) == 2
    with pytest.raises(InvalidField):
        f.on_leader(plan, encode(plan), [], 10.1)


def test_a_burst_of_admitted_frames_is_relayed_as_one_envelope() -> None:
    f = follower()
    beats = [Heartbeat(rank=r, step=5) for r in (2, 3)]
    (up,) = f.relay([Admitted(b.rank, b, encode(b)) for b in beats], 10.0)
    header, frames = open_peer(up.parts)
    assert header == Relay(node=1, ranks=(2, 3)) and [decode(x) for _, x in frames] == beats
    assert f.relay([], 10.0) == []
    assert up_messages(f.worker_left(2, "bye", 10.0)) == [WorkerLeft(node=1, rank=2, reason="bye")]


def test_admission_binds_refuses_and_asks_for_hello() -> None:
    alive = {100: True, 200: True}
    adm = LocalAdmission(1, timeout_s=3.0, is_alive=lambda pid: alive.get(pid, False))
    h = hello(2)
    out = adm.on_frame(b"2.100", 2, h, encode(h), 1.0)
    assert out == [Admitted(2, h, encode(h))] and adm.live.keys() == {2}
    # a second live process claims rank 2: refused for now, the holder keeps it
    h2 = hello(2, pid=200)
    out = adm.on_frame(b"2.200", 2, h2, encode(h2), 1.1)
    assert isinstance(out[0], Reject) and isinstance(out[0].error, Impostor)
    assert isinstance(out[1], ToLocal) and out[1].identity == b"2.200"
    assert not out[1].msg.ok and out[1].msg.retry
    # a frame of a rank nobody holds: REJOIN, at most once a second per connection
    beat = Heartbeat(rank=3, step=1)
    (rejoin,) = adm.on_frame(b"3.300", 3, beat, encode(beat), 1.2)
    assert isinstance(rejoin.msg, Rejoin) and rejoin.identity == b"3.300"
    assert adm.on_frame(b"3.300", 3, beat, encode(beat), 1.7) == []
    assert adm.on_frame(b"3.300", 3, beat, encode(beat), 2.2) != []
    # BYE from the holder unbinds it
    adm2 = LocalAdmission(1, timeout_s=3.0, is_alive=lambda pid: True)
    adm2.on_frame(b"2.100", 2, h, encode(h), 1.0)
    bye = Bye(rank=2)
    assert adm2.on_frame(b"2.100", 2, bye, encode(bye), 1.1) == [LocalLeft(2, "said goodbye")]
    assert adm2.registry.identity_of(2) is None


def test_admission_declares_a_silent_worker_gone_once() -> None:
    adm = LocalAdmission(1, timeout_s=3.0, is_alive=lambda pid: True)
    h = hello(2)
    adm.on_frame(b"2.100", 2, h, encode(h), 1.0)
    assert adm.on_tick(2.0) == [] and adm.on_tick(3.0) == [] and adm.on_tick(4.0) == []
    (left,) = adm.on_tick(4.5)
    assert left.rank == 2 and "no heartbeat" in left.why
    assert adm.on_tick(5.0) == []


def test_a_refused_welcome_unbinds_the_rank() -> None:
    adm = LocalAdmission(1, timeout_s=3.0, is_alive=lambda pid: True)
    h = hello(2)
    adm.on_frame(b"2.100", 2, h, encode(h), 1.0)
    adm.delivered(2, Welcome(rank=2, ok=True, error=""), b"2.100")
    assert adm.registry.identity_of(2) == b"2.100"
    # a refusal sent to an impostor's connection leaves the holder bound
    adm.delivered(2, Welcome(rank=2, ok=False, error="held", retry=True), b"2.999")
    assert adm.registry.identity_of(2) == b"2.100"
    adm.delivered(2, Welcome(rank=2, ok=False, error="bad placement"), b"2.100")
    assert adm.registry.identity_of(2) is None and 2 not in adm.live


def test_a_hello_from_a_new_process_displaces_a_dead_holder_which_leaves_first() -> None:
    alive = {100: True}
    adm = LocalAdmission(1, timeout_s=3.0, is_alive=lambda pid: alive.get(pid, False))
    h = hello(2)
    adm.on_frame(b"2.100", 2, h, encode(h), 1.0)
    alive[100] = False
    h2 = hello(2, pid=200)
    out = adm.on_frame(b"2.200", 2, h2, encode(h2), 1.5)
    assert isinstance(out[0], LocalLeft) and out[0].rank == 2 and "100 is gone" in out[0].why
    assert out[1] == Admitted(2, h2, encode(h2))


def test_open_peer_counts_ranks_against_frames() -> None:
    with pytest.raises(Exception, match="names 2 ranks but carries 1"):
        open_peer([encode(Relay(node=1, ranks=(1, 2))), b"x"])
    with pytest.raises(Exception, match="only RELAY"):
        open_peer([encode(NodeHeartbeat(node=1, ranks=())), b"x"])
