"""A TCP relay that adds one-way latency, jitter and TCP-like loss, for links the kernel cannot
shape here (these kernels have no ``netem`` qdisc).

    python bench/mesh/relay.py --listen 0.0.0.0:5555 --upstream 10.77.0.2:5555 \\
        --control /tmp/eplbm-1/relay.sock --mean-ms 1 --jitter-ms 0.3 --loss 0.005

Every accepted connection gets its own connection to ``--upstream``; bytes flow both ways.

Network model, per connection and per direction:

- A *chunk* is what one ``recv`` returned (up to 64 KiB): a stand-in for a segment or a burst.
- Each chunk draws a one-way delay ``d = max(0, gauss(mean, jitter))`` (ms) and is sent on at
  ``arrival + d``.
- Byte order is kept: a chunk is never sent before the chunk ahead of it on the same connection
  and direction, so its send time is ``max(arrival + d, send time of the chunk ahead)``.
- Loss: TCP never loses bytes to the application; a lost segment shows up as a retransmission
  after one RTO. So with probability ``loss`` a chunk is "lost": it gets an extra ``rto`` ms
  (Linux's minimum RTO is 200 ms, the default) and, through the order rule above, every chunk
  behind it on that connection and direction waits for it (head-of-line blocking).
- No bandwidth limit and no reordering between connections; the two directions are independent.

Timing: one reader and one writer thread per direction; the writer waits on a condition with a
timeout (microsecond resolution, unlike asyncio's millisecond-rounded timers), so the delay a
chunk really got is ``send - arrival`` as measured, plus scheduling when the cores are busy. The
relay records that achieved delay for every chunk; ``stats`` reports it, so a table shows the
latency that was applied, not the one that was asked for.

Control: a Unix socket (``--control``), one JSON object per line, one reply line:
``{"cmd": "set", "mean_ms": 1, "jitter_ms": 0.3, "loss": 0.005, "rto_ms": 200}`` changes the
profile for every chunk from then on; ``{"cmd": "stats", "reset": true}`` returns counts (chunks,
bytes, lost chunks, achieved delays' p50/p99/max per peer address) and optionally starts afresh.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("eplb.mesh.relay")

CHUNK = 65536
#: A direction stops reading while this many bytes wait to be sent (backpressure).
MAX_QUEUED = 4 << 20
#: Achieved delays kept per peer between two ``stats`` resets.
MAX_SAMPLES = 200_000


@dataclass
class Profile:
    """The link model. Units: milliseconds; ``loss`` is a probability per chunk."""

    mean_ms: float = 0.1
    jitter_ms: float = 0.0
    loss: float = 0.0
    rto_ms: float = 200.0

    def draw(self, rng: random.Random) -> tuple[float, bool]:
        """One chunk's delay in seconds (RTO included when lost), and whether it was lost."""
        d = max(0.0, rng.gauss(self.mean_ms, self.jitter_ms) if self.jitter_ms else self.mean_ms)
        lost = self.loss > 0 and rng.random() < self.loss
        return (d + (self.rto_ms if lost else 0.0)) / 1e3, lost


class PeerStats:
    """Counts for one peer address (both directions together)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.bytes = 0
        self.lost = 0
        self.delays_ms: list[float] = []  # achieved: send - arrival

    def as_dict(self) -> dict[str, Any]:
        d = sorted(self.delays_ms)

        def q(p: float) -> float | None:
            return round(d[min(len(d) - 1, int(p * len(d)))], 4) if d else None

        return {"chunks": self.chunks, "bytes": self.bytes, "lost": self.lost,
                "delay_p50_ms": q(0.5), "delay_p99_ms": q(0.99),
                "delay_max_ms": round(d[-1], 4) if d else None}


class _Direction:
    """One direction of one connection: a reader thread queues chunks with their send times, a
    writer thread sends each at its time, in order."""

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, peer: str,
                 seed: int, name: str, on_end) -> None:
        self.relay, self.src, self.dst, self.peer = relay, src, dst, peer
        self.rng = random.Random(seed)
        self.queue: collections.deque[tuple[float, float, bytes | None]] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.last_send = 0.0
        self.on_end = on_end
        self.reader = threading.Thread(target=self._read, name=f"{name}-r", daemon=True)
        self.writer = threading.Thread(target=self._write, name=f"{name}-w", daemon=True)

    def start(self) -> None:
        self.reader.start()
        self.writer.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                now = time.monotonic()
                if not data:
                    break
                delay, lost = self.relay.draw(self.rng)
                with self.cond:
                    while self.queued > MAX_QUEUED:
                        self.cond.wait(0.1)
                    send_at = max(now + delay, self.last_send)
                    self.last_send = send_at
                    self.queue.append((send_at, now, data))
                    self.queued += len(data)
                    self.cond.notify_all()
                self.relay.count(self.peer, len(data), lost)
        except OSError:
            pass
        with self.cond:  # EOF or error: the writer sends what is queued, then shuts down
            self.queue.append((self.last_send, time.monotonic(), None))
            self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while True:
                        if self.queue:
                            wait = self.queue[0][0] - time.monotonic()
                            if wait <= 0:
                                break
                            self.cond.wait(wait)
                        else:
                            self.cond.wait(1.0)
                    send_at, arrived, data = self.queue.popleft()
                    if data is not None:
                        self.queued -= len(data)
                    self.cond.notify_all()
                if data is None:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    break
                sent = time.monotonic()
                self.dst.sendall(data)
                self.relay.achieved(self.peer, (sent - arrived) * 1e3)
        except OSError:
            pass
        self.on_end()


class Relay:
    """The relay: accepts on ``listen``, connects each client to ``upstream``.

    Args:
        listen: (host, port) to accept on (port 0: a free one; see :attr:`address`).
        upstream: (host, port) every connection is relayed to.
        profile: the link model (see the module docstring).
        seed: seeds every direction's random draws (with the connection's index).
    """

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int],
                 profile: Profile | None = None, seed: int = 0) -> None:
        self.upstream = upstream
        self.profile = profile or Profile()
        self.seed = seed
        self._lock = threading.Lock()
        self._stats: dict[str, PeerStats] = collections.defaultdict(PeerStats)
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._closed = threading.Event()
        self.server = socket.create_server(listen, reuse_port=False, backlog=256)
        self.address = self.server.getsockname()[:2]
        self._accepter = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._accepter.start()

    # --- model and counts -----------------------------------------------------------------------

    def draw(self, rng: random.Random) -> tuple[float, bool]:
        with self._lock:
            profile = self.profile
        return profile.draw(rng)

    def set_profile(self, **fields: float) -> Profile:
        with self._lock:
            self.profile = Profile(**{**asdict(self.profile), **fields})
            log.info("profile now %s", self.profile)
            return self.profile

    def count(self, peer: str, nbytes: int, lost: bool) -> None:
        with self._lock:
            s = self._stats[peer]
            s.chunks += 1
            s.bytes += nbytes
            s.lost += lost

    def achieved(self, peer: str, delay_ms: float) -> None:
        with self._lock:
            samples = self._stats[peer].delays_ms
            if len(samples) < MAX_SAMPLES:
                samples.append(delay_ms)

    def stats(self, reset: bool = False) -> dict[str, Any]:
        with self._lock:
            out = {"profile": asdict(self.profile), "connections": len(self._conns),
                   "peers": {peer: s.as_dict() for peer, s in sorted(self._stats.items())}}
            if reset:
                self._stats.clear()
        return out

    # --- connections ----------------------------------------------------------------------------

    def _accept(self) -> None:
        index = 0
        while not self._closed.is_set():
            try:
                client, addr = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5.0)
            except OSError as exc:
                log.warning("upstream %s unreachable for %s: %s", self.upstream, addr, exc)
                client.close()
                continue
            up.settimeout(None)
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = addr[0]
            index += 1
            with self._lock:
                self._conns.append((client, up))
            ended = {"n": 0}

            def on_end(client=client, up=up, ended=ended) -> None:
                with self._lock:
                    ended["n"] += 1
                    done = ended["n"] == 2
                    if done and (client, up) in self._conns:
                        self._conns.remove((client, up))
                if done:
                    client.close()
                    up.close()

            seed = hash((self.seed, index)) & 0xFFFFFFFF
            _Direction(self, client, up, peer, seed, f"c{index}-up", on_end).start()
            _Direction(self, up, client, peer, seed + 1, f"c{index}-down", on_end).start()
            log.info("connection %d from %s relayed to %s", index, addr, self.upstream)

    def close(self) -> None:
        """Stop accepting and close every relayed connection."""
        self._closed.set()
        self.server.close()
        with self._lock:
            conns = list(self._conns)
        for client, up in conns:
            for s in (client, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def serve_control(relay: Relay, path: Path, stop: threading.Event) -> threading.Thread:
    """Answer JSON-line commands on the Unix socket ``path`` (see the module docstring)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)
    server.settimeout(0.5)

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            reader = conn.makefile("rb")
            for line in reader:
                try:
                    req = json.loads(line)
                    cmd = req.pop("cmd")
                    if cmd == "set":
                        result: Any = asdict(relay.set_profile(**req))
                    elif cmd == "stats":
                        result = relay.stats(reset=bool(req.get("reset")))
                    elif cmd == "ping":
                        result = {"listen": list(relay.address)}
                    else:
                        raise ValueError(f"unknown command {cmd!r}")
                    reply = {"ok": True, "result": result}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def loop() -> None:
        with server:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, name="relay-control", daemon=True)
    t.start()
    return t


def relay_call(path: Path, request: dict[str, Any], timeout_s: float = 5.0) -> Any:
    """Send one command to a relay's control socket; its ``result`` (RuntimeError if refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise RuntimeError(f"relay refused {request}: {reply.get('error')}")
    return reply["result"]


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to accept on")
    p.add_argument("--upstream", type=_host_port, required=True, help="HOST:PORT to relay to")
    p.add_argument("--control", type=Path, required=True, help="Unix socket for set/stats")
    p.add_argument("--mean-ms", type=float, default=0.1)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0, help="probability per chunk")
    p.add_argument("--rto-ms", type=float, default=200.0, help="extra delay of a lost chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nice", type=int, default=0,
                   help="scheduling priority (negative: ahead of other processes; root). The "
                        "relay stands for the network, which the hosts' load should not slow")
    args = p.parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # before any thread: they inherit it
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s relay %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    relay = Relay(args.listen, args.upstream,
                  Profile(args.mean_ms, args.jitter_ms, args.loss, args.rto_ms), args.seed)
    serve_control(relay, args.control, stop)
    log.info("listening on %s, relaying to %s", relay.address, args.upstream)
    stop.wait()
    relay.close()
    try:
        args.control.unlink()
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
