"""The sidecar's HTTP server (eplb/coordinator/health.py) cannot be exhausted: a cap on
connections, a deadline for a request and for an idle kept-alive connection, a cap on the request
head, GET and HEAD only, and no exception of one connection reaches the loop. The server runs on a
real event loop in the test's own process (with small limits, so that time-outs are short), or in a
real sidecar process with its defaults; every client is a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from eplb.coordinator.health import HealthState, HttpEndpoints, HttpLimits
from eplb.demo.cluster import http_get, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "chaos"))

from http_flood import closed_by_server, open_fds, probe  # noqa: E402

SMALL = HttpLimits(max_connections=4, request_timeout_s=0.6, idle_timeout_s=0.4,
                   max_header_bytes=1024)
#: The most any wait in these tests may take; far above every limit in SMALL.
PATIENCE_S = 10.0


def serve(test: Callable[[HttpEndpoints, int], Awaitable[None]], limits: HttpLimits = SMALL,
          state: HealthState | None = None, registry: CollectorRegistry | None = None) -> list:
    """Run ``test(server, port)`` against a server on a fresh loop; returns what reached the
    loop's exception handler (the tests expect nothing)."""
    reached: list = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reached.append(ctx))
        health = state or HealthState(stale_after_s=60)
        health.set_ready(True, "ready")
        server = HttpEndpoints("127.0.0.1", 0, registry or CollectorRegistry(), health, limits)
        _, port = await server.start()
        try:
            await asyncio.wait_for(test(server, port), PATIENCE_S * 3)
        finally:
            server.close()
            await asyncio.sleep(0)  # the connections' tasks see their cancellation

    asyncio.run(main())
    return reached


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), PATIENCE_S)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), PATIENCE_S):
            got += chunk
    except ConnectionResetError:
        pass
    return got


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` on a fresh connection; return all the server sends before it closes."""
    reader, writer = await connect(port)
    writer.write(raw)
    try:
        return await until_closed(reader)
    finally:
        writer.close()


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One answer on a kept-alive connection: (status, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE_S)
    lines = head.decode().split("\r\n")
    length = int(next(v for k, _, v in (h.partition(": ") for h in lines[1:])
                      if k.lower() == "content-length"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


def closed(server: HttpEndpoints, reason: str) -> float | None:
    return server.registry.get_sample_value("eplb_http_connections_closed_total",
                                            {"reason": reason})


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_each_path_gets_its_answer_and_head_gets_no_body() -> None:
    async def check(server: HttpEndpoints, port: int) -> None:
        assert status(await exchange(port, get("/healthz"))) == 200
        ready = await exchange(port, get("/readyz"))
        assert status(ready) == 200 and ready.endswith(b"\r\n\r\nready\n")
        assert status(await exchange(port, get("/nothing"))) == 404
        head = await exchange(port, get("/healthz", "HEAD"))
        assert status(head) == 200 and head.endswith(b"\r\n\r\n")  # no body
        assert b"Content-Length: " in head and b"Content-Length: 0" not in head
        metrics = (await exchange(port, get("/metrics?x=1"))).split(b"\r\n\r\n", 1)[1]
        names = {f.name for f in text_string_to_metric_families(metrics.decode())}
        assert {"eplb_http_connections_open", "eplb_http_connections_refused",
                "eplb_http_responses"} <= names

    assert serve(check) == []


def test_readyz_is_local_and_readyz_leader_adds_the_group_view() -> None:
    state = HealthState(stale_after_s=60)

    async def check(server: HttpEndpoints, port: int) -> None:
        state.set_ready(True, "ready: 2 local worker(s)", False, "leader silent for 9.0s")
        for path in ("/readyz", "/readyz?leader=0", "/readyz?x=1"):
            answer = await exchange(port, get(path))
            assert status(answer) == 200 and answer.endswith(b"ready: 2 local worker(s)\n"), path
        for path in ("/readyz?leader=1", "/readyz?leader", "/readyz?x=1&leader=true"):
            answer = await exchange(port, get(path))
            assert status(answer) == 503 and answer.endswith(b"leader silent for 9.0s\n"), path
        state.set_ready(False, "0/1 local workers joined", True)  # local not ready: neither is
        assert status(await exchange(port, get("/readyz?leader=1"))) == 503
        state.set_ready(True, "ready", True, "ready, leader heard")
        assert status(await exchange(port, get("/readyz?leader=1"))) == 200

    assert serve(check, state=state) == []


def test_post_gets_405_malformed_gets_400_an_oversized_head_gets_431_each_then_closed() -> None:
    async def check(server: HttpEndpoints, port: int) -> None:
        post = await exchange(port, get("/healthz", "POST", "Content-Length: 5\r\n") + b"hello")
        assert status(post) == 405 and b"Allow: GET, HEAD" in post
        for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS hello
                        b"GET\r\n\r\n", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"):
            assert status(await exchange(port, garbage)) == 400, garbage
        big = get("/healthz", extra="X-Pad: " + "a" * 2000 + "\r\n")
        assert status(await exchange(port, big)) == 431
        head = await exchange(port, big.replace(b"GET", b"HEAD", 1))
        assert status(head) == 431 and head.endswith(b"\r\n\r\n")  # and no body
        # the 431 comes as soon as the head is over the cap, not when the request ends
        assert status(await exchange(port, big[:1500])) == 431
        assert server.open_connections == 0
        assert closed(server, "malformed") == 3
        assert closed(server, "too_large") == 3
        assert closed(server, "error") == 0

    assert serve(check) == []


def test_at_the_cap_a_newcomer_evicts_the_longest_waiting_and_a_probe_is_served() -> None:
    limits = HttpLimits(max_connections=4, request_timeout_s=PATIENCE_S * 2)

    async def check(server: HttpEndpoints, port: int) -> None:
        held = []
        for _ in range(limits.max_connections):  # idle clients fill the cap, oldest first
            held.append(await connect(port))
            await asyncio.wait_for(_until(lambda: server.open_connections == len(held)), PATIENCE_S)
        extra = [await connect(port) for _ in range(3)]
        for reader, writer in held[:3]:  # the three that waited longest are closed, unanswered
            assert await until_closed(reader) == b""
            writer.close()
        # a probe sends its request at once: served through a cap full of idle clients
        assert status(await exchange(port, get("/healthz"))) == 200
        sample = server.registry.get_sample_value
        assert sample("eplb_http_connections_closed_total", {"reason": "evicted"}) == 4
        assert sample("eplb_http_connections_refused_total") == 0
        assert server.open_connections <= limits.max_connections
        for _, writer in [held[3], *extra]:
            writer.close()

    assert serve(check, limits) == []


def test_a_silent_or_slow_request_is_closed_at_the_request_deadline() -> None:
    async def check(server: HttpEndpoints, port: int) -> None:
        started = time.monotonic()
        assert await exchange(port, b"") == b""  # connects, says nothing
        silent_s = time.monotonic() - started
        reader, writer = await connect(port)
        started = time.monotonic()
        for byte in get("/healthz")[:-2]:  # slowloris: a byte every 50 ms, never the end
            writer.write(bytes([byte]))
            if reader.at_eof():
                break
            await asyncio.sleep(0.05)
        assert await until_closed(reader) == b""
        slow_s = time.monotonic() - started
        writer.close()
        for took in (silent_s, slow_s):
            assert SMALL.request_timeout_s * 0.9 <= took <= SMALL.request_timeout_s + 2, took
        assert closed(server, "request_timeout") == 2

    assert serve(check) == []


def test_a_kept_alive_connection_serves_requests_then_closes_when_idle() -> None:
    async def check(server: HttpEndpoints, port: int) -> None:
        reader, writer = await connect(port)
        for path in ("/healthz", "/readyz", "/nothing"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            code, _ = await read_answer(reader)
            assert code == (404 if path == "/nothing" else 200)
        answered = time.monotonic()
        assert await until_closed(reader) == b""
        idle_s = time.monotonic() - answered
        writer.close()
        assert SMALL.idle_timeout_s * 0.9 <= idle_s <= SMALL.idle_timeout_s + 2, idle_s
        assert closed(server, "idle_timeout") == 1

    assert serve(check) == []


def test_healthz_answers_503_when_the_tick_loop_stops_beating() -> None:
    state = HealthState(stale_after_s=0.2)  # nothing beats: as if the tick loop were stuck

    async def check(server: HttpEndpoints, port: int) -> None:
        async def stale() -> bytes | None:
            answer = await exchange(port, get("/healthz"))
            return answer if status(answer) == 503 else None
        answer = await asyncio.wait_for(_until(stale), PATIENCE_S)
        assert b"event loop unresponsive" in answer
        assert status(await exchange(port, get("/readyz"))) == 503

    assert serve(check, state=state) == []


class Broken:
    """A collector that raises: a bug in rendering /metrics."""

    def collect(self):
        raise RuntimeError("a collector bug")


def test_an_exception_in_one_connection_ends_only_that_connection() -> None:
    registry = CollectorRegistry()
    registry.register(Broken())

    async def check(server: HttpEndpoints, port: int) -> None:
        assert await exchange(port, get("/metrics")) == b""  # closed, no answer
        assert status(await exchange(port, get("/healthz"))) == 200
        assert server.open_connections == 0

    assert serve(check, registry=registry) == []


async def _until(predicate: Callable[[], object]) -> object:
    """Await ``predicate`` (a plain or async callable) until it gives something true."""
    while True:
        got = predicate()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.02)


def test_a_real_sidecar_holds_its_cap_and_its_fds_stay_bounded(daemon_factory) -> None:
    cap, extra = HttpLimits().max_connections, 16
    daemon = daemon_factory()
    url = daemon.url()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    assert http_get(url + "/healthz")[0] == 200
    fds_before = open_fds(daemon.proc.pid)
    clients = [socket.create_connection((host, int(port)), timeout=PATIENCE_S)
               for _ in range(cap + extra)]
    try:
        closed = closed_by_server(clients, expect=extra, timeout_s=PATIENCE_S)
        assert len(closed) == extra  # the longest waiting were evicted, at once
        assert open_fds(daemon.proc.pid) <= fds_before + cap + 2
        assert probe(url, timeout_s=PATIENCE_S), "/healthz refused while idle clients hold the cap"
        # the held ones time out (5 s)
        assert len(closed_by_server(clients, expect=cap + extra, timeout_s=PATIENCE_S)) \
            == cap + extra
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: open_fds(daemon.proc.pid) <= fds_before, PATIENCE_S, "fds back")
    metrics = http_get(url + "/metrics")[1]
    evicted = next(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                   if s.name == "eplb_http_connections_closed_total"
                   and s.labels.get("reason") == "evicted")
    assert evicted >= extra + 1  # the probe evicted one more
    assert daemon.proc.poll() is None
