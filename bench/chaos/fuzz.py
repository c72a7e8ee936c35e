"""Fuzz every socket of a running local cluster while a real worker group keeps stepping.

    PYTHONPATH=. .venv/bin/python bench/chaos/fuzz.py --frames 200000 --seed 1 [--curve] [--json OUT]

Starts 2 sidecars x 2 demo workers (:func:`eplb.demo.cluster.start_demo_cluster`: gloo, real
weight copies, rebalances only when asked) and sends ``--frames`` messages, spread at random over:

- ``tcp-plain``: the leader's TCP port, as an unauthenticated peer (a plain DEALER; with CURVE on
  the leader, its handshake fails and nothing reaches the sidecar);
- ``tcp-curve``: with keys (``--curve`` makes them, or the cluster's ``--curve-keys`` when it has
  them), as an authenticated follower; and now and then a CURVE client with a key the leader does
  not know (counted by the leader as ``unauthenticated``);
- ``workers.sock`` and ``control.sock`` of each sidecar (ipc, in the run directories); on
  workers.sock the fuzzer's identity is never a rank of the group.

Frame kinds: ``random`` bytes; ``flip`` (bytes of a valid frame flipped), ``trunc`` (a valid
frame cut short); ``field`` (a valid message re-packed with a changed version, type, missing,
extra or ill-typed field, bad tensor dtype/shape/data); ``huge`` (msgpack headers that claim
4 GiB strings, arrays or maps, deep nesting, tensors that claim huge shapes, frames of 256 KiB -
0.9 MiB); ``oversize`` (one message every 5,000: a frame 1 KiB above the socket's
``ZMQ_MAXMSGSIZE``, on a connection of its own); ``parts`` (wrong multipart counts); ``valid`` (a well-formed message of every type,
which that socket must not take from this peer). Valid frames are built with
:func:`eplb.proto.encode` for every type of :data:`eplb.proto.messages.MESSAGE_TYPES`. A frame that
decodes into something a peer may legitimately do there (a NODE_HELLO / NODE_HEARTBEAT naming a
real follower node, which on a link without CURVE takes that node's place by design; a
``rebalance`` control request) is replaced by a fresh one: this fuzzes input handling, not
authorization. Frames go out at ``--rate`` per second at most.

Meanwhile a monitor samples the leader's status (the workers' lowest step) and each sidecar's RSS
(``VmRSS`` in /proc/PID/status) every 0.5 s. At the end: every sidecar and worker must be alive,
the workers must have kept stepping (no stall longer than ``--max-stall`` s), a forced
rebalance (``eplbctl rebalance --force`` through the control client) must commit, each sidecar's
frames-rejected counter (``eplbctl status --local --json``; the leader's also from ``/metrics``)
must have grown, and no sidecar's RSS may grow by more than ``--max-rss-growth`` MiB. Exit 1 when
one of these fails.
"""

from __future__ import annotations

import argparse
import enum
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import msgpack
import torch
import zmq

from eplb.control_client import ControlError, control_call
from eplb.demo.cluster import LocalCluster, http_get, start_demo_cluster
from eplb.paths import control_endpoint, workers_endpoint
from eplb.placement.rules import default_placement, placement_hash
from eplb.proto import ControlRequest, NodeHeartbeat, NodeHello, ProtocolError, decode, encode
from eplb.proto.reasons import RefuseCode
from eplb.proto.messages import MESSAGE_TYPES, PROTOCOL_VERSION
from eplb.proto.envelope import CONTROL_MAXMSGSIZE, PEER_MAXMSGSIZE, WORKER_MAXMSGSIZE

L, E, P, WORLD, PER_NODE, NODES = 4, 16, 24, 4, 2, 2
KINDS = ("random", "flip", "trunc", "field", "huge", "parts", "valid", "oversize")
KIND_WEIGHTS = (15, 20, 15, 25, 5, 8, 12, 0)  # oversize: one every 5,000 messages, see run()
#: The sidecars' ZMQ_MAXMSGSIZE per socket kind: a larger frame makes libzmq drop the connection.
MAX_MSG = {"workers": WORKER_MAXMSGSIZE, "control": CONTROL_MAXMSGSIZE, "tcp": PEER_MAXMSGSIZE}


# --- frames -------------------------------------------------------------------------------------

def _value(name: str, hint: Any, rng: random.Random) -> Any:
    """A plausible value for field ``name`` of annotation ``hint``."""
    if name == "phys2log":
        return default_placement(L, E, P)
    if name == "counts":
        return torch.randint(0, 50, (L, E), dtype=torch.int64)
    fixed = {"world_size": WORLD, "num_layers": L, "num_experts": E, "num_physical": P,
             "op": "status", "args": {}, "layers_per_chunk": 1, "bytes_per_chunk": 0}
    if name in fixed:
        return fixed[name]
    if name in ("rank", "node"):
        return rng.randrange(WORLD)
    if name == "request_id":
        return uuid.uuid4().hex[:16]
    if name == "incarnation":
        return uuid.uuid4().hex[:12]
    if name == "refused":  # NODE_PROMISES rows (rank, step, reason, code)
        return ((rng.randrange(WORLD), rng.randrange(1000), "already past S",
                 rng.choice(list(RefuseCode))),)
    if name == "progress":  # NODE_HEARTBEAT rows (rank, step)
        return ((rng.randrange(WORLD), rng.randrange(1000)),)
    if name == "results":  # NODE_DONE rows (rank, ok, error, bytes, copy s, hold s)
        return ((rng.randrange(WORLD), True, "", rng.randrange(1 << 20), rng.random(),
                 rng.random()),)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):  # a reason code
        return rng.choice(list(hint))
    text = str(hint)
    if "tuple" in text:
        return tuple(rng.randrange(WORLD) for _ in range(rng.randint(1, 3)))
    if "Tensor" in text:
        return torch.randint(0, E, (L, P), dtype=torch.int64)
    if "bool" in text:
        return rng.random() < 0.5
    if "float" in text:
        return rng.random()
    if "int" in text:
        return rng.randrange(0, 1000)
    if "dict" in text:
        return {}
    if "str" in text:
        return "".join(rng.choice("abcdefgh xyz") for _ in range(rng.randint(0, 24)))
    return None


def build_message(cls: type, rng: random.Random):
    """A valid instance of message class ``cls`` (checked by a decode round trip), or None."""
    hints = get_type_hints(cls)
    for _ in range(20):
        kwargs = {f.name: _value(f.name, hints.get(f.name), rng) for f in fields(cls)}
        if "from_step" in kwargs and "to_step" in kwargs:
            kwargs["to_step"] = kwargs["from_step"] + rng.randint(0, 64)
        if "plan_hash" in kwargs and "phys2log" in kwargs:
            kwargs["plan_hash"] = placement_hash(kwargs["phys2log"])
        try:
            msg = cls(**kwargs)
            decode(encode(msg))
            return msg
        except (ProtocolError, TypeError, ValueError):
            continue
    return None


WEIRD = [None, -1, 2**63 - 1, -2**63, 2**64 - 1, 1e308, float("nan"), float("inf"), "", "x" * 5000,
         b"\x00" * 64, [], {}, [1] * 300, {"a": {"b": [None]}}, True, False, 0.5, [[[[[]]]]]]


class FrameFactory:
    """Makes fuzz frames of each kind from valid messages of every type."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.templates: dict[str, Any] = {}
        self.unbuilt: list[str] = []
        for name, cls in MESSAGE_TYPES.items():
            msg = build_message(cls, rng)
            if msg is None:
                self.unbuilt.append(name)
            else:
                self.templates[name] = msg
        self.names = sorted(self.templates)
        self.encoded = {n: encode(m) for n, m in self.templates.items()}
        self._cache: dict[tuple[str, int], bytes] = {}

    def valid(self) -> bytes:
        name = self.rng.choice(self.names)
        if self.rng.random() < 0.3:  # fresh field values now and then
            msg = build_message(MESSAGE_TYPES[name], self.rng)
            if msg is not None:
                return encode(msg)
        return self.encoded[name]

    def make(self, kind: str, max_big: int) -> list[bytes]:
        """One message (its parts) of ``kind``."""
        rng = self.rng
        if kind == "random":
            n = rng.choice((0, 1, 2, 7, 31, 100, 1000, rng.randint(0, 8192)))
            return [rng.randbytes(n)]
        if kind == "flip":
            frame = bytearray(self.valid())
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(frame))
                frame[i] = rng.randrange(256) if rng.random() < 0.5 else frame[i] ^ (1 << rng.randrange(8))
            return [bytes(frame)]
        if kind == "trunc":
            frame = self.valid()
            return [frame[:rng.randrange(len(frame))]]
        if kind == "field":
            return [self._field()]
        if kind == "huge":
            return [self._huge(max_big)]
        if kind == "parts":
            n = rng.choice((2, 3, 4, 6))
            return [self.valid() if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 64))
                    for _ in range(n)]
        return [self.valid()]

    def _field(self) -> bytes:
        rng = self.rng
        raw = self.templates[rng.choice(self.names)].to_wire()
        what = rng.randrange(7)
        keys = [k for k in raw if k not in ("v", "type")]
        if what == 0:
            raw["v"] = rng.choice([0, 1, PROTOCOL_VERSION + 1, -1, "2", None, 2.0, 2**64 - 1, True])
        elif what == 1:
            raw["type"] = rng.choice([rng.choice(list(MESSAGE_TYPES)), "NOPE", "", 7, None,
                                      "hello", "X" * 3000, ["PLAN"]])
        elif what == 2 and keys:
            del raw[rng.choice(keys)]
        elif what == 3:
            raw[rng.choice(["extra", "Rank", "", "v2", "zz" * 40])] = rng.choice(WEIRD)
        elif what == 4 and keys:
            raw[rng.choice(keys)] = rng.choice(WEIRD)
        else:
            tensors = [k for k in keys if isinstance(raw[k], dict) and "dtype" in raw[k]]
            if tensors:
                t = dict(raw[rng.choice(tensors)])
                change = rng.randrange(4)
                if change == 0:
                    t["dtype"] = rng.choice(["float16", "int8", "complex64", "", None, "int64 "])
                elif change == 1:
                    t["shape"] = rng.choice([[2**31, 2**31], [-1, 4], [4], [1, 2, 3], [0, 0],
                                             [2**40, 1], ["4", 24], None])
                elif change == 2:
                    t["data"] = t["data"][:rng.randrange(len(t["data"]) + 1)] + rng.randbytes(
                        rng.choice((0, 1, 3, 8)))
                else:
                    t["extra"] = 1
                raw[rng.choice(tensors)] = t
            elif keys:
                raw[rng.choice(keys)] = rng.choice(WEIRD)
        try:
            return msgpack.packb(raw, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            return self.rng.randbytes(16)

    def _huge(self, max_big: int) -> bytes:
        rng = self.rng
        what = rng.randrange(7)
        if what == 0:  # map32 / array32 / bin32 / str32 claiming ~4 GiB with no data behind
            return rng.choice([b"\xdf", b"\xdd", b"\xc6", b"\xdb"]) + b"\xff\xff\xff\xff" + rng.randbytes(8)
        if what == 1:  # a valid start, then a field that claims 2 GiB
            return b"\x82\xa1v" + bytes([PROTOCOL_VERSION]) + b"\xa4type\xc6\x7f\xff\xff\xff" + b"A" * 32
        if what == 2:  # deep nesting
            depth = rng.choice((100, 1000, 5000, 100000))
            return b"\x91" * depth + b"\xc0"
        if what == 3:  # a tensor that claims a huge shape
            raw = self.templates["COUNTS"].to_wire() if "COUNTS" in self.templates else {}
            raw["counts"] = {"dtype": "int64", "shape": [1 << 20, 1 << 20], "data": b"\0" * 64}
            return msgpack.packb(raw, use_bin_type=True)
        if what == 4:  # a map with very many small keys (built once per size)
            n = rng.choice((1000, 60000, 70000))
            if ("map", n) not in self._cache:
                self._cache["map", n] = msgpack.packb(
                    {"v": PROTOCOL_VERSION, "type": "HEARTBEAT", **{f"k{i}": i for i in range(n)}},
                    use_bin_type=True)
            return self._cache["map", n]
        if what == 5:  # a long list of ranks (built once per size)
            n = rng.choice((5000, 70000))
            if ("ranks", n) not in self._cache:
                self._cache["ranks", n] = msgpack.packb(
                    {"v": PROTOCOL_VERSION, "type": "RELAY", "node": 1, "ranks": list(range(n))},
                    use_bin_type=True)
            return self._cache["ranks", n]
        size = rng.randint(256 * 1024, max_big)  # a big frame that is otherwise well-formed
        raw = self.templates["COUNTS"].to_wire() if "COUNTS" in self.templates else {}
        n = size // 8
        raw["counts"] = {"dtype": "int64", "shape": [1, n], "data": b"\1" * (8 * n)}
        return msgpack.packb(raw, use_bin_type=True)


# --- what a sidecar does with a frame -----------------------------------------------------------

def legit_here(socket_kind: str, parts: list[bytes]) -> bool:
    """True when ``parts`` decode into something a peer may legitimately do on this socket
    (the fuzzer replaces such frames, see the module docstring)."""
    try:
        msg = decode(parts[0])
    except ProtocolError:
        return False
    if isinstance(msg, ControlRequest) and msg.op != "status":
        return True
    if socket_kind.startswith("tcp") and isinstance(msg, (NodeHello, NodeHeartbeat)):
        return 0 < msg.node < NODES
    return False


def predicted_rejections(socket_kind: str, parts: list[bytes]) -> int:
    """Rejections the sidecar should count for this message if it arrives."""
    if socket_kind.startswith("workers"):
        return 1  # wrong part count, bad frame, or an identity that is not the message's rank
    try:
        msg = decode(parts[0])
    except ProtocolError:
        return 1
    if socket_kind.startswith("control"):
        return 0 if len(parts) == 1 and isinstance(msg, ControlRequest) else 1
    return 0 if isinstance(msg, ControlRequest) else 1  # tcp: everything else is refused


# --- sockets ------------------------------------------------------------------------------------

class Target:
    """One fuzzed socket: a DEALER (re)connected to the endpoint."""

    def __init__(self, name: str, endpoint: str, ctx: zmq.Context, rng: random.Random,
                 curve: tuple[bytes, bytes, bytes] | None = None, max_big: int = 900 * 1024,
                 sidecar: int = 0) -> None:
        self.name, self.endpoint, self.ctx, self.rng = name, endpoint, ctx, rng
        self.curve, self.max_big, self.sidecar = curve, max_big, sidecar
        self.sock: zmq.Socket | None = None
        self.connects = 0
        self.reconnect()

    def reconnect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 2000)
        ident = b"fz-" + self.rng.randbytes(6).hex().encode()  # never a rank's identity
        sock.setsockopt(zmq.IDENTITY, ident)
        if self.curve is not None:
            server, public, secret = self.curve
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server, public, secret
        sock.connect(self.endpoint)
        self.sock = sock
        self.connects += 1

    def send(self, parts: list[bytes]) -> bool:
        assert self.sock is not None
        try:
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=len(parts[0]) < 65536)
            return True
        except zmq.Again:
            return False

    def drain(self) -> int:
        n = 0
        assert self.sock is not None
        while n < 10000:
            try:
                self.sock.recv_multipart(zmq.NOBLOCK)
                n += 1
            except zmq.Again:
                break
        return n

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def curve_dir_of(cluster: LocalCluster) -> Path | None:
    args = cluster.sidecar_args
    for i, a in enumerate(args):
        if a == "--curve-keys" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--curve-keys="):
            return Path(a.split("=", 1)[1])
    return None


# --- monitoring ---------------------------------------------------------------------------------

def rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


class Monitor(threading.Thread):
    def __init__(self, cluster: LocalCluster, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.cluster, self.every_s = cluster, every_s
        self.stop_event = threading.Event()
        self.steps: list[tuple[float, int]] = []
        self.status_failures = 0
        self.rss_peak = [0] * NODES
        self.rss_series: list[tuple[float, list[int]]] = []  # (time, VmRSS KiB per sidecar)

    def run(self) -> None:
        while not self.stop_event.is_set():
            now_rss = []
            for node, proc in self.cluster.sidecars.items():
                r = rss_kib(proc.pid)
                if r:
                    self.rss_peak[node] = max(self.rss_peak[node], r[0])
                now_rss.append(r[0] if r else 0)
            self.rss_series.append((time.monotonic(), now_rss))
            try:
                s = control_call("status", {}, self.cluster.run_dir(0), timeout_s=2.0)
                self.steps.append((time.monotonic(), s["min_step"]))
            except (ControlError, OSError):
                self.status_failures += 1
            self.stop_event.wait(self.every_s)

    def max_stall(self) -> float:
        """Longest time the workers' lowest step did not grow, over the samples."""
        worst, since, last = 0.0, None, None
        for t, step in self.steps:
            if last is None or step > last:
                since, last = t, step
            worst = max(worst, t - since)
        return worst


def rss_quarters(series: list[tuple[float, list[int]]], start: float, end: float) -> list[list[int]]:
    """VmRSS (KiB) per sidecar at the samples nearest 0, 25, 50, 75 and 100 % of the fuzzing:
    a leak climbs steadily, allocator growth levels off."""
    if not series:
        return []
    out = []
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        t = start + q * (end - start)
        out.append(min(series, key=lambda s: abs(s[0] - t))[1])
    return out


def local_status(cluster: LocalCluster, node: int) -> dict[str, Any]:
    result = control_call("status", {"local": True}, cluster.run_dir(node), timeout_s=5.0)
    return result.get("leader", result)


def metrics_rejected(cluster: LocalCluster, node: int) -> float | None:
    try:
        code, body = http_get(cluster.http_address(node) + "/metrics", timeout_s=5.0)
    except (OSError, RuntimeError, ControlError):
        return None
    if code != 200:
        return None
    total = 0.0
    for line in body.splitlines():
        if line.startswith("eplb_frames_rejected_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def commit_forced(cluster: LocalCluster, timeout_s: float = 45.0) -> tuple[bool, str]:
    """Force rebalances until one commits (a plan equal to the placement is skipped)."""
    deadline = time.monotonic() + timeout_s
    before = cluster.status()["counters"]["committed"]
    last = ""
    while time.monotonic() < deadline:
        try:
            control_call("rebalance", {"force": True}, cluster.run_dir(1), timeout_s=5.0)
        except ControlError as exc:
            last = str(exc)
        t_end = min(deadline, time.monotonic() + 10.0)
        while time.monotonic() < t_end:
            try:
                s = cluster.status(timeout_s=2.0)
            except ControlError:
                time.sleep(0.2)
                continue
            if s["counters"]["committed"] > before:
                rec = [r for r in s["history"] if r["outcome"] == "committed"][-1]
                return True, f"epoch {rec['epoch']} committed at S={rec['switch_step']}"
            if s["epoch_in_flight"] is None and not s["planning"] and s["history"]:
                last = f"{s['history'][-1]['outcome']}: {s['history'][-1]['reason'][:120]}"
            time.sleep(0.2)
    return False, last


# --- the run ------------------------------------------------------------------------------------

def run(args: argparse.Namespace, out=sys.stdout) -> dict[str, Any]:
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="eplbf-", dir="/tmp"))
    flags = ["--policy", "greedy"]
    keys_dir: Path | None = None
    if args.curve:
        from eplb.curve import create_keys
        keys_dir = base / "keys"
        create_keys(keys_dir)
        flags += ["--curve-keys", str(keys_dir)]
    cluster = start_demo_cluster(base, WORLD, PER_NODE, sidecar_flags=flags,
                                 worker_flags={r: ["--drift-every", "100"] for r in range(WORLD)})
    report: dict[str, Any] = {"seed": args.seed, "frames": args.frames, "rate": args.rate}
    ctx = zmq.Context()
    targets: list[Target] = []
    try:
        keys_dir = keys_dir or curve_dir_of(cluster)
        factory = FrameFactory(rng)
        report["message_types"] = factory.names
        report["types_not_built"] = factory.unbuilt
        leader_tcp = cluster.leader
        for node in range(NODES):
            targets.append(Target(f"workers.sock n{node}", workers_endpoint(cluster.run_dir(node)),
                                  ctx, rng, sidecar=node))
            targets.append(Target(f"control.sock n{node}", control_endpoint(cluster.run_dir(node)),
                                  ctx, rng, max_big=900 * 1024, sidecar=node))
        targets.append(Target("tcp-plain", leader_tcp, ctx, rng))
        stranger_keys = None
        if keys_dir is not None:
            from eplb.curve import load_keys
            node_keys = load_keys(keys_dir, leader=False)
            targets.append(Target("tcp-curve", leader_tcp, ctx, rng,
                                  curve=(node_keys.leader_public, node_keys.public,
                                         node_keys.secret)))
            stranger_keys = (node_keys.leader_public, *zmq.curve_keypair())
        rejected_before = [local_status(cluster, n)["frames_rejected"] for n in range(NODES)]
        metrics_before = metrics_rejected(cluster, 0)
        rss_before = [rss_kib(p.pid) for p in cluster.sidecars.values()]
        monitor = Monitor(cluster)
        monitor.start()
        sent: Counter[tuple[str, str]] = Counter()
        dropped: Counter[str] = Counter()
        predicted: Counter[int] = Counter()
        replaced = 0
        strangers = 0
        batch = 50
        t0 = time.monotonic()
        for i in range(args.frames):
            target = rng.choice(targets)
            kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
            parts = factory.make(kind, target.max_big)
            for _ in range(5):
                if not legit_here(target.name, parts):
                    break
                replaced += 1
                parts = factory.make(kind, target.max_big)
            else:
                continue
            if target.send(parts):
                sent[target.name, kind] += 1
                if target.curve is not None or not (keys_dir and target.name == "tcp-plain"):
                    predicted[target.sidecar] += predicted_rejections(target.name, parts)
            else:
                dropped[target.name] += 1
            if i % batch == batch - 1:
                for t in targets:
                    t.drain()
                ahead = (i + 1) / args.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            if i % 5000 == 4999:  # connection churn: a new peer identity now and then
                rng.choice(targets).reconnect()
                # a frame above the socket's size cap, on a connection of its own (libzmq drops
                # that connection; the sidecar never sees the frame)
                victim = rng.choice([t for t in targets if t.curve is None])
                limit = MAX_MSG[victim.name.split(".")[0].split("-")[0]]
                big = Target(victim.name, victim.endpoint, ctx, rng)
                if big.send([b"\x00" * (limit + 1024)]):
                    sent[victim.name, "oversize"] += 1
                assert big.sock is not None
                big.sock.close(linger=2000)  # libzmq goes on sending it in the background
                big.sock = None
                if stranger_keys is not None:  # a CURVE client the leader does not know
                    stranger = Target("tcp-stranger", leader_tcp, ctx, rng, curve=stranger_keys)
                    stranger.send([factory.valid()])
                    time.sleep(0.05)
                    stranger.close()
                    strangers += 1
            if i % 20000 == 19999:
                print(f"  {i + 1} frames, {time.monotonic() - t0:.0f}s", file=out, flush=True)
        fuzz_s = time.monotonic() - t0
        fuzz_end = time.monotonic()
        settle_until = time.monotonic() + 15.0  # let the sidecars drain their queues
        last: list = []
        while time.monotonic() < settle_until:
            time.sleep(1.0)
            for t in targets:
                t.drain()
            try:
                now = [local_status(cluster, n)["frames_rejected"] for n in range(NODES)]
            except ControlError:
                continue
            if now == last:
                break
            last = now
        # --- checks
        crashed = [f"sidecar {n} (exit {p.poll()})" for n, p in cluster.sidecars.items()
                   if p.poll() is not None]
        crashed += [f"worker {r} (exit {p.poll()})" for r, p in enumerate(cluster.workers)
                    if p.poll() is not None]
        rejected_after = []
        for n in range(NODES):
            try:
                rejected_after.append(local_status(cluster, n)["frames_rejected"])
            except ControlError as exc:
                rejected_after.append({"error": str(exc)})
        metrics_after = metrics_rejected(cluster, 0)
        committed, commit_text = (False, "a process crashed") if crashed else commit_forced(cluster)
        monitor.stop_event.set()
        monitor.join(5)
        rss_after = [rss_kib(p.pid) for p in cluster.sidecars.values()]
        steps = monitor.steps
        report.update({
            "sent": {f"{s}|{k}": n for (s, k), n in sorted(sent.items())},
            "not_sent_hwm": dict(dropped), "replaced_legit": replaced, "stranger_curve_clients": strangers,
            "fuzz_seconds": round(fuzz_s, 1), "crashed": crashed,
            "rejected_before": rejected_before, "rejected_after": rejected_after,
            "predicted_rejections": {str(k): v for k, v in predicted.items()},
            "metrics_rejected_leader": [metrics_before, metrics_after],
            "rss_kib": {"before": [r[0] if r else None for r in rss_before],
                        "after": [r[0] if r else None for r in rss_after],
                        "peak_sampled": monitor.rss_peak,
                        "hwm_after": [r[1] if r else None for r in rss_after],
                        "quarters": rss_quarters(monitor.rss_series, t0, fuzz_end)},
            "worker_steps": [steps[0][1], steps[-1][1]] if steps else None,
            "max_stall_s": round(monitor.max_stall(), 2), "status_failures": monitor.status_failures,
            "forced_rebalance": [committed, commit_text],
            "curve": keys_dir is not None,
        })
    finally:
        for t in targets:
            t.close()
        ctx.destroy(linger=0)
        cluster.stop()
        report["wall_s"] = round(time.monotonic() - started, 1)
    report["goals"] = goals(report, args)
    if all(report["goals"].values()) and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    else:
        report["kept"] = str(base)
    return report


def _total(counter: dict) -> int:
    return sum(v for k, v in counter.items() if isinstance(v, int))


def goals(r: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    growth = [(a - b) / 1024 for a, b in zip(r["rss_kib"]["after"], r["rss_kib"]["before"])
              if a is not None and b is not None]
    return {
        "no crashes": not r["crashed"],
        "workers kept stepping": bool(r["worker_steps"]) and r["worker_steps"][1] > r["worker_steps"][0]
                                 and r["max_stall_s"] <= args.max_stall,
        "forced rebalance committed": bool(r["forced_rebalance"][0]),
        "rejected counters grew": all(isinstance(a, dict) and "error" not in a and _total(a) > _total(b)
                                      for a, b in zip(r["rejected_after"], r["rejected_before"])),
        f"RSS growth <= {args.max_rss_growth:g} MiB": len(growth) == NODES
                                                        and max(growth) <= args.max_rss_growth,
    }


def print_report(r: dict[str, Any], out=sys.stdout) -> None:
    sockets = sorted({k.split("|")[0] for k in r["sent"]})
    head = f"{'socket':<18}" + "".join(f"{k:>9}" for k in KINDS) + f"{'total':>10}{'HWM-drop':>10}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for s in sockets:
        row = [r["sent"].get(f"{s}|{k}", 0) for k in KINDS]
        print(f"{s:<18}" + "".join(f"{v:>9}" for v in row) + f"{sum(row):>10}"
              f"{r['not_sent_hwm'].get(s, 0):>10}", file=out)
    cols = [sum(r["sent"].get(f"{s}|{k}", 0) for s in sockets) for k in KINDS]
    print(f"{'all':<18}" + "".join(f"{v:>9}" for v in cols) + f"{sum(cols):>10}"
          f"{sum(r['not_sent_hwm'].values()):>10}", file=out)
    print(f"(replaced {r['replaced_legit']} frames that a peer may legitimately send there; "
          f"{r['stranger_curve_clients']} CURVE clients with unknown keys; oversize frames go on "
          "a connection of their own, which libzmq drops, so no sidecar counts them)", file=out)
    print(file=out)
    print(f"{'sidecar':<9}{'rejected':>10}{'predicted':>11}  by reason (delta)", file=out)
    for n in range(NODES):
        before, after = r["rejected_before"][n], r["rejected_after"][n]
        if "error" in after:
            print(f"{'n%d' % n:<9}{'?':>10}  {after['error']}", file=out)
            continue
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after)}
        print(f"{'n%d' % n:<9}{_total(after) - _total(before):>10}"
              f"{r['predicted_rejections'].get(str(n), 0):>11}  {delta}", file=out)
    mb, ma = r["metrics_rejected_leader"]
    print(f"leader /metrics eplb_frames_rejected_total: {mb} -> {ma}", file=out)
    print(file=out)
    rss = r["rss_kib"]
    print(f"{'sidecar':<9}{'RSS before':>12}{'after':>10}{'peak':>10}{'growth':>10}  (MiB; peak "
          "sampled every 0.5 s)", file=out)
    for n in range(NODES):
        b, a, p = rss["before"][n], rss["after"][n], rss["peak_sampled"][n]
        if b is None or a is None:
            print(f"{'n%d' % n:<9}{'gone':>12}", file=out)
            continue
        print(f"{'n%d' % n:<9}{b / 1024:>12.1f}{a / 1024:>10.1f}{p / 1024:>10.1f}"
              f"{(a - b) / 1024:>10.1f}", file=out)
    if rss.get("quarters"):
        print("RSS (MiB) at 0/25/50/75/100 % of the fuzzing: " + "; ".join(
            f"n{n} " + " ".join(f"{q[n] / 1024:.1f}" for q in rss["quarters"]) for n in range(NODES)),
            file=out)
    print(file=out)
    print(f"crashes: {r['crashed'] or 0}; workers' lowest step {r['worker_steps']}, longest "
          f"stall {r['max_stall_s']} s, status calls that failed {r['status_failures']}; forced "
          f"rebalance: {r['forced_rebalance'][1]}; curve: {r['curve']}", file=out)
    print(f"fuzzing {r['fuzz_seconds']} s, wall time {r['wall_s']} s", file=out)
    for goal, ok in r["goals"].items():
        print(f"goal {goal}: {'ok' if ok else 'FAILED'}", file=out)
    if r.get("kept"):
        print(f"run directory and logs kept in {r['kept']}", file=out)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=2500.0, help="most messages sent per second")
    p.add_argument("--curve", action="store_true", help="give the cluster CURVE keys")
    p.add_argument("--max-stall", type=float, default=5.0,
                   help="longest time (s) the workers may stop stepping")
    p.add_argument("--max-rss-growth", type=float, default=64.0, help="MiB per sidecar")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the cluster on SIGTERM too
    if args.frames < 0 or args.rate <= 0:
        print("--frames must be >= 0 and --rate > 0", file=sys.stderr)
        return 2
    print(f"fuzz: {args.frames} frames at <= {args.rate:g}/s, seed {args.seed}", flush=True)
    report = run(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(report["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
