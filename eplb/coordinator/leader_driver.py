"""The leader's driver: the sockets and the executor around
:class:`~eplb.coordinator.leader.LeaderCore`, and nothing that decides.

It binds the TCP ROUTER the followers connect to (CURVE server when keys are configured: the
ZAP handler admits the followers' keys), hands every frame to the core (local workers' frames
after :class:`~eplb.coordinator.worker_registry.LocalAdmission`, follower messages after the
envelope checks of :mod:`eplb.proto.envelope` and the key check of
:func:`~eplb.coordinator.peer_auth.check_claim`) and carries out the core's outputs in order: a
:class:`Persist` is on disk before anything after it leaves; a node is mapped to its current
socket identity (:meth:`~eplb.coordinator.membership.NodeMembership.identity_of`). Plans run in
an executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import time
from typing import Any

import zmq
import zmq.asyncio

from eplb.coordinator.decision_log import DecisionLog, DecisionLogError
from eplb.coordinator.leader import LeaderCore
from eplb.coordinator.membership import NodeMembership
from eplb.coordinator.outputs import (Admitted, Broadcast, ComputePlan, Output, Persist, Reject,
                                      SendTo)
from eplb.coordinator.peer_auth import PEER_RCVHWM, NodeAuthenticator, check_claim, peer_of
from eplb.placement.planner import plan_rebalance
from eplb.coordinator.sidecar import (Sidecar, SidecarConfig, _warm_up, decision_log_path,
                                      set_planner_threads)
from eplb.curve import CurveKeys
from eplb.proto import (Abort, ControlRequest, NodeHeartbeat, ProtocolError, Unauthenticated,
                        encode)
from eplb.proto.envelope import (BROADCAST, PEER_MAXMSGSIZE, check_peer_envelope, open_peer,
                                 relay)

log = logging.getLogger("eplb.sidecar")


class LeaderSidecar(Sidecar):
    """Node 0's sidecar."""

    role = "leader"
    link_peer = "a TCP peer"

    def __init__(self, config: SidecarConfig) -> None:
        super().__init__(config)
        self.core = LeaderCore(config.leader,
                               NodeMembership(config.num_nodes, config.node_timeout_s))
        self._auth: NodeAuthenticator | None = None

    # --- setup and stop ---------------------------------------------------------------------------

    def _role_prepare(self) -> None:
        try:
            self.decisions = DecisionLog(decision_log_path(self.config.run_dir))
        except DecisionLogError as exc:
            raise SystemExit(f"eplb-sidecar: {exc}") from None

    def _role_bind(self, keys: CurveKeys | None) -> None:
        cfg = self.config
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
            return
        try:
            self.peers.bind(address)
        except zmq.ZMQError as exc:
            raise SystemExit(f"eplb-sidecar: cannot bind the leader address {address}: "
                             f"{exc}. Is another sidecar running, or is the port "
                             "taken?") from None

    def _serve_curve(self, sock: zmq.asyncio.Socket, keys: CurveKeys) -> None:
        """CURVE server; a ZAP handler admits only the followers' known public keys and names
        each connection after its key (``node-K``, the frames' User-Id). A refused handshake is
        counted and logged like a bad frame (invariant I4)."""
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

    async def _role_start(self) -> list[Any]:
        self._start_executor()
        assert self.decisions is not None
        await self._execute(self.core.restore(self.decisions.records, time.monotonic()))
        return [self._peer_loop()]

    async def _role_stop(self) -> None:
        """The core ends the epoch in flight (ABORT before COMMIT, the COMMIT repeated after)."""
        outputs = self.core.shutdown(time.monotonic())
        for out in outputs:
            if isinstance(out, Broadcast) and isinstance(out.msg, Abort):
                self.metrics.epochs_aborted.labels(out.msg.code.metric_label).inc()
        await self._execute(outputs)

    def _close_role(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.decisions is not None:
            self.decisions.close()
        if self._auth is not None:
            self._auth.stop()

    # --- frames in --------------------------------------------------------------------------------

    async def _role_admitted(self, admitted: Admitted, now: float) -> None:
        await self._execute(self.core.on_worker(0, admitted.msg, now, self.local))

    async def _role_local_left(self, rank: int, why: str, now: float) -> None:
        await self._execute(self.core.on_worker_left(rank, f"{why} (node 0)", now))

    async def _peer_loop(self) -> None:
        """Frames from follower sidecars. Part count and size are capped before anything is
        decoded; the sender is the node whose key its connection authenticated with."""
        while True:
            await asyncio.sleep(0)  # as in _recv: a busy socket must not starve the ticks
            received = await self.peers.recv_multipart(copy=False)
            identity = received[0].bytes
            peer = peer_of(received[-1])
            try:
                check_peer_envelope(received)
                header, frames = open_peer([f.bytes for f in received[1:]])
                now = time.monotonic()
                if isinstance(header, ControlRequest):
                    reply = self.core.on_peer_control(identity, peer.user_id, header,
                                                      self.local_status(), self.incarnation, now)
                    await self.peers.send_multipart([identity, encode(reply)])
                    continue
                check_claim(peer, getattr(header, "node", None), header.TYPE)
                outputs = self.core.on_peer(identity, header, frames, now, self.local)
            except ProtocolError as exc:
                self._reject(f"peer {peer.user_id or identity[:24]!r}", exc)
                continue
            await self._execute(outputs)

    async def _role_control(self, identity: bytes, msg: ControlRequest, frame: bytes) -> None:
        reply = self.core.on_control(msg, "node 0", self.local_status(), self.incarnation,
                                     time.monotonic())
        await self.control.send_multipart([identity, encode(reply)])

    # --- time -------------------------------------------------------------------------------------

    async def _role_tick(self, now: float) -> None:
        await self._execute(self.core.on_tick(now))

    async def _role_heartbeat(self) -> None:
        beat = encode(NodeHeartbeat(node=self.config.node_rank, ranks=tuple(sorted(self.local))))
        for identity in self.core.members.identities():
            await self.peers.send_multipart([identity, beat])

    def _role_refresh(self, now: float, balance: bool) -> None:
        self.metrics.follow_leader(self.core)
        self.metrics.followers.set(len(self.core.members.nodes))
        if balance and self.http is not None:
            self.metrics.leader_balancedness(self.core)

    def _role_node_count_problem(self, now: float) -> str:
        return self.core.node_count_mismatch(now)

    def group_readiness(self, now: float) -> tuple[bool, str]:
        """``/readyz?leader=1``: the instance is not unsafe. Returns (ready, why)."""
        if self.core.unsafe_reason:
            return False, f"unsafe: {self.core.unsafe_reason}"
        return True, self._ready_text()

    # --- frames out -------------------------------------------------------------------------------

    async def _execute(self, outputs: list[Output]) -> None:
        """Carry out the core's outputs in order; a :class:`Persist` is on disk before anything
        after it leaves."""
        for out in outputs:
            if isinstance(out, Persist):
                assert self.decisions is not None
                self.decisions.append(out.record)
            elif isinstance(out, SendTo):
                node = out.node if out.node is not None else self.core.members.node_of(out.rank)
                if node is not None:
                    await self._to_worker(node, out.rank, out.msg)
            elif isinstance(out, Broadcast):
                frame = encode(out.msg)
                await self._to_local(BROADCAST, frame, out.msg)
                parts = relay(0, [BROADCAST], [frame])
                for identity in self.core.members.identities():
                    await self.peers.send_multipart([identity, *parts])
            elif isinstance(out, ComputePlan):
                task = asyncio.ensure_future(self._plan(out))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(out, Reject):
                self._reject(out.where, out.error)

    async def _to_worker(self, node: int, rank: int, msg: Any) -> None:
        frame = encode(msg)
        if node == 0:
            await self._to_local(rank, frame, msg)
            return
        identity = self.core.members.identity_of(node)
        if identity is not None:
            await self.peers.send_multipart([identity, *relay(0, [rank], [frame])])

    # --- the planner's executor -------------------------------------------------------------------

    def _start_executor(self) -> None:
        """Start the planner's executor now, so the first plan does not pay for it."""
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
        assert self._executor is not None
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
