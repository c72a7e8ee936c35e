"""The sidecar's rank bindings, without sockets: who may hold a rank, and when it gives way."""

from __future__ import annotations

import os

from eplb.coordinator.worker_registry import (Admit, Refuse, Verdict, WorkerRegistry, pid_alive,
                                              relayed_hello_conflict)
from eplb.proto.envelope import rank_of_identity

T = 3.0  # worker time-out


def registry(alive: set[int]) -> WorkerRegistry:
    return WorkerRegistry(T, is_alive=lambda pid: pid in alive)


def test_a_live_holder_keeps_its_rank_and_the_impostor_is_refused() -> None:
    alive = {100, 200}
    reg = registry(alive)
    assert reg.hello(0, b"0.100.a", 100, now=0.0) == Admit(None)
    decision = reg.hello(0, b"0.200.b", 200, now=1.0)
    assert isinstance(decision, Refuse) and "pid 100" in decision.error
    assert reg.identity_of(0) == b"0.100.a"
    assert reg.check(0, b"0.100.a", 1.0) is Verdict.OK
    assert reg.check(0, b"0.200.b", 1.0) is Verdict.MISMATCH
    reg.heard(0, 2.0)
    assert reg.live == {0: 2.0}


def test_the_holder_saying_hello_again_keeps_its_rank() -> None:
    reg = registry({100})
    reg.hello(0, b"0.100.a", 100, now=0.0)
    assert reg.hello(0, b"0.100.a", 100, now=1.0) == Admit(None)
    assert reg.live == {0: 1.0}


def test_a_restarted_process_takes_over_at_once_when_the_old_pid_is_gone() -> None:
    alive = {100}
    reg = registry(alive)
    reg.hello(0, b"0.100.a", 100, now=0.0)
    alive.discard(100)
    alive.add(101)
    decision = reg.hello(0, b"0.101.b", 101, now=0.1)  # well within the time-out
    assert isinstance(decision, Admit) and decision.displaced.pid == 100
    assert reg.identity_of(0) == b"0.101.b"
    assert reg.check(0, b"0.100.a", 0.2) is Verdict.MISMATCH  # a stale frame of the old one


def test_a_silent_holder_is_declared_gone_once_stays_bound_and_gives_way() -> None:
    alive = {100, 200}
    reg = registry(alive)
    reg.hello(0, b"0.100.a", 100, now=0.0)
    reg.hello(1, b"1.300.c", 300, now=0.0)
    assert reg.tick(1.0) == [] and reg.tick(2.0) == []
    reg.heard(1, 2.9)
    assert reg.tick(3.0) == []  # not heard for exactly the time-out: still joined
    assert reg.tick(3.5) == [(0, 3.5)]
    assert reg.tick(3.6) == []  # reported once
    assert reg.live == {1: 2.9}
    assert [r for r, _ in reg.identities()] == [0, 1]  # broadcasts still reach the silent one
    assert reg.check(0, b"0.100.a", 3.3) is Verdict.SILENT
    # the silent holder comes back through a HELLO on the same connection
    assert reg.hello(0, b"0.100.a", 100, now=3.4) == Admit(None)
    assert reg.live.keys() == {0, 1}


def test_a_displaced_rank_comes_back_once_the_newcomer_is_gone() -> None:
    alive = {100, 200}
    reg = registry(alive)
    reg.hello(0, b"0.100.a", 100, now=0.0)
    for t in (1.0, 2.0, 3.0):
        reg.tick(t)
    assert reg.tick(4.0) == [(0, 4.0)]
    assert isinstance(reg.hello(0, b"0.200.b", 200, now=4.1), Admit)  # silent: displaced
    reg.tick(4.2)
    assert reg.check(0, b"0.100.a", 4.2) is Verdict.MISMATCH  # newcomer alive: stay out
    assert isinstance(reg.hello(0, b"0.100.a", 100, now=4.3), Refuse)
    alive.discard(200)  # the newcomer's process ends without BYE
    assert reg.check(0, b"0.100.a", 4.4) is Verdict.RECLAIM  # asked to say HELLO
    assert isinstance(reg.hello(0, b"0.100.a", 100, now=4.5), Admit)
    assert reg.identity_of(0) == b"0.100.a"


def test_bye_unbinds_and_the_displaced_rank_then_finds_it_unbound() -> None:
    reg = registry({100, 200})
    reg.hello(0, b"0.200.b", 200, now=0.0)
    assert reg.unbind(0).identity == b"0.200.b"
    assert reg.check(0, b"0.100.a", 0.1) is Verdict.UNBOUND
    assert reg.live == {} and reg.identities() == []


def test_a_pause_of_the_sidecar_does_not_declare_workers_gone() -> None:
    reg = registry({100})
    reg.hello(0, b"0.100.a", 100, now=0.0)
    reg.tick(0.5)
    assert reg.tick(60.0) == []  # SIGSTOP for a minute: the frames wait in the socket
    assert reg.pauses == 1 and reg.live == {0: 60.0}
    assert reg.tick(61.5) == []  # a gap of T/2 is no pause
    assert reg.tick(62.5) == [] and reg.tick(63.0) == []
    assert reg.tick(64.0) == [(0, 4.0)] and reg.pauses == 1


def test_identities_and_pids() -> None:
    assert rank_of_identity(b"12") == 12
    assert rank_of_identity(b"12.345.abcdef") == 12
    assert rank_of_identity(b"1x") is None and rank_of_identity(b".1") is None
    assert rank_of_identity(b"") is None
    assert pid_alive(os.getpid()) and not pid_alive(0) and not pid_alive(-5)
    assert pid_alive(1)  # init: exists (PermissionError counts as alive for other users)


def test_the_leader_refuses_a_second_node_claiming_a_listed_rank() -> None:
    rank_node = {3: 1}
    assert relayed_hello_conflict(3, 2, rank_node, {0: set(), 1: {3}, 2: set()})
    assert relayed_hello_conflict(3, 1, rank_node, {1: {3}}) is None  # its own node: rejoin
    assert relayed_hello_conflict(3, 2, rank_node, {0: set(), 1: set()}) is None  # node 1 let go
    assert relayed_hello_conflict(3, 2, rank_node, {0: set()}) is None  # node 1 is lost
    assert relayed_hello_conflict(4, 2, rank_node, {1: {3}}) is None  # nobody holds rank 4
    assert relayed_hello_conflict(3, 0, rank_node, {1: {3}})  # the leader's own workers too


def test_a_zombie_holder_counts_as_gone() -> None:
    """A worker that died but was not reaped yet (its parent is slow) must not keep its rank."""
    pid = os.posix_spawn("/bin/true", ["true"], os.environ)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
    try:
        assert not pid_alive(pid)
    finally:
        os.waitpid(pid, 0)
    assert not pid_alive(pid)
