"""The sidecar as a service manager sees it: sd_notify (READY, WATCHDOG, STOPPING) over a real
datagram socket, /healthz tied to the event loop, /readyz tied to joined workers, SIGTERM -> 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from eplb.coordinator.sidecar import Sidecar, SidecarConfig
from eplb.demo.cluster import free_port, http_get, wait_until
from eplb.sd_notify import Notifier
from eplb.worker_hook import WorkerHook


def receive(sock: socket.socket, until: str, timeout_s: float) -> list[str]:
    """Datagrams received until one contains the field ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {until} within {timeout_s:g}s; got {got}")
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
        if until in got[-1].split("\n"):
            return got


def test_systemd_notify_ready_watchdog_and_stopping(daemon_factory, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        # WatchdogSec=0.2s: the loop must ping every 0.1 s
        daemon = daemon_factory(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        before = receive(sock, "READY=1", 30)
        assert not any("WATCHDOG=1" in d for d in before[:-1])  # ready comes first
        started = time.monotonic()
        pings = [receive(sock, "WATCHDOG=1", 2) for _ in range(5)]
        assert all(len(p) == 1 for p in pings), pings  # nothing else in between
        assert time.monotonic() - started < 2.0
        daemon.proc.send_signal(signal.SIGTERM)
        receive(sock, "STOPPING=1", 10)
        assert daemon.proc.wait(10) == 0, daemon.log()


def test_notifier_abstract_socket_and_watchdog_pid() -> None:
    name = f"eplb-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000",
                             "WATCHDOG_PID": str(os.getpid())})
        assert notifier.enabled and notifier.watchdog_interval_s == 2.0
        assert notifier.ready("up")
        sock.settimeout(5)
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        notifier.close()
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready()
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert gone.enabled and not gone.watchdog()  # logged, never raised


def test_readyz_waits_for_the_expected_workers_and_healthz_is_up(daemon_factory) -> None:
    daemon = daemon_factory(["--expected-workers", "1", "--log-format", "human"])
    url = daemon.url()
    assert http_get(url + "/healthz")[0] == 200
    code, text = http_get(url + "/readyz")
    assert code == 503 and "0/1 local workers joined" in text
    assert http_get(url + "/nothing")[0] == 404
    hook = WorkerHook(0, 1, 2, 4, 4, node=0, run_dir=daemon.run_dir, flush_every=2)
    try:
        hook.wait_joined(30)
        wait_until(lambda: http_get(url + "/readyz")[0] == 200, 10, "ready after the worker joined")
        metrics = http_get(url + "/metrics")[1]
        assert "eplb_workers_connected 1.0" in metrics and "eplb_ready 1.0" in metrics
    finally:
        hook.close()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0, daemon.log()
    assert "exited cleanly" in daemon.log()


def test_healthz_fails_while_the_event_loop_is_stuck(tmp_path: Path) -> None:
    """HTTP runs on the loop: a blocked loop answers no probe (a probe counts that as a failure);
    a stale heartbeat on a running loop answers 503 (tests/ops/test_http.py)."""
    base = Path("/tmp") / f"eplbh-{os.getpid()}"
    cfg = SidecarConfig(node_rank=0, num_nodes=1, leader_address=f"tcp://127.0.0.1:{free_port()}",
                        run_dir=base, http=("127.0.0.1", 0), stale_after_s=0.3,
                        planner_executor="thread")
    sidecar = Sidecar(cfg)
    loop = asyncio.new_event_loop()
    stop: asyncio.Event | None = None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        await sidecar.run(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        url = "http://%s:%d" % wait_until(lambda: sidecar.http_address, 30, "HTTP up")
        wait_until(lambda: http_get(url + "/healthz")[0] == 200, 10, "healthy")
        blocked = threading.Event()
        loop.call_soon_threadsafe(lambda: (blocked.set(), time.sleep(1.5)))  # the fault
        assert blocked.wait(5)
        for path in ("/healthz", "/readyz"):
            with pytest.raises(OSError):  # urllib's URLError, or a timeout: no answer at all
                http_get(url + path, timeout_s=0.3)
        wait_until(lambda: http_get(url + "/healthz")[0] == 200, 10, "healthy again")
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        assert not thread.is_alive()
        loop.close()


def test_a_taken_http_port_is_refused_with_a_message(daemon_factory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = daemon_factory(["--http", f"127.0.0.1:{port}"])
        assert daemon.proc.wait(30) != 0
    assert f"cannot listen on --http 127.0.0.1:{port}" in daemon.log()
    assert "--http off" in daemon.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_an_idle_daemon_with_status_0(daemon_factory, sig) -> None:
    daemon = daemon_factory()
    daemon.url()
    daemon.proc.send_signal(sig)
    assert daemon.proc.wait(10) == 0, daemon.log()


def test_a_shutdown_longer_than_the_grace_period_ends_with_status_1(daemon_factory) -> None:
    # 1 ms is shorter than any orderly stop with a planner process (it is still importing torch,
    # and the exit joins it), so the grace timer must end the process, and say why.
    daemon = daemon_factory(["--grace-period", "0.001", "--planner", "process"])
    daemon.url()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 1, daemon.log()
    assert "shutdown took longer than --grace-period" in daemon.log()


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_the_planner_runs_with_planner_threads_torch_threads(tmp_path: Path, executor: str) -> None:
    """--planner-threads reaches the executor the plans run in (default 1: the planner's small
    tensor operations are fastest on one thread, and more would spin on the engine's cores)."""
    import torch

    before = torch.get_num_threads()
    cfg = SidecarConfig(node_rank=0, num_nodes=1, leader_address=f"tcp://127.0.0.1:{free_port()}",
                        run_dir=tmp_path, planner_executor=executor, planner_threads=3)
    sidecar = Sidecar(cfg)
    sidecar._start_executor()
    try:
        assert sidecar._executor.submit(torch.get_num_threads).result(timeout=120) == 3
    finally:
        sidecar._executor.shutdown(wait=True)
        torch.set_num_threads(before)
    assert SidecarConfig(node_rank=0, num_nodes=1, leader_address="tcp://127.0.0.1:1",
                         run_dir=tmp_path).planner_threads == 1
