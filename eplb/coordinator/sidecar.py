"""The sidecar daemon: what both roles share. The decisions live in sans-IO cores; the drivers
around them only move bytes.

Every node runs one. It binds a ROUTER on ``ipc://<run_dir>/workers.sock`` for the node's
workers (each rank bound at HELLO to its connection and pid: :class:`LocalAdmission` in
:mod:`~eplb.coordinator.worker_registry` decides) and a ROUTER on ``ipc://<run_dir>/control.sock``
for ``eplbctl``. Node 0 is the leader (:class:`~eplb.coordinator.leader_driver.LeaderSidecar`
around :class:`~eplb.coordinator.leader.LeaderCore`): it binds a ROUTER on the TCP ``--leader``
address. The other nodes (:class:`~eplb.coordinator.follower_driver.FollowerSidecar` around
:class:`~eplb.coordinator.follower.FollowerCore`) connect a DEALER to it and relay their workers'
frames as ``[Relay header, worker frames...]``, a burst at a time (every layout:
:mod:`eplb.proto.envelope`). ``Sidecar(config)`` builds the one its config's role needs.

Operation: the tick loop stamps the health heartbeat (``/healthz``), pings systemd's watchdog,
refreshes the metrics and decides readiness (``/readyz``). On stop (SIGTERM) the order is fixed:
not ready, STOPPING=1 to systemd, the loops stop taking frames, the leader's core aborts an epoch
that has not committed (never one that has: it repeats the COMMIT instead), and the sockets close
with a short linger so those last frames still leave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import zmq
import zmq.asyncio

from eplb import __version__
from eplb.coordinator.decision_log import DecisionLog
from eplb.coordinator.health import HealthState, HttpEndpoints
from eplb.coordinator.leader import LeaderConfig
from eplb.coordinator.metrics import SidecarMetrics
from eplb.coordinator.outputs import Admitted, LocalLeft, Reject, ToLocal
from eplb.coordinator.peer_auth import INSECURE_WARNING, LinkMonitor, plain_tcp_refusal
from eplb.coordinator.worker_registry import LocalAdmission
from eplb.curve import CurveKeyError, CurveKeys, load_keys
from eplb.paths import control_endpoint, ensure_private_dir, workers_endpoint
from eplb.proto import (ControlReply, ControlRequest, Message, ProtocolError, Unauthenticated,
                        encode)
from eplb.proto.envelope import (BROADCAST, CONTROL_MAXMSGSIZE, WORKER_MAXMSGSIZE, open_control,
                                 open_worker)
from eplb.sd_notify import Notifier

log = logging.getLogger("eplb.sidecar")

#: Most worker messages a sidecar takes from its socket before giving other tasks a turn.
MAX_BURST = 64
#: How long closing sockets may wait for queued frames (the shutdown's ABORT) to leave.
SHUTDOWN_LINGER_S = 0.5


@dataclass(frozen=True)
class SidecarConfig:
    """One sidecar's settings (see ``eplb-sidecar --help``)."""

    node_rank: int
    num_nodes: int
    leader_address: str
    run_dir: Path
    leader: LeaderConfig = field(default_factory=LeaderConfig)
    bind_address: str | None = None  # leader only; defaults to leader_address
    heartbeat_s: float = 0.5
    worker_timeout_s: float = 3.0
    node_timeout_s: float = 3.0
    tick_s: float = 0.02
    control_timeout_s: float = 5.0
    planner_executor: str = "process"  # or "thread"
    planner_threads: int = 1  # torch CPU threads in the planner's executor
    group_access: bool = False
    http: tuple[str, int] | None = None  # (host, port) for /metrics, /healthz, /readyz; 0: any
    expected_workers: int = 0  # local workers that must have joined to be ready
    grace_s: float = 10.0  # a stop must finish within this (the CLI enforces it)
    stale_after_s: float = 5.0  # /healthz fails when the loop has not ticked for this long
    curve_keys: Path | None = None  # directory of CURVE certificates (eplb.curve); None: plain TCP
    insecure_plain_tcp: bool = False  # the operator's opt-out of CURVE with several nodes
    refresh_s: float = 0.25  # metrics and readiness update period
    balancedness_every_s: float = 2.0  # window balancedness is recomputed this often
    per_worker_relay: bool = False  # follower: relay every worker frame instead of per node

    @property
    def is_leader(self) -> bool:
        return self.node_rank == 0


class Sidecar:
    """Run with ``await Sidecar(config).run(stop_event)``: a
    :class:`~eplb.coordinator.leader_driver.LeaderSidecar` for node 0, a
    :class:`~eplb.coordinator.follower_driver.FollowerSidecar` for the others. The role's
    driver supplies the ``_role_*`` hooks; everything here is the same for both."""

    role = "sidecar"
    link_peer = "the TCP peer"  # who a failed handshake on the TCP link came from, for the log

    def __new__(cls, config: SidecarConfig) -> "Sidecar":
        if cls is Sidecar:  # the role's driver (imported here: they import this module)
            from eplb.coordinator.follower_driver import FollowerSidecar
            from eplb.coordinator.leader_driver import LeaderSidecar
            cls = LeaderSidecar if config.is_leader else FollowerSidecar
        return super().__new__(cls)

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.incarnation = uuid.uuid4().hex[:12]
        self.ctx = zmq.asyncio.Context()
        # local ranks bound to their connections; ``self.local`` is its view of the joined ones
        self.admission = LocalAdmission(config.node_rank, config.worker_timeout_s)
        self.registry = self.admission.registry
        self.rejected: Counter[str] = Counter()
        self._reject_logged: dict[str, tuple[float, int]] = {}
        self.started = time.monotonic()
        self._executor: concurrent.futures.Executor | None = None
        self._tasks: set[asyncio.Task] = set()
        self.metrics = SidecarMetrics(config.node_rank, self.role, config.num_nodes,
                                      config.leader.interval_steps)
        self._node_count_problem = ""  # what node_count_mismatch() said last (logged on change)
        self.health = HealthState(config.stale_after_s)
        self.notifier = Notifier()
        self.http: HttpEndpoints | None = None
        self.http_address: tuple[str, int] | None = None
        self.stopping = False
        self.failed = False  # a loop died: the process should exit non-zero
        self._link: LinkMonitor | None = None  # handshakes on the TCP link (peer_auth)
        self._peer_link = "none (single node)"  # what local_status says about the TCP link
        self.decisions: DecisionLog | None = None

    @property
    def local(self) -> Mapping[int, float]:
        """The joined local ranks -> last heard (monotonic), read-only: the registry owns it."""
        return MappingProxyType(self.registry.live)

    # --- the role's hooks -------------------------------------------------------------------------

    def _role_bind(self, keys: CurveKeys | None) -> None:
        """Bind or connect the TCP link."""
        raise NotImplementedError

    async def _role_start(self) -> list[Any]:
        """Before the loops run; returns the role's own loops (coroutines)."""
        raise NotImplementedError

    async def _role_admitted(self, admitted: Admitted, now: float) -> None:
        """A local frame passed admission (called in the order the frames came)."""
        raise NotImplementedError

    async def _role_burst_end(self) -> None:
        """A burst of local frames was handled."""

    async def _role_local_left(self, rank: int, why: str, now: float) -> None:
        raise NotImplementedError

    async def _role_tick(self, now: float) -> None:
        raise NotImplementedError

    async def _role_heartbeat(self) -> None:
        raise NotImplementedError

    async def _role_control(self, identity: bytes, msg: ControlRequest, frame: bytes) -> None:
        raise NotImplementedError

    def _role_refresh(self, now: float, balance: bool) -> None:
        raise NotImplementedError

    def _role_node_count_problem(self, now: float) -> str:
        return ""

    def group_readiness(self, now: float) -> tuple[bool, str]:
        """``/readyz?leader=1``, on top of :meth:`readiness`. Returns (ready, why)."""
        raise NotImplementedError

    async def _role_stop(self) -> None:
        """The loops have stopped; the sockets are still open."""

    def _close_role(self) -> None:
        """Release what the role holds besides the sockets."""

    def _role_status(self, now: float) -> dict[str, Any]:
        """The role's part of :meth:`local_status`."""
        return {}

    # --- setup ----------------------------------------------------------------------------------

    def _bind(self) -> None:
        cfg = self.config
        keys = self._curve_keys()  # first: a bad key directory stops the start before any bind
        ensure_private_dir(cfg.run_dir, cfg.group_access)
        self._refuse_if_running()
        self._role_prepare()
        self.workers = self.ctx.socket(zmq.ROUTER)  # no handover: a rank's holder is never cut off
        self.workers.setsockopt(zmq.LINGER, 200)
        self.workers.setsockopt(zmq.MAXMSGSIZE, WORKER_MAXMSGSIZE)
        self._bind_ipc(self.workers, workers_endpoint(cfg.run_dir))
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 200)
        self.control.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAXMSGSIZE)
        self._bind_ipc(self.control, control_endpoint(cfg.run_dir))
        self._role_bind(keys)

    def _role_prepare(self) -> None:
        """Before the sockets bind (the leader opens its decision log)."""

    def _curve_keys(self) -> CurveKeys | None:
        """The keys of --curve-keys; None for plain TCP, which a sidecar of several nodes
        accepts only with the explicit opt-out (--insecure-plain-tcp), loudly."""
        cfg = self.config
        if cfg.curve_keys is None:
            if cfg.num_nodes > 1 and not cfg.insecure_plain_tcp:
                raise SystemExit(f"eplb-sidecar: {plain_tcp_refusal(cfg.num_nodes)}")
            if cfg.insecure_plain_tcp:
                log.warning("node %d: %s", cfg.node_rank, INSECURE_WARNING)
                self._peer_link = "INSECURE plain TCP (--insecure-plain-tcp)"
            return None
        if cfg.insecure_plain_tcp:
            raise SystemExit(f"eplb-sidecar: both --curve-keys {cfg.curve_keys} and "
                             "--insecure-plain-tcp are set; choose one (unset "
                             "EPLB_INSECURE_PLAIN_TCP or EPLB_CURVE_KEYS)")
        try:
            keys = load_keys(cfg.curve_keys, cfg.node_rank, cfg.num_nodes)
        except CurveKeyError as exc:
            raise SystemExit(f"eplb-sidecar: --curve-keys: {exc}") from None
        for text in keys.warnings:
            log.warning("node %d: --curve-keys: %s", cfg.node_rank, text)
        self._peer_link = ("CURVE, shared follower key (any holder can pose as any node)"
                           if keys.shared else "CURVE, per-node keys")
        return keys

    def _watch_link(self, sock: zmq.asyncio.Socket, **kwargs: Any) -> None:
        """Monitor ``sock``'s CURVE handshakes; a failure counts as an unauthenticated frame (the
        monitor logs it, rate-limited by kind)."""
        where = self.link_peer
        self._link = LinkMonitor(sock, lambda text: self._reject(where, Unauthenticated(text),
                                                                 log_it=False), **kwargs)
        task = asyncio.ensure_future(self._link.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bind_ipc(self, sock: zmq.Socket, endpoint: str) -> None:
        path = endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)  # left by a dead sidecar; _refuse_if_running checked none is alive
        sock.bind(endpoint)
        os.chmod(path, 0o660 if self.config.group_access else 0o600)  # ZeroMQ used the umask

    def _refuse_if_running(self) -> None:
        """Stop if a live sidecar already answers on this run directory's control socket."""
        endpoint = control_endpoint(self.config.run_dir)
        if not os.path.exists(endpoint.removeprefix("ipc://")):
            return
        probe = zmq.Context.instance().socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        try:
            probe.connect(endpoint)
            probe.send(encode(ControlRequest(request_id="probe", op="status",
                                             args={"local": True})), zmq.NOBLOCK)
            alive = probe.poll(500) != 0
        except zmq.ZMQError:
            alive = False
        finally:
            probe.close()
        if alive:
            raise SystemExit(f"eplb-sidecar: another sidecar answers on {endpoint}; stop it or "
                             "use another --run-dir")

    # --- main loop ------------------------------------------------------------------------------

    async def _start_http(self) -> None:
        cfg = self.config
        if cfg.http is None:
            return
        self.http = HttpEndpoints(cfg.http[0], cfg.http[1], self.metrics.registry, self.health)
        try:
            self.http_address = await self.http.start()
        except OSError as exc:
            self.close()
            raise SystemExit(f"eplb-sidecar: cannot listen on --http {cfg.http[0]}:{cfg.http[1]}: "
                             f"{exc}; choose another port, or --http off") from None
        log.info("node %d: /metrics, /healthz, /readyz on http://%s:%d", cfg.node_rank,
                 *self.http_address)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (or a loop fails), then shut down in order."""
        self._bind()
        await self._start_http()
        cfg = self.config
        log.info("node %d/%d: sidecar %s (%s) up; workers on %s, control on %s, leader %s",
                 cfg.node_rank, cfg.num_nodes, self.incarnation, self.role,
                 workers_endpoint(cfg.run_dir), control_endpoint(cfg.run_dir), cfg.leader_address)
        loops = [self._worker_loop(), self._control_loop(), self._tick_loop(),
                 *await self._role_start()]
        self._refresh(time.monotonic(), balance=False)  # /readyz says why from the start
        tasks = [asyncio.ensure_future(c) for c in loops]
        stopper = asyncio.ensure_future(stop.wait())
        self.notifier.ready(f"{self.role} of {cfg.num_nodes} node(s)")
        done, _ = await asyncio.wait(tasks + [stopper], return_when=asyncio.FIRST_COMPLETED)
        # 1. not ready, and systemd knows we are stopping
        self.stopping = True
        self.health.set_ready(False, "shutting down")
        self.metrics.ready.set(0)
        self.notifier.stopping("shutting down")
        log.info("node %d: stopping", cfg.node_rank)
        # 2. no more frames in: after this no PROMISE can turn the epoch into a COMMIT
        for task in tasks + [stopper] + list(self._tasks):
            task.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception():
                self.failed = True
                log.error("node %d: a sidecar loop failed", cfg.node_rank,
                          exc_info=task.exception())
        await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
        # 3. the leader's core ends the epoch in flight (invariant I1: never a committed one)
        try:
            await self._role_stop()
        except Exception:  # still close the sockets
            log.exception("node %d: could not end the epoch in flight", cfg.node_rank)
        # 4. close with a short linger: the frames just queued still leave
        self.close()

    def close(self) -> None:
        self._close_role()
        if self.http is not None:
            self.http.close()
        linger_ms = int(1000 * min(SHUTDOWN_LINGER_S, self.config.grace_s / 4))
        self.ctx.destroy(linger=linger_ms)
        self.notifier.close()
        for endpoint in (workers_endpoint(self.config.run_dir), control_endpoint(self.config.run_dir)):
            try:
                os.unlink(endpoint.removeprefix("ipc://"))
            except FileNotFoundError:
                pass
        log.info("node %d: sidecar stopped", self.config.node_rank)

    @staticmethod
    async def _recv(sock: zmq.asyncio.Socket) -> list[bytes]:
        """Receive one message, first giving the other tasks a turn: pyzmq completes a receive
        without suspending when a message is already queued, so a busy socket would otherwise
        starve the tick loop and with it every time-out."""
        await asyncio.sleep(0)
        return await sock.recv_multipart(copy=True)

    def _reject(self, where: str, exc: ProtocolError, log_it: bool = True) -> None:
        """Invariant I4: a bad frame is counted and logged, and changes nothing. Logging is capped
        at one line per reason per second, so a flood cannot fill the disk. ``log_it`` False: the
        caller logs it its own way."""
        self.rejected[exc.reason] += 1
        self.metrics.frames_rejected.labels(exc.reason).inc()
        if not log_it:
            return
        now = time.monotonic()
        last, suppressed = self._reject_logged.get(exc.reason, (0.0, 0))
        if now - last < 1.0:
            self._reject_logged[exc.reason] = (last, suppressed + 1)
            return
        self._reject_logged[exc.reason] = (now, 0)
        log.warning("node %d: dropped a bad frame from %s (%s): %s%s", self.config.node_rank, where,
                    exc.reason, exc,
                    f" ({suppressed} more of this kind in the last second)" if suppressed else "")

    # --- local workers --------------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        """Frames from local workers, taken in bursts: a follower relays a burst (say, the
        PROMISEs of all its workers) to the leader as one message."""
        while True:
            burst = [await self._recv(self.workers)]
            while len(burst) < MAX_BURST:
                try:
                    burst.append(await self.workers.recv_multipart(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
            for parts in burst:
                try:
                    identity, rank, msg = open_worker(parts)
                except ProtocolError as exc:
                    who = f"worker identity {parts[0][:24]!r}" if len(parts) == 2 else "a local worker"
                    self._reject(who, exc)
                    continue
                now = time.monotonic()
                await self._carry_local(self.admission.on_frame(identity, rank, msg, parts[1], now),
                                        now)
            await self._role_burst_end()

    async def _carry_local(self, outputs: list[Any], now: float) -> None:
        """Carry out what :class:`LocalAdmission` decided, in order."""
        for out in outputs:
            if isinstance(out, Admitted):
                await self._role_admitted(out, now)
            elif isinstance(out, ToLocal):
                await self._to_local(out.rank, out.frame, out.msg, out.identity)
            elif isinstance(out, LocalLeft):
                await self._role_local_left(out.rank, out.why, now)
            elif isinstance(out, Reject):
                self._reject(out.where, out.error)

    async def _to_local(self, rank: int, frame: bytes, msg: Message,
                        identity: bytes | None = None) -> None:
        """To the connection ``identity``, or the one bound to ``rank``, or to every bound one
        for :data:`BROADCAST` (silent ones too: a worker dropped after a pause must still see
        the COMMIT of an epoch it promised)."""
        if identity is not None:
            targets = [(rank, identity)]
        elif rank == BROADCAST:
            targets = self.registry.identities()
        else:
            bound = self.registry.identity_of(rank)
            if bound is None:
                log.debug("node %d: rank %d is not bound; dropped a frame for it",
                          self.config.node_rank, rank)
                return
            targets = [(rank, bound)]
        for target, ident in targets:
            try:
                await self.workers.send_multipart([ident, frame])
            except zmq.ZMQError as exc:
                log.warning("node %d: cannot reach rank %d: %s", self.config.node_rank, target,
                            exc)
                continue
            self.admission.delivered(target, msg, ident)

    # --- ticks: time-outs, heartbeats, metrics ------------------------------------------------

    async def _tick_loop(self) -> None:
        cfg = self.config
        next_beat = next_refresh = next_balance = next_watchdog = 0.0
        watchdog_every = self.notifier.watchdog_interval_s
        while True:
            await asyncio.sleep(cfg.tick_s)
            now = time.monotonic()
            self.health.beat()
            if watchdog_every is not None and now >= next_watchdog:
                next_watchdog = now + watchdog_every
                self.notifier.watchdog()
            await self._carry_local(self.admission.on_tick(now), now)
            await self._role_tick(now)
            if now >= next_beat:
                next_beat = now + cfg.heartbeat_s
                await self._role_heartbeat()
            if now >= next_refresh:
                next_refresh = now + cfg.refresh_s
                self._refresh(now, balance=now >= next_balance)
                if now >= next_balance:
                    next_balance = now + cfg.balancedness_every_s

    def _refresh(self, now: float, balance: bool) -> None:
        """Metrics and readiness from the current state (on the loop, so nothing races)."""
        self.metrics.workers_connected.set(len(self.local))
        self._role_refresh(now, balance)
        self._report_node_count(now)
        ready, why = self.readiness(now)
        if not self.stopping:
            self.health.set_ready(ready, why, *self.group_readiness(now))
            self.metrics.ready.set(1 if ready else 0)

    def node_count_mismatch(self, now: float) -> str:
        """Why the nodes seen contradict --num-nodes (e.g. a StatefulSet's replicas differ from
        the ConfigMap's num-nodes); empty when they do not. A follower knows when its own rank
        is outside --num-nodes; the leader's core, when a node outside it says hello (within the
        last 3 x --node-timeout), or when every rank of the group joined through fewer nodes."""
        cfg = self.config
        if cfg.node_rank >= cfg.num_nodes:
            return (f"this node's rank {cfg.node_rank} is outside --num-nodes {cfg.num_nodes}: "
                    "more nodes run than --num-nodes says (StatefulSet replicas > num-nodes?)")
        return self._role_node_count_problem(now)

    def _report_node_count(self, now: float) -> None:
        """The mismatch as a metric, and as a log line when it appears, changes or clears."""
        problem = self.node_count_mismatch(now)
        self.metrics.node_count_mismatch.set(1 if problem else 0)
        if problem != self._node_count_problem:
            if problem:
                log.error("node %d: node-count mismatch: %s", self.config.node_rank, problem)
            else:
                log.info("node %d: node-count mismatch cleared", self.config.node_rank)
            self._node_count_problem = problem

    def readiness(self, now: float) -> tuple[bool, str]:
        """``/readyz``, from local state only: the sidecar serves its workers' socket (it runs),
        the expected local workers have joined, its own rank is within --num-nodes, and it is not
        stopping. Never the leader's reachability: see :meth:`group_readiness`. Returns
        (ready, why)."""
        cfg = self.config
        if self.stopping:
            return False, "shutting down"
        if cfg.node_rank >= cfg.num_nodes:
            return False, f"node-count mismatch: {self.node_count_mismatch(now)}"
        if len(self.local) < cfg.expected_workers:
            return False, (f"{len(self.local)}/{cfg.expected_workers} local workers joined "
                           f"(ranks {sorted(self.local)})")
        return True, self._ready_text()

    def _ready_text(self) -> str:
        return f"ready: {len(self.local)} local worker(s) {sorted(self.local)}"

    # --- control --------------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            parts = await self._recv(self.control)
            identity, frames = parts[0], parts[1:]
            try:
                msg = open_control(frames)
            except ProtocolError as exc:
                self._reject("a control client", exc)
                await self.control.send_multipart([identity, encode(ControlReply(
                    request_id="", ok=False, result={}, error=f"bad request: {exc}"))])
                continue
            await self._role_control(identity, msg, frames[0])

    def local_status(self) -> dict[str, Any]:
        """This sidecar's own view (no leader state)."""
        now = time.monotonic()
        return {
            "node": self.config.node_rank, "num_nodes": self.config.num_nodes,
            "role": self.role,
            "leader_address": self.config.leader_address,
            "incarnation": self.incarnation, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3),
            "local_workers": sorted(self.local),
            "frames_rejected": dict(self.rejected),
            "http": (f"{self.http_address[0]}:{self.http_address[1]}"
                     if self.http_address else None),
            "ready": self.readiness(now)[0],
            "leader_reachable": None,
            "node_count_mismatch": self.node_count_mismatch(now) or None,
            "leader_last_seen_s": None,
            **self._role_status(now),
            "peer_link": self._peer_link_status(),
        }

    def _peer_link_status(self) -> dict[str, Any]:
        """The TCP link's security, and (with CURVE) its handshakes as the monitor saw them."""
        return {"security": self._peer_link, **(self._link.status() if self._link else {})}


def decision_log_path(run_dir: Path) -> Path:
    """Where the leader keeps its decision log (it must survive a restart of the sidecar)."""
    return Path(run_dir) / "decisions.jsonl"


def set_planner_threads(threads: int) -> None:
    """Executor initializer: the planner's torch CPU threads. Its plans are many small tensor
    operations, which run fastest on one thread; more threads also spin on cores the engine's
    processes need (measured on 2 busy cores: 12 ms per plan on 1 thread, about 1 s on 2)."""
    import torch

    torch.set_num_threads(threads)


def _warm_up() -> None:
    """Runs in the planner's process at start: the imports are done before the first plan."""
    import eplb.placement.planner  # noqa: F401
