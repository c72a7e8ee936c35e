"""Flood one real sidecar's HTTP port with idle and malformed connections (issue 13).

Starts one sidecar (as the tests do: ``eplb.demo.cluster.LocalCluster``, HTTP on 127.0.0.1), then
opens ``--connections`` connections in batches of ``--batch``, each of a kind drawn with
``--seed``:

- ``idle``: connects and says nothing;
- ``slowloris``: sends part of a request head and never the end;
- ``garbage``: random bytes (then a blank line);
- ``oversized``: a request whose head is 16 KiB (the server's cap is 8 KiB).

After each batch has had a second to settle it probes ``/healthz`` once from a fresh connection
while the batch is still open (``under load``: one try, 1 s, as a kubelet probe), closes the batch,
and probes again until a 200 or 10 s (``after the batch``: a failure there is a real outage). It
samples the sidecar's RSS and open fds (``/proc/PID``) after every batch, stops by itself at
``--time-limit``, and prints a table. Exit status 1 when the sidecar died or an ``after`` probe
failed.

Only 127.0.0.1; once the sidecar has started (with the limits this process had), it raises its own
RLIMIT_NOFILE soft limit to the hard limit, and it holds at most one batch of connections at a time.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import selectors
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from eplb.demo.cluster import LocalCluster, http_get

KINDS = ("idle", "slowloris", "garbage", "oversized")
PROBE_RETRY_S = 10.0
SETTLE_S = 1.0


def open_fds(pid: int) -> int:
    """File descriptors process ``pid`` holds now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid``, KiB (``VmRSS`` of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def closed_by_server(socks: Sequence[socket.socket], expect: int,
                     timeout_s: float) -> list[socket.socket]:
    """The sockets of ``socks`` that the server has closed (end of stream or reset; what it sent
    before is read and dropped), waiting until ``expect`` of them are or ``timeout_s`` passed."""
    closed: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            if sock.fileno() >= 0:
                sel.register(sock, selectors.EVENT_READ)
        while len(closed) < expect and sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.5)):
                sock = key.fileobj
                try:
                    ended = sock.recv(65536, socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    ended = False
                except ConnectionError:
                    ended = True
                if ended:
                    closed[id(sock)] = sock
                    sel.unregister(sock)
    return list(closed.values())


def payload(kind: str, rng: random.Random) -> bytes:
    if kind == "slowloris":
        return b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Slow: " + b"a" * rng.randrange(1, 200)
    if kind == "garbage":
        return rng.randbytes(rng.randrange(1, 512)) + b"\r\n\r\n"
    if kind == "oversized":
        return b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n"
    return b""


def probe(url: str, timeout_s: float) -> bool:
    """One GET /healthz from a fresh connection: True on a 200."""
    try:
        return http_get(url + "/healthz", timeout_s=timeout_s)[0] == 200
    except OSError:  # refused, reset or timed out
        return False


def probe_until_ok(url: str, within_s: float) -> float | None:
    """Seconds until /healthz answered 200 (None: not within ``within_s``)."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if probe(url, timeout_s=1.0):
            return time.monotonic() - started
        time.sleep(0.05)
    return None


@dataclass
class Result:
    opened: Counter = field(default_factory=Counter)  # kind -> connections made
    connect_failed: Counter = field(default_factory=Counter)  # kind -> connect() failed
    closed: Counter = field(default_factory=Counter)  # kind -> closed by the server in SETTLE_S
    under_load: Counter = field(default_factory=Counter)  # "ok"/"failed"
    after_failed: int = 0
    after_worst_s: float = 0.0
    batches: int = 0
    stopped_early: bool = False
    alive: bool = True
    rss_kib: list[int] = field(default_factory=list)  # before, max during, after
    fds: list[int] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.alive and self.after_failed == 0


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def server_counters(url: str) -> dict[str, float]:
    """The sidecar's own eplb_http_* counters from /metrics."""
    text = http_get(url + "/metrics")[1]
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("eplb_http_") and s.name.endswith("_total") and s.value:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                found[s.name + (f"{{{label}}}" if label else "")] = s.value
    return found


def open_batch(address: tuple[str, int], kinds: list[str], rng: random.Random, result: Result,
               deadline: float) -> list[tuple[str, socket.socket]]:
    """Connect one socket per kind and send its payload; stops at ``deadline`` (a server whose
    accept queue is full makes every connect wait)."""
    batch = []
    for kind in kinds:
        left = deadline - time.monotonic()
        if left <= 0:
            result.stopped_early = True
            break
        try:
            sock = socket.create_connection(address, timeout=min(3.0, left))
        except OSError:
            result.connect_failed[kind] += 1
            continue
        result.opened[kind] += 1
        batch.append((kind, sock))
        data = payload(kind, rng)
        if data:
            try:
                sock.sendall(data)
            except OSError:  # the server closed it already (over the cap, or a 431 mid-send)
                pass
    return batch


def usage(pid: int) -> tuple[int, int] | None:
    """(RSS KiB, open fds) of process ``pid``; None once it is gone."""
    try:
        return rss_kib(pid), open_fds(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None


def flood(connections: int, seed: int, batch_size: int, time_limit_s: float) -> Result:
    rng = random.Random(seed)
    result = Result()
    started = time.monotonic()
    deadline = started + time_limit_s
    with LocalCluster(1, sidecar_args=["--planner", "thread"]) as cluster:
        cluster.start()  # first: the sidecar keeps the limits it inherits (soft 1024, often)
        raise_fd_limit()
        cluster.wait_ready()
        url = cluster.http_address(0)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sidecar = cluster.sidecars[0]
        assert probe_until_ok(url, PROBE_RETRY_S) is not None, "sidecar not answering"
        samples = [usage(sidecar.pid)]
        done = 0
        while done < connections and sidecar.poll() is None and not result.stopped_early:
            kinds = [rng.choice(KINDS) for _ in range(min(batch_size, connections - done))]
            done += len(kinds)
            batch = open_batch((host, int(port)), kinds, rng, result, deadline)
            closed = {id(s) for s in closed_by_server([s for _, s in batch], len(batch), SETTLE_S)}
            for kind, sock in batch:
                result.closed[kind] += id(sock) in closed
            samples.append(usage(sidecar.pid))
            result.under_load["ok" if probe(url, timeout_s=1.0) else "failed"] += 1
            for _, sock in batch:
                sock.close()
            took = probe_until_ok(url, PROBE_RETRY_S)
            if took is None:
                result.after_failed += 1
            else:
                result.after_worst_s = max(result.after_worst_s, took)
            result.batches += 1
            result.stopped_early |= time.monotonic() > deadline and done < connections
        samples.append(usage(sidecar.pid))
        result.alive = sidecar.poll() is None
        if result.alive:
            result.server = server_counters(url)
        seen = [s for s in samples if s is not None]
        result.rss_kib = [seen[0][0], max(r for r, _ in seen), seen[-1][0]]
        result.fds = [seen[0][1], max(f for _, f in seen), seen[-1][1]]
    result.wall_s = time.monotonic() - started
    return result


def table(result: Result, connections: int, seed: int) -> str:
    rows = [f"http_flood: {connections} connections, seed {seed}, {result.batches} batches"
            + (" (stopped early at the time limit)" if result.stopped_early else "")
            + (f", {sum(result.opened.values()) + sum(result.connect_failed.values())} tried"
               if result.stopped_early or not result.alive else ""), "",
            "| kind | opened | connect failed | closed by the server within 1 s |",
            "|---|---|---|---|"]
    for kind in KINDS:
        rows.append(f"| {kind} | {result.opened[kind]} | {result.connect_failed[kind]} | "
                    f"{result.closed[kind]} |")
    rows.append(f"| all | {sum(result.opened.values())} | {sum(result.connect_failed.values())} "
                f"| {sum(result.closed.values())} |")
    rows += ["", "| what | value |", "|---|---|"]
    for name, value in sorted(result.server.items()):
        rows.append(f"| server: {name} | {value:g} |")
    rows += [f"| /healthz under load (1 try, 1 s) | {result.under_load['ok']} ok, "
             f"{result.under_load['failed']} failed |",
             f"| /healthz after each batch (10 s) | {result.after_failed} failed, worst "
             f"{result.after_worst_s:.2f} s |",
             f"| sidecar alive at the end | {'yes' if result.alive else 'NO'} |"]
    if result.rss_kib:  # "after": the last sample while it lived
        rows.append("| sidecar RSS KiB before / max / after | "
                    + " / ".join(map(str, result.rss_kib)) + " |")
        rows.append("| sidecar fds before / max / after | "
                    + " / ".join(map(str, result.fds)) + " |")
    rows.append(f"| wall time | {result.wall_s:.1f} s |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=250, help="connections held at once")
    parser.add_argument("--time-limit", type=float, default=240.0,
                        help="seconds after which no new batch starts")
    args = parser.parse_args(argv)
    result = flood(args.connections, args.seed, args.batch, args.time_limit)
    print(table(result, args.connections, args.seed))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
