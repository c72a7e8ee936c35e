"""Issue 13, identity, on live daemons: a rank belongs to the connection and process that said
HELLO. An impostor is refused and counted while the real rank keeps working, a restarted worker
process rejoins at once, a rank displaced while silent comes back, and a follower paused for
longer than the worker time-out keeps its workers."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq

from eplb.control_client import control_call
from eplb.demo.cluster import LocalCluster
from eplb.paths import workers_endpoint
from eplb.placement.rules import default_placement
from eplb.proto import Commit, Heartbeat, Hello, Plan, Prepare, Welcome, decode, encode
from eplb.worker_hook import HookError, WorkerHook

L, E, P, WORLD = 2, 4, 6, 2
WORKER = str(Path(__file__).with_name("worker_proc.py"))


def make_cluster(tag: str, worker_timeout: float) -> LocalCluster:
    # greedy plans from scratch, so a forced rebalance always changes the placement
    return LocalCluster(2, ["--interval", "1000000", "--planner", "thread", "--window", "100",
                            "--policy", "greedy", "--worker-timeout", str(worker_timeout),
                            "--node-timeout", "60"],
                        base_dir=Path(tempfile.mkdtemp(prefix=f"eplb{tag}", dir="/tmp")))


def running(tag: str, worker_timeout: float):
    with make_cluster(tag, worker_timeout) as c:
        c.start()
        c.wait_ready(60.0)
        yield c
    shutil.rmtree(c.base_dir, ignore_errors=True)


@pytest.fixture()
def cluster():
    """Workers time out only after 30 s: whatever happens sooner is not a time-out."""
    yield from running("i", 30)


@pytest.fixture()
def quick_cluster():
    """Workers time out after 2 s."""
    yield from running("q", 2)


class WorkerProc:
    """``worker_proc.py`` in a child process; its stdout lines arrive on a queue."""

    def __init__(self, cluster: LocalCluster, rank: int, node: int, *extra: str,
                 **popen: object) -> None:
        log = open(cluster.log_dir / f"worker{rank}-{time.monotonic_ns()}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, str(rank), str(WORLD), str(cluster.run_dir(node)),
             "--node", str(node), *extra], stdout=subprocess.PIPE, stderr=log, text=True,
            **popen)
        log.close()
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # EOF

    def expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} from the worker within {timeout_s}s") from None
            if line.startswith(prefix):
                return line
            assert line, f"the worker exited ({self.proc.poll()}) before saying {prefix!r}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)  # reaped: its pid is gone


def hello(rank: int, node: int, pid: int) -> bytes:
    return encode(Hello(rank=rank, node=node, world_size=WORLD, num_layers=L, num_experts=E,
                        num_physical=P, bytes_per_expert=0, step=0, pid=pid,
                        phys2log=default_placement(L, E, P)))


def dealer(endpoint: str, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, kind: type, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        if sock.poll(int(remaining * 1000)):
            msg = decode(sock.recv())
            if isinstance(msg, kind):
                return msg
    raise AssertionError(f"no {kind.__name__} within {timeout_s}s")


def rejected(cluster: LocalCluster, node: int) -> Counter[str]:
    local = control_call("status", {"local": True}, cluster.run_dir(node))
    return Counter(local.get("leader", local)["frames_rejected"])


def joined_hooks(cluster: LocalCluster, copies: list[tuple[int, int]],
                 **kwargs) -> list[WorkerHook]:
    """In-process hooks for ranks 0 and 1 (node = rank), joined; copies note (rank, epoch)."""
    hooks = [WorkerHook(r, WORLD, L, E, P, node=r, run_dir=cluster.run_dir(r), flush_every=2,
                        copy_fn=lambda e, layers, old, new, r=r: copies.append((r, e)), **kwargs)
             for r in range(WORLD)]
    for h in hooks:
        h.wait_joined(30)
    return hooks


def test_an_impostor_is_refused_and_counted_while_the_real_ranks_keep_working(
        cluster, decode_loop, commit_once) -> None:
    copies: list[tuple[int, int]] = []
    hooks = joined_hooks(cluster, copies)
    loop = decode_loop(hooks, hot=lambda step: (step // 50) % E)
    joined = cluster.status()["counters"]["joined"]
    before = {node: rejected(cluster, node) for node in (0, 1)}
    impostors = []
    # Each live rank claimed on its own node and through the other one, with the bare rank as
    # identity (what ROUTER_HANDOVER handed the rank to) and with one shaped like the hook's.
    for node in (0, 1):
        for rank in (0, 1):
            for identity in (str(rank).encode(), f"{rank}.{os.getpid()}.beef".encode()):
                sock = dealer(workers_endpoint(cluster.run_dir(node)), identity)
                sock.send(hello(rank, node, os.getpid()))
                welcome = receive(sock, Welcome, 10)
                assert not welcome.ok and welcome.retry, welcome
                assert f"rank {rank}" in welcome.error
                sock.send(encode(Heartbeat(rank=rank, step=10**6)))  # dropped: not its rank
                impostors.append(sock)
    # Counted where refused: rank 0 on node 0 and rank 1 on node 1 by their sidecars; each rank
    # through the other node by the leader (the follower relays its HELLO of rank 0).
    after = {node: rejected(cluster, node) for node in (0, 1)}
    assert after[0]["impostor"] - before[0]["impostor"] == 6
    assert after[1]["impostor"] - before[1]["impostor"] == 2
    status = cluster.wait_for(lambda s: rejected(cluster, 1)["identity_mismatch"]
                              > before[1]["identity_mismatch"], 10, "impostor's frame counted")
    assert status["workers"] == [0, 1] and status["counters"]["joined"] == joined
    # The real ranks take part in a rebalance; the impostors see none of it.
    steps = [h.current_step for h in hooks]
    status = commit_once(cluster)
    epoch = status["history"][-1]["epoch"]
    assert {(0, epoch), (1, epoch)} <= set(copies)
    assert all(h.current_step > s for h, s in zip(hooks, steps)) and not loop.errors
    assert status["counters"]["joined"] == joined
    for sock in impostors:
        while sock.poll(0):
            assert not isinstance(decode(sock.recv()), (Plan, Prepare, Commit))
        sock.close()


def test_a_restarted_worker_process_rejoins_at_once(cluster, decode_loop, commit_once) -> None:
    hook = WorkerHook(0, WORLD, L, E, P, node=0, run_dir=cluster.run_dir(0), flush_every=2,
                      copy_fn=lambda *a: None)
    hook.wait_joined(30)
    decode_loop([hook])
    first = WorkerProc(cluster, 1, 1)
    first.expect("joined", 30)
    first.kill()  # no BYE; the sidecar last heard it well within the 30 s time-out
    started = time.monotonic()
    second = WorkerProc(cluster, 1, 1)
    second.expect("joined", 10)
    assert time.monotonic() - started < 10
    try:
        status = commit_once(cluster)
        second.expect(f"copy {status['history'][-1]['epoch']}", 10)
    finally:
        second.kill()


def test_a_rank_displaced_while_silent_comes_back_once_the_newcomer_is_gone(
        quick_cluster, decode_loop, commit_once) -> None:
    cluster = quick_cluster
    hook = WorkerHook(0, WORLD, L, E, P, node=0, run_dir=cluster.run_dir(0), flush_every=2,
                      copy_fn=lambda *a: None)
    hook.wait_joined(30)
    decode_loop([hook])
    original = WorkerProc(cluster, 1, 1)
    newcomer = None
    try:
        original.expect("joined", 30)
        original.proc.send_signal(signal.SIGSTOP)
        cluster.wait_for(lambda s: s["workers"] == [0], 20, "the stopped rank 1 declared gone")
        newcomer = WorkerProc(cluster, 1, 1)
        newcomer.expect("joined", 10)
        status = cluster.wait_for(lambda s: s["workers"] == [0, 1], 10, "newcomer joined")
        joined = status["counters"]["joined"]
        newcomer.kill()
        original.proc.send_signal(signal.SIGCONT)  # its frames: the holder is gone, join again
        cluster.wait_for(lambda s: s["workers"] == [0, 1] and s["counters"]["joined"] > joined,
                         20, "the original rank 1 joined again")
        status = commit_once(cluster)
        original.expect(f"copy {status['history'][-1]['epoch']}", 10)
    finally:
        original.proc.send_signal(signal.SIGCONT)
        original.kill()
        if newcomer is not None:
            newcomer.kill()


def test_a_paused_follower_keeps_its_workers(quick_cluster, decode_loop, commit_once) -> None:
    cluster = quick_cluster
    copies: list[tuple[int, int]] = []
    hooks = joined_hooks(cluster, copies, heartbeat_s=0.2)
    loop = decode_loop(hooks, hot=lambda step: (step // 50) % E)
    joined = cluster.status()["counters"]["joined"]
    follower = cluster.sidecars[1]
    follower.send_signal(signal.SIGSTOP)
    try:
        time.sleep(5)  # the pause itself: 2.5 worker time-outs
    finally:
        follower.send_signal(signal.SIGCONT)
    status = commit_once(cluster)
    epoch = status["history"][-1]["epoch"]
    assert {(0, epoch), (1, epoch)} <= set(copies) and not loop.errors
    assert status["counters"]["joined"] == joined, "rank 1 was dropped and had to join again"
    log = (cluster.log_dir / "sidecar1.log").read_text()
    assert "did not run for" in log and "rank 1 left" not in log


def test_a_second_hook_for_a_live_rank_waits_until_the_first_says_bye(cluster) -> None:
    first = WorkerHook(1, WORLD, L, E, P, node=1, run_dir=cluster.run_dir(1),
                       copy_fn=lambda *a: None)
    open_hooks = [first]
    try:
        first.wait_joined(30)
        second = WorkerHook(1, WORLD, L, E, P, node=1, run_dir=cluster.run_dir(1),
                            copy_fn=lambda *a: None)
        open_hooks.append(second)
        with pytest.raises(HookError, match="asking each second: rank 1 is held by another live"):
            second.wait_joined(2.5)
        assert rejected(cluster, 1)["impostor"] >= 2  # it did ask again
        open_hooks.remove(first)
        first.close()  # BYE: the rank is free
        second.wait_joined(10)
    finally:
        for hook in open_hooks:
            hook.close()
