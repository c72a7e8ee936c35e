"""The sidecar daemon: the I/O around :class:`~eplb.coordinator.leader.LeaderCore`.

Every node runs one. It binds a ROUTER on ``ipc://<run_dir>/workers.sock`` for the node's
workers (each rank bound at HELLO to its connection and pid; see
:mod:`~eplb.coordinator.worker_registry`) and a ROUTER on ``ipc://<run_dir>/control.sock`` for
``eplbctl``. Node 0 is the leader: it binds a ROUTER on the TCP ``--leader`` address and runs the
leader logic; the other nodes connect a DEALER to it and relay their workers' frames as
``[Relay header, worker frames...]``, a burst at a time. All decisions live in the sans-IO core; this module only moves
frames, watches liveness and runs the planner in an executor.

Operation: the tick loop stamps the health heartbeat (``/healthz``), pings systemd's watchdog,
refreshes the metrics and decides readiness (``/readyz``). On stop (SIGTERM) the order is fixed:
not ready, STOPPING=1 to systemd, the loops stop taking frames, the leader aborts an epoch that has
not committed (never one that has: it repeats the COMMIT instead), and the sockets close with a
short linger so those last frames still leave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
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
from eplb.coordinator.agreement import Phase
from eplb.coordinator.health import HealthState, HttpEndpoints
from eplb.coordinator.decision_log import DecisionLog, DecisionLogError
from eplb.coordinator.leader import (Broadcast, ComputePlan, LeaderConfig, LeaderCore, Output,
                                     Persist, SendTo)
from eplb.coordinator.metrics import SHUTDOWN_REASON, SidecarMetrics
from eplb.coordinator.peer_auth import (INSECURE_WARNING, PEER_MAXMSGSIZE, PEER_RCVHWM, PLAIN,
                                        LinkMonitor, NodeAuthenticator, PeerKey, Unauthenticated,
                                        check_claim, check_envelope, peer_of, plain_tcp_refusal)
from eplb.placement.planner import plan_rebalance
from eplb.coordinator.worker_registry import (Admit, Impostor, Verdict, WorkerRegistry,
                                              rank_of_identity, relayed_hello_conflict)
from eplb.curve import CurveKeyError, CurveKeys, load_keys, node_name
from eplb.paths import control_endpoint, ensure_private_dir, workers_endpoint
from eplb.proto import (Bye, ControlReply, ControlRequest, Hello, IdentityMismatch,
                        InvalidField, MalformedFrame, Message, NodeHeartbeat, NodeHello,
                        ProtocolError, Rejoin, Relay, Welcome, WorkerLeft, decode, encode)
from eplb.sd_notify import Notifier

log = logging.getLogger("eplb.sidecar")

BROADCAST = -1
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

    @property
    def is_leader(self) -> bool:
        return self.node_rank == 0


class Sidecar:
    """Run with ``await Sidecar(config).run(stop_event)``."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.incarnation = uuid.uuid4().hex[:12]
        self.ctx = zmq.asyncio.Context()
        self.core = LeaderCore(config.leader) if config.is_leader else None
        # local ranks bound to their connections; ``self.local`` is its view of the joined ones
        self.registry = WorkerRegistry(config.worker_timeout_s)
        self._local_rejoin_asked: dict[bytes, float] = {}
        self.rejected: Counter[str] = Counter()
        self._reject_logged: dict[str, tuple[float, int]] = {}
        self._rejoin_asked: dict[int, float] = {}
        self.started = time.monotonic()
        # leader: the follower sidecars by node, and the node each joined rank came through
        self.nodes: dict[int, _Follower] = {}
        self.rank_node: dict[int, int] = {}
        self.node_ranks: dict[int, frozenset[int]] = {}  # the ranks each follower last listed
        # follower: pending control requests forwarded to the leader
        self.pending_control: dict[str, tuple[bytes, float]] = {}
        self.leader_seen = 0.0
        self._executor: concurrent.futures.Executor | None = None
        self._tasks: set[asyncio.Task] = set()
        role = "leader" if config.is_leader else "follower"
        self.metrics = SidecarMetrics(config.node_rank, role, config.num_nodes,
                                      config.leader.interval_steps)
        self._outside_nodes: dict[int, float] = {}  # leader: node >= --num-nodes -> last heard
        self._node_count_problem = ""  # what node_count_mismatch() said last (logged on change)
        self.health = HealthState(config.stale_after_s)
        self.notifier = Notifier()
        self.http: HttpEndpoints | None = None
        self.http_address: tuple[str, int] | None = None
        self.stopping = False
        self.failed = False  # a loop died: the process should exit non-zero
        self._auth: NodeAuthenticator | None = None
        self._link: LinkMonitor | None = None  # handshakes on the TCP link (peer_auth)
        self._peer_link = "none (single node)"  # what local_status says about the TCP link
        self.decisions: DecisionLog | None = None

    @property
    def local(self) -> Mapping[int, float]:
        """The joined local ranks -> last heard (monotonic), read-only: the registry owns it."""
        return MappingProxyType(self.registry.live)

    # --- setup ----------------------------------------------------------------------------------

    def _bind(self) -> None:
        cfg = self.config
        keys = self._curve_keys()  # first: a bad key directory stops the start before any bind
        ensure_private_dir(cfg.run_dir, cfg.group_access)
        self._refuse_if_running()
        if self.core is not None:
            try:
                self.decisions = DecisionLog(decision_log_path(cfg.run_dir))
            except DecisionLogError as exc:
                raise SystemExit(f"eplb-sidecar: {exc}") from None
        self.workers = self.ctx.socket(zmq.ROUTER)  # no handover: a rank's holder is never cut off
        self.workers.setsockopt(zmq.LINGER, 200)
        self.workers.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024 + 4096)
        self._bind_ipc(self.workers, workers_endpoint(cfg.run_dir))
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 200)
        self.control.setsockopt(zmq.MAXMSGSIZE, 1024 * 1024)
        self._bind_ipc(self.control, control_endpoint(cfg.run_dir))
        if cfg.is_leader:
            self.peers = self.ctx.socket(zmq.ROUTER)
            self.peers.setsockopt(zmq.LINGER, 200)
            self.peers.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.peers.setsockopt(zmq.MAXMSGSIZE, PEER_MAXMSGSIZE)
            self.peers.setsockopt(zmq.RCVHWM, PEER_RCVHWM)
            if keys is not None:
                self._serve_curve(self.peers, keys)
            address = cfg.bind_address or cfg.leader_address
            if keys is None and cfg.num_nodes == 1 and not cfg.insecure_plain_tcp:
                log.info("node 0: a single node binds no TCP port (no followers, no keys)")
            else:
                try:
                    self.peers.bind(address)
                except zmq.ZMQError as exc:
                    raise SystemExit(f"eplb-sidecar: cannot bind the leader address {address}: "
                                     f"{exc}. Is another sidecar running, or is the port "
                                     "taken?") from None
        else:
            self.up = self.ctx.socket(zmq.DEALER)
            self.up.setsockopt(zmq.IDENTITY, f"node-{cfg.node_rank}-{self.incarnation}".encode())
            self.up.setsockopt(zmq.LINGER, 200)
            self.up.setsockopt(zmq.SNDHWM, 100000)
            self.up.setsockopt(zmq.MAXMSGSIZE, PEER_MAXMSGSIZE)
            if keys is not None:
                # CURVE client: the handshake completes only with a server that holds the
                # leader's secret key
                self.up.curve_serverkey = keys.leader_public
                self.up.curve_publickey = keys.public
                self.up.curve_secretkey = keys.secret
            # the monitor explains a link that does not come up (name, reachability, keys),
            # once per cause, instead of retrying mutely
            self._watch_link(self.up, leader_address=cfg.leader_address,
                             own_key=node_name(cfg.node_rank) if keys is not None else "")
            self.up.connect(cfg.leader_address)

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

    def _serve_curve(self, sock: zmq.asyncio.Socket, keys: CurveKeys) -> None:
        """Leader: CURVE server; a ZAP handler admits only the followers' known public keys and
        names each connection after its key (``node-K``, the frames' User-Id). A refused
        handshake is counted and logged like a bad frame (invariant I4)."""
        def refused(key: bytes) -> None:
            self._reject("a peer's CURVE handshake", Unauthenticated(
                f"public key {key.decode(errors='replace')} is not among the authorized keys "
                f"(node-K.key) in {self.config.curve_keys}"))

        self._auth = NodeAuthenticator(self.ctx, keys, refused)
        self._auth.start()
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True
        self._watch_link(sock)

    def _watch_link(self, sock: zmq.asyncio.Socket, **kwargs: Any) -> None:
        """Monitor ``sock``'s CURVE handshakes; a failure counts as an unauthenticated frame (the
        monitor logs it, rate-limited by kind)."""
        where = "the leader" if not self.config.is_leader else "a TCP peer"
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
        role = "leader" if cfg.is_leader else "follower"
        log.info("node %d/%d: sidecar %s (%s) up; workers on %s, control on %s, leader %s",
                 cfg.node_rank, cfg.num_nodes, self.incarnation, role,
                 workers_endpoint(cfg.run_dir), control_endpoint(cfg.run_dir), cfg.leader_address)
        loops = [self._worker_loop(), self._control_loop(), self._tick_loop()]
        loops.append(self._peer_loop() if cfg.is_leader else self._up_loop())
        if not cfg.is_leader:
            await self._send_up([encode(NodeHello(node=cfg.node_rank, pid=os.getpid(),
                                                  incarnation=self.incarnation))])
        if cfg.is_leader:
            self._start_executor()
            assert self.core is not None and self.decisions is not None
            await self._execute(self.core.restore(self.decisions.records, time.monotonic()))
        self._refresh(time.monotonic(), balance=False)  # /readyz says why from the start
        tasks = [asyncio.ensure_future(c) for c in loops]
        stopper = asyncio.ensure_future(stop.wait())
        self.notifier.ready(f"{role} of {cfg.num_nodes} node(s)")
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
        # 3. an epoch before COMMIT is aborted; a committed one is never aborted (invariant I1)
        try:
            await self._settle_epoch_for_shutdown()
        except Exception:  # still close the sockets
            log.exception("node %d: could not end the epoch in flight", cfg.node_rank)
        # 4. close with a short linger: the frames just queued still leave
        self.close()

    async def _settle_epoch_for_shutdown(self) -> None:
        """Leader, stopping: the core ABORTs an epoch that has not committed (on record first), so
        that promised workers stop holding at S, and repeats the COMMIT of a committed one, in
        case the broadcast that carried it was cut short by the stop."""
        if self.core is None or self.core.agreement is None:
            return
        agreement = self.core.agreement
        fields = {"epoch": agreement.epoch, "phase": agreement.phase.value,
                  "step": agreement.switch_step}
        if agreement.phase in (Phase.PLANNED, Phase.PREPARING):
            log.warning("epoch %d: aborting it (%s, not committed): %s", agreement.epoch,
                        agreement.phase.value, SHUTDOWN_REASON, extra=fields)
            self.metrics.epochs_aborted.labels("shutdown").inc()
        elif agreement.phase is Phase.COMMITTED:
            log.warning("epoch %d: committed at S=%d, so it is not aborted; the workers finish "
                        "their copies, and a restarted leader resumes it from its decision log",
                        agreement.epoch, agreement.switch_step, extra=fields)
        await self._execute(self.core.shutdown(SHUTDOWN_REASON, time.monotonic()))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.decisions is not None:
            self.decisions.close()
        if self.http is not None:
            self.http.close()
        if self._auth is not None:
            self._auth.stop()
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
            ranks: list[int] = []
            frames: list[bytes] = []
            for parts in burst:
                checked = self._check_worker_frame(parts)
                if checked is not None and await self._on_local_worker(*checked):
                    ranks.append(checked[0])
                    frames.append(checked[2])
            if ranks:
                await self._send_up([encode(Relay(node=self.config.node_rank, ranks=tuple(ranks))),
                                     *frames])

    def _check_worker_frame(self, parts: list[bytes]) -> tuple[int, Message, bytes, bytes] | None:
        """Decode a local worker's message; ``(rank, msg, frame, identity)``, or None if rejected.
        The routing identity must name the message's rank (``<rank>`` or ``<rank>.<pid>...``)."""
        if len(parts) != 2:
            self._reject("a local worker", MalformedFrame(f"expected 2 parts, got {len(parts)}"))
            return None
        identity, frame = parts
        try:
            msg = decode(frame)
            rank = rank_of_identity(identity)
            if rank is None or getattr(msg, "rank", None) != rank:
                raise IdentityMismatch(f"socket identity {identity[:24]!r} does not match the "
                                       f"message's rank {getattr(msg, 'rank', None)}")
        except ProtocolError as exc:
            self._reject(f"worker identity {identity[:24]!r}", exc)
            return None
        return rank, msg, frame, identity

    async def _on_local_worker(self, rank: int, msg: Message, frame: bytes,
                               identity: bytes) -> bool:
        """Handle one local worker message. Returns True when a follower must relay it."""
        now = time.monotonic()
        node = self.config.node_rank
        if isinstance(msg, Hello):
            decision = self.registry.hello(rank, identity, msg.pid, now)
            if not isinstance(decision, Admit):
                self._reject(f"worker identity {identity[:24]!r} (pid {msg.pid})",
                             Impostor(decision.error))
                await self._send_worker(identity, rank, encode(Welcome(
                    rank=rank, ok=False, error=decision.error, retry=True)))
                return False
            old = decision.displaced
            if old is not None:
                log.warning("node %d: rank %d: pid %d takes over from pid %d, which is gone or "
                            "silent", node, rank, msg.pid, old.pid, extra={"rank": rank})
                if old.live:  # not declared gone yet: its epoch must not wait for it
                    await self._worker_left(rank, f"its process {old.pid} is gone; pid "
                                                  f"{msg.pid} takes its place")
            if msg.node != node:
                log.warning("rank %d says it is on node %d but joined the sidecar of node %d",
                            rank, msg.node, node)
            log.info("node %d: rank %d joined at step %d", node, rank, msg.step,
                     extra={"rank": rank, "step": msg.step})
        else:
            verdict = self.registry.check(rank, identity, now)
            if verdict in (Verdict.MISMATCH, Verdict.RECLAIM):
                self._reject(f"worker identity {identity[:24]!r}", IdentityMismatch(
                    f"{msg.TYPE} for rank {rank} from a connection that does not hold it"))
                if verdict is Verdict.RECLAIM:  # its holder is gone: the sender may take it back
                    await self._ask_local_rejoin(identity, rank, f"rank {rank}'s holder is gone")
                return False
            if isinstance(msg, Bye):
                if verdict is not Verdict.UNBOUND:
                    self.registry.unbind(rank)
                if verdict is Verdict.OK:
                    await self._worker_left(rank, "said goodbye")
                return False
            if verdict is not Verdict.OK:
                # No HELLO since this sidecar started, or the rank was declared gone: ask for one.
                await self._ask_local_rejoin(identity, rank,
                                             f"node {node}'s sidecar does not know rank {rank}")
                return False
            self.registry.heard(rank, now)
        if self.core is None:
            return True
        await self._leader_receive(0, msg, now)
        return False

    async def _ask_local_rejoin(self, identity: bytes, rank: int, why: str) -> None:
        """Tell the local connection ``identity`` to say HELLO for ``rank``, at most once a
        second per connection."""
        now = time.monotonic()
        if now - self._local_rejoin_asked.get(identity, 0.0) < 1.0:
            return
        if len(self._local_rejoin_asked) > 4096:
            self._local_rejoin_asked = {i: t for i, t in self._local_rejoin_asked.items()
                                        if now - t < 1.0}
        self._local_rejoin_asked[identity] = now
        log.info("node %d: asking rank %d to join again: %s", self.config.node_rank, rank, why,
                 extra={"rank": rank})
        await self._send_worker(identity, rank, encode(Rejoin(rank=rank, reason=why)))

    async def _worker_left(self, rank: int, why: str) -> None:
        log.warning("node %d: rank %d left: %s", self.config.node_rank, rank, why,
                    extra={"rank": rank})
        if self.core is None:
            await self._send_up([encode(WorkerLeft(node=self.config.node_rank, rank=rank,
                                                   reason=why))])
        else:
            await self._execute(self.core.on_worker_left(rank, f"{why} (node 0)", time.monotonic()))

    async def _to_local(self, rank: int, frame: bytes) -> None:
        """To the connection bound to ``rank``, or to every bound one (silent ones too: a
        worker dropped after a pause must still see the COMMIT of an epoch it promised)."""
        if rank == BROADCAST:
            targets = self.registry.identities()
        else:
            identity = self.registry.identity_of(rank)
            if identity is None:
                log.debug("node %d: rank %d is not bound; dropped a frame for it",
                          self.config.node_rank, rank)
                return
            targets = [(rank, identity)]
        for target, identity in targets:
            await self._send_worker(identity, target, frame)

    async def _send_worker(self, identity: bytes, rank: int, frame: bytes) -> None:
        try:
            await self.workers.send_multipart([identity, frame])
        except zmq.ZMQError as exc:
            log.warning("node %d: cannot reach rank %d: %s", self.config.node_rank, rank, exc)

    # --- leader side ----------------------------------------------------------------------------

    async def _leader_receive(self, node: int, msg: Message, now: float) -> None:
        assert self.core is not None
        if isinstance(msg, Hello):
            listed = {n: self.node_ranks.get(n, frozenset()) for n in self.nodes}
            listed[0] = frozenset(self.local)
            conflict = relayed_hello_conflict(msg.rank, node, self.rank_node, listed)
            if conflict:  # a second claim to a rank that a live node holds: it stays there
                self._reject(f"node {node}, rank {msg.rank} (pid {msg.pid})", Impostor(conflict))
                error, retry = conflict, True
            else:
                if node != 0 and self.rank_node.get(msg.rank, node) != node:
                    log.warning("rank %d moved from node %d to node %d", msg.rank,
                                self.rank_node[msg.rank], node)
                error, retry = self.core.on_hello(msg, now), False
                if not error:
                    self.rank_node[msg.rank] = node
                    if node != 0:  # its node's heartbeats list it from now on (same socket)
                        self.node_ranks[node] = self.node_ranks.get(node, frozenset()) | {msg.rank}
                else:
                    log.error("rank %d refused: %s", msg.rank, error, extra={"rank": msg.rank})
            await self._to_worker(node, msg.rank, encode(Welcome(rank=msg.rank, ok=not error,
                                                                 error=error, retry=retry)))
            if error and node == 0:
                self.registry.unbind(msg.rank)  # after the WELCOME: it goes to the binding
            if not error:
                await self._execute(self.core.on_joined(msg.rank))
            return
        if self.rank_node.get(msg.rank) != node:
            # Not joined through this node (the leader restarted since its HELLO): ask again.
            await self._ask_rejoin(node, msg.rank, f"the leader does not know rank {msg.rank}")
            return
        await self._execute(self.core.on_message(msg, now))

    async def _ask_rejoin(self, node: int | None, rank: int, why: str) -> None:
        """Tell ``rank`` to say HELLO again, at most once a second. ``node`` None: a local
        worker of this (follower) sidecar."""
        now = time.monotonic()
        if now - self._rejoin_asked.get(rank, 0.0) < 1.0:
            return
        self._rejoin_asked[rank] = now
        log.info("node %d: asking rank %d to join again: %s", self.config.node_rank, rank, why,
                 extra={"rank": rank})
        frame = encode(Rejoin(rank=rank, reason=why))
        if node is None:
            await self._to_local(rank, frame)
        else:
            await self._to_worker(node, rank, frame)

    async def _to_worker(self, node: int, rank: int, frame: bytes) -> None:
        if node == 0:
            await self._to_local(rank, frame)
        elif node in self.nodes:
            await self.peers.send_multipart([self.nodes[node].identity,
                                             encode(Relay(node=0, ranks=(rank,))), frame])

    async def _execute(self, outputs: list[Output]) -> None:
        """Carry out the core's outputs in order; a :class:`Persist` is on disk before anything
        after it leaves."""
        for out in outputs:
            if isinstance(out, Persist):
                assert self.decisions is not None
                self.decisions.append(out.record)
            elif isinstance(out, SendTo):
                node = self.rank_node.get(out.rank)
                if node is not None:
                    await self._to_worker(node, out.rank, encode(out.msg))
            elif isinstance(out, Broadcast):
                frame = encode(out.msg)
                header = encode(Relay(node=0, ranks=(BROADCAST,)))
                await self._to_local(BROADCAST, frame)
                for follower in list(self.nodes.values()):
                    await self.peers.send_multipart([follower.identity, header, frame])
            elif isinstance(out, ComputePlan):
                task = asyncio.ensure_future(self._plan(out))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _start_executor(self) -> None:
        """Leader: start the planner's executor now, so the first plan does not pay for it."""
        threads = (self.config.planner_threads,)
        if self.config.planner_executor == "process":
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=set_planner_threads, initargs=threads)
            self._executor.submit(_warm_up)  # imports torch and the planner in the child
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, initializer=set_planner_threads, initargs=threads)

    async def _plan(self, req: ComputePlan) -> None:
        """Run the planner off the event loop, then hand the result to the core."""
        assert self.core is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        try:
            result: Any = await loop.run_in_executor(self._executor, plan_rebalance, req.load,
                                                     req.current, req.num_gpus, req.min_gain,
                                                     req.force, req.spec)
        except Exception as exc:  # planner bug or dead pool: record it, keep serving
            result = exc
        else:
            self.metrics.plan_seconds.observe(result.plan_seconds)
        await self._execute(self.core.on_plan_result(req.request_id, result, time.monotonic()))

    async def _peer_loop(self) -> None:
        """Leader: frames from follower sidecars. Part count and size are capped before anything
        is decoded; the sender is the node whose key its connection authenticated with."""
        assert self.core is not None
        while True:
            await asyncio.sleep(0)  # as in _recv: a busy socket must not starve the ticks
            received = await self.peers.recv_multipart(copy=False)
            identity = received[0].bytes
            peer = peer_of(received[-1])
            try:
                check_envelope(received)
                frames = [f.bytes for f in received[1:]]
                if not frames:
                    raise MalformedFrame("empty message")
                header = decode(frames[0])
                await self._on_peer(identity, header, frames[1:], peer)
            except ProtocolError as exc:
                self._reject(f"peer {peer.user_id or identity[:24]!r}", exc)

    def _peer_may_control(self, identity: bytes, peer: PeerKey) -> bool:
        """Control requests over TCP come from authenticated follower sidecars only (on plain
        TCP, opted out: from a follower that has said NODE_HELLO)."""
        if peer.authenticated:
            return True
        return any(f.identity == identity for f in self.nodes.values())

    async def _on_peer(self, identity: bytes, header: Message, rest: list[bytes],
                       peer: PeerKey = PLAIN) -> None:
        assert self.core is not None
        now = time.monotonic()
        if isinstance(header, ControlRequest):
            if not self._peer_may_control(identity, peer):
                raise Unauthenticated(f"control request {header.op!r} from a peer that is no "
                                      "authenticated follower (not answered)")
            via = next((f"node {n}" for n, f in self.nodes.items() if f.identity == identity),
                       peer.user_id or "a TCP peer")
            reply = await self._control(header, via)
            await self.peers.send_multipart([identity, encode(reply)])
            return
        node = getattr(header, "node", None)
        if isinstance(header, (NodeHello, NodeHeartbeat, Relay, WorkerLeft)):
            check_claim(peer, node, header.TYPE)  # a node's key speaks for that node only
        if isinstance(header, (NodeHello, NodeHeartbeat)):
            if not 0 < node < self.config.num_nodes:
                if node >= self.config.num_nodes:  # reported by node_count_mismatch()
                    self._outside_nodes[node] = now
                    if len(self._outside_nodes) > 64:  # a flood of made-up nodes stays small
                        del self._outside_nodes[min(self._outside_nodes,
                                                    key=self._outside_nodes.__getitem__)]
                raise InvalidField(f"node {node} outside [1, {self.config.num_nodes})")
            known = self.nodes.get(node)
            if known is None or known.identity != identity:
                if known is not None:
                    await self._node_lost(node, "its sidecar restarted")
                log.info("node %d: sidecar joined", node)
            self.nodes[node] = _Follower(identity, now)
            self.node_ranks[node] = frozenset(getattr(header, "ranks", ()))
            return
        if node not in self.nodes or self.nodes[node].identity != identity:
            raise InvalidField(f"{header.TYPE} from node {node}, which has not said NODE_HELLO")
        self.nodes[node].seen = now
        if isinstance(header, WorkerLeft):
            if self.rank_node.get(header.rank) == node:
                await self._execute(self.core.on_worker_left(
                    header.rank, f"{header.reason} (node {node})", now))
        elif isinstance(header, Relay):
            if len(rest) != len(header.ranks):
                raise MalformedFrame(f"RELAY names {len(header.ranks)} ranks but carries "
                                     f"{len(rest)} frames")
            for rank, frame in zip(header.ranks, rest):
                try:
                    msg = decode(frame)
                    if getattr(msg, "rank", None) != rank:
                        raise IdentityMismatch(f"relayed frame of rank {getattr(msg, 'rank', None)} "
                                               f"in an envelope for rank {rank}")
                except ProtocolError as exc:
                    self._reject(f"node {node}, rank {rank}", exc)
                    continue
                await self._leader_receive(node, msg, now)
        else:
            raise InvalidField(f"unexpected {header.TYPE} from a follower")

    async def _node_lost(self, node: int, why: str) -> None:
        assert self.core is not None
        self.nodes.pop(node, None)
        ranks = [r for r, n in self.rank_node.items() if n == node]
        log.error("node %d lost (%s); its ranks %s leave the group", node, why, ranks)
        for rank in ranks:
            del self.rank_node[rank]
            await self._execute(self.core.on_worker_left(rank, f"node {node} lost: {why}",
                                                         time.monotonic()))

    # --- follower side --------------------------------------------------------------------------

    async def _send_up(self, parts: list[bytes]) -> None:
        try:
            await self.up.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            if self._link is not None:  # says why once: the link is down, or the leader is slow
                self._link.dropped_frame()
            else:
                log.warning("node %d: leader not keeping up; dropped a frame",
                            self.config.node_rank)

    async def _up_loop(self) -> None:
        """Follower: frames from the leader."""
        while True:
            parts = await self._recv(self.up)
            try:
                header = decode(parts[0])
                self.leader_seen = time.monotonic()
                if isinstance(header, Relay) and len(parts) == 1 + len(header.ranks):
                    for rank, frame in zip(header.ranks, parts[1:]):
                        inner = decode(frame)  # never pass on what a worker would have to drop
                        await self._to_local(rank, frame)
                        if isinstance(inner, Welcome) and not inner.ok:
                            self.registry.unbind(inner.rank)  # refused: not one of our workers
                elif isinstance(header, ControlReply):
                    client = self.pending_control.pop(header.request_id, None)
                    if client is not None:
                        await self.control.send_multipart([client[0], parts[0]])
                elif not isinstance(header, NodeHeartbeat):
                    raise InvalidField(f"unexpected {header.TYPE} from the leader")
            except ProtocolError as exc:
                self._reject("the leader", exc)

    # --- ticks: time-outs, heartbeats, policy ---------------------------------------------------

    async def _tick_loop(self) -> None:
        cfg = self.config
        next_beat = next_refresh = next_balance = next_watchdog = 0.0
        watchdog_every = self.notifier.watchdog_interval_s
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(cfg.tick_s)
            now = time.monotonic()
            if self.core is not None and now - last_tick > cfg.node_timeout_s / 2:
                # This process was paused (SIGSTOP, a stalled host): the followers' queued
                # heartbeats are not read yet, so their silence is ours, not theirs.
                log.warning("node %d: the event loop was paused for %.1fs; follower timeouts "
                            "restart", cfg.node_rank, now - last_tick)
                for follower in self.nodes.values():
                    follower.seen = now
            last_tick = now
            self.health.beat()
            if watchdog_every is not None and now >= next_watchdog:
                next_watchdog = now + watchdog_every
                self.notifier.watchdog()
            # silent ones stay bound (broadcasts reach them); after a pause, none is silent
            for rank, silent in self.registry.tick(now):
                await self._worker_left(rank, f"no heartbeat for {silent:.1f}s "
                                              f"(limit {cfg.worker_timeout_s:g}s)")
            if self.core is not None:
                for node, follower in list(self.nodes.items()):
                    if now - follower.seen > cfg.node_timeout_s:
                        await self._node_lost(node, f"no heartbeat for {now - follower.seen:.1f}s "
                                                    f"(limit {cfg.node_timeout_s:g}s)")
                await self._execute(self.core.on_tick(now))
            for request_id, (client, asked) in list(self.pending_control.items()):
                if now - asked > cfg.control_timeout_s:
                    del self.pending_control[request_id]
                    await self.control.send_multipart([client, encode(ControlReply(
                        request_id=request_id, ok=False, result={},
                        error=f"the leader at {cfg.leader_address} did not answer within "
                              f"{cfg.control_timeout_s:g}s"))])
            if now >= next_beat:
                next_beat = now + cfg.heartbeat_s
                beat = encode(NodeHeartbeat(node=cfg.node_rank, ranks=tuple(sorted(self.local))))
                if self.core is None:
                    await self._send_up([beat])
                else:
                    for follower in list(self.nodes.values()):
                        await self.peers.send_multipart([follower.identity, beat])
            if now >= next_refresh:
                next_refresh = now + cfg.refresh_s
                self._refresh(now, balance=now >= next_balance)
                if now >= next_balance:
                    next_balance = now + cfg.balancedness_every_s

    def _refresh(self, now: float, balance: bool) -> None:
        """Metrics and readiness from the current state (on the loop, so nothing races)."""
        m = self.metrics
        m.workers_connected.set(len(self.local))
        if self.core is not None:
            m.follow_leader(self.core)
            m.followers.set(len(self.nodes))
            if balance and self.http is not None:
                m.leader_balancedness(self.core)
        else:
            m.follow_link(now, self.leader_seen, self.config.node_timeout_s)
        self._report_node_count(now)
        ready, why = self.readiness(now)
        if not self.stopping:
            self.health.set_ready(ready, why, *self.group_readiness(now))
            m.ready.set(1 if ready else 0)

    def node_count_mismatch(self, now: float) -> str:
        """Why the nodes seen contradict --num-nodes (e.g. a StatefulSet's replicas differ from
        the ConfigMap's num-nodes); empty when they do not. A follower knows when its own rank
        is outside --num-nodes; the leader, when a node outside it says hello (within the last
        3 x --node-timeout), or when every rank of the group joined through fewer nodes."""
        cfg = self.config
        if cfg.node_rank >= cfg.num_nodes:
            return (f"this node's rank {cfg.node_rank} is outside --num-nodes {cfg.num_nodes}: "
                    "more nodes run than --num-nodes says (StatefulSet replicas > num-nodes?)")
        if self.core is None:
            return ""
        outside = sorted(n for n, t in self._outside_nodes.items()
                         if now - t <= 3 * cfg.node_timeout_s)
        if outside:
            return (f"node(s) {outside} say hello but --num-nodes is {cfg.num_nodes}: more nodes "
                    "run than --num-nodes says (StatefulSet replicas > num-nodes?)")
        through = {self.rank_node.get(rank, 0) for rank in self.core.workers}
        if self.core.group_complete and len(through) < cfg.num_nodes:
            return (f"all {self.core.world_size} ranks of the group joined through "
                    f"{len(through)} node(s) {sorted(through)} but --num-nodes is "
                    f"{cfg.num_nodes} (StatefulSet replicas < num-nodes?)")
        return ""

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
        return True, f"ready: {len(self.local)} local worker(s) {sorted(self.local)}"

    def group_readiness(self, now: float) -> tuple[bool, str]:
        """``/readyz?leader=1``, on top of :meth:`readiness`: a follower heard the leader within
        --node-timeout; the leader's instance is not unsafe. Returns (ready, why)."""
        cfg = self.config
        if self.core is None:
            if not self.leader_seen:
                hint = (" (CURVE: does the leader have this node's public key, and this node the "
                        "leader's?)" if cfg.curve_keys else "")
                if self._link is not None and self._link.cause:
                    hint = f": {self._link.cause_text}{hint}"  # the monitor knows why
                return False, f"leader {cfg.leader_address} not heard from yet{hint}"
            if now - self.leader_seen > cfg.node_timeout_s:
                return False, (f"leader {cfg.leader_address} silent for "
                               f"{now - self.leader_seen:.1f}s (limit {cfg.node_timeout_s:g}s)")
        elif self.core.unsafe_reason:
            return False, f"unsafe: {self.core.unsafe_reason}"
        return True, f"ready: {len(self.local)} local worker(s) {sorted(self.local)}"

    # --- control --------------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            parts = await self._recv(self.control)
            identity, frames = parts[0], parts[1:]
            try:
                if len(frames) != 1:
                    raise MalformedFrame(f"expected 1 frame, got {len(frames)}")
                msg = decode(frames[0])
                if not isinstance(msg, ControlRequest):
                    raise InvalidField(f"expected CONTROL, got {msg.TYPE}")
            except ProtocolError as exc:
                self._reject("a control client", exc)
                await self.control.send_multipart([identity, encode(ControlReply(
                    request_id="", ok=False, result={}, error=f"bad request: {exc}"))])
                continue
            if self.core is None:
                if msg.op == "status" and msg.args.get("local"):
                    await self.control.send_multipart([identity, encode(ControlReply(
                        request_id=msg.request_id, ok=True, result=self.local_status(), error=""))])
                    continue
                self.pending_control[msg.request_id] = (identity, time.monotonic())
                await self._send_up([frames[0]])
            else:
                reply = await self._control(msg)
                await self.control.send_multipart([identity, encode(reply)])

    async def _control(self, msg: ControlRequest, via: str = "node 0") -> ControlReply:
        assert self.core is not None
        if msg.op == "status":
            result = self.core.status()
            result["leader"] = self.local_status()
            result["nodes"] = {str(n): round(time.monotonic() - follower.seen, 3)
                               for n, follower in self.nodes.items()}
            return ControlReply(request_id=msg.request_id, ok=True, result=result, error="")
        by = str(msg.args.get("by") or "a control client")[:200].encode("ascii", "replace")
        accepted, text = self.core.request_rebalance(bool(msg.args.get("force", False)),
                                                     f"{by.decode()} via {via}")
        return ControlReply(request_id=msg.request_id, ok=accepted,
                            result={"message": text, "request": self.core.next_request,
                                    "incarnation": self.incarnation},
                            error="" if accepted else text)

    def local_status(self) -> dict[str, Any]:
        """This sidecar's own view (no leader state)."""
        return {
            "node": self.config.node_rank, "num_nodes": self.config.num_nodes,
            "role": "leader" if self.config.is_leader else "follower",
            "leader_address": self.config.leader_address,
            "incarnation": self.incarnation, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "local_workers": sorted(self.local),
            "frames_rejected": dict(self.rejected),
            "http": (f"{self.http_address[0]}:{self.http_address[1]}"
                     if self.http_address else None),
            "ready": self.readiness(time.monotonic())[0],
            "leader_reachable": (None if self.core is not None
                                 else self.group_readiness(time.monotonic())[0]),
            "node_count_mismatch": self.node_count_mismatch(time.monotonic()) or None,
            "leader_last_seen_s": (round(time.monotonic() - self.leader_seen, 3)
                                   if self.leader_seen else None),
            "peer_link": self._peer_link_status(),
        }

    def _peer_link_status(self) -> dict[str, Any]:
        """The TCP link's security, and (with CURVE) its handshakes as the monitor saw them."""
        return {"security": self._peer_link, **(self._link.status() if self._link else {})}


@dataclass
class _Follower:
    """Leader side: a follower sidecar's socket identity and when it was last heard from."""

    identity: bytes
    seen: float


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
