"""A follower's driver: the DEALER to the leader around
:class:`~eplb.coordinator.follower.FollowerCore`, and nothing that decides.

It connects to the leader (CURVE client when keys are configured; a socket monitor explains a
link that does not come up), and carries out the core's outputs: :class:`Up` to the leader
(never blocking: a frame the link cannot take now is dropped and the monitor says why),
:class:`ToLocal` to the workers, :class:`ToControl` to ``eplbctl``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from eplb.coordinator.aggregate import NodeAggregator
from eplb.coordinator.follower import FollowerCore, FollowerOutput
from eplb.coordinator.outputs import Admitted, Reject, ToControl, ToLocal, Up
from eplb.proto.envelope import PEER_MAXMSGSIZE
from eplb.coordinator.sidecar import Sidecar, SidecarConfig
from eplb.curve import CurveKeys, node_name
from eplb.proto import ControlRequest, ProtocolError
from eplb.proto.envelope import node_identity, open_peer

log = logging.getLogger("eplb.sidecar")


class FollowerSidecar(Sidecar):
    """The sidecar of a node other than 0."""

    role = "follower"
    link_peer = "the leader"

    def __init__(self, config: SidecarConfig) -> None:
        super().__init__(config)
        aggregator = None if config.per_worker_relay else NodeAggregator(config.node_rank)
        self.follower = FollowerCore(config.node_rank, config.leader_address, self.incarnation,
                                     config.node_timeout_s, config.control_timeout_s,
                                     aggregator=aggregator)
        self._burst: list[Admitted] = []

    @property
    def leader_seen(self) -> float:
        return self.follower.leader_seen

    def _role_bind(self, keys: CurveKeys | None) -> None:
        cfg = self.config
        self.up = self.ctx.socket(zmq.DEALER)
        self.up.setsockopt(zmq.IDENTITY, node_identity(cfg.node_rank, self.incarnation))
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

    async def _role_start(self) -> list[Any]:
        await self._carry(self.follower.start())  # NODE_HELLO before anything is relayed
        return [self._up_loop()]

    async def _carry(self, outputs: list[FollowerOutput]) -> None:
        for out in outputs:
            if isinstance(out, Up):
                await self._send_up(out.parts)
            elif isinstance(out, ToLocal):
                await self._to_local(out.rank, out.frame, out.msg, out.identity)
            elif isinstance(out, ToControl):
                await self.control.send_multipart([out.identity, out.frame])
            elif isinstance(out, Reject):
                self._reject(out.where, out.error)

    async def _send_up(self, parts: list[bytes]) -> None:
        try:
            await self.up.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            if self._link is not None:  # says why once: the link is down, or the leader is slow
                self._link.dropped_frame()
            else:
                log.warning("node %d: leader not keeping up; dropped a frame",
                            self.config.node_rank)

    # --- frames in --------------------------------------------------------------------------------

    async def _role_admitted(self, admitted: Admitted, now: float) -> None:
        self._burst.append(admitted)

    async def _role_burst_end(self) -> None:
        burst, self._burst = self._burst, []
        await self._carry(self.follower.relay(burst, time.monotonic()))

    async def _role_local_left(self, rank: int, why: str, now: float) -> None:
        await self._carry(self.follower.worker_left(rank, why, now))

    async def _up_loop(self) -> None:
        """Frames from the leader."""
        while True:
            parts = await self._recv(self.up)
            try:
                header, frames = open_peer(parts)
                outputs = self.follower.on_leader(header, parts[0], frames, time.monotonic())
            except ProtocolError as exc:
                self._reject("the leader", exc)
                continue
            await self._carry(outputs)

    async def _role_control(self, identity: bytes, msg: ControlRequest, frame: bytes) -> None:
        await self._carry(self.follower.on_control(identity, msg, frame, time.monotonic(),
                                                   self.local_status))

    # --- time -------------------------------------------------------------------------------------

    async def _role_tick(self, now: float) -> None:
        await self._carry(self.follower.on_tick(now))

    async def _role_heartbeat(self) -> None:
        await self._carry(self.follower.heartbeat(list(self.local)))

    def _role_refresh(self, now: float, balance: bool) -> None:
        self.metrics.follow_link(now, self.follower.leader_seen, self.config.node_timeout_s)

    def group_readiness(self, now: float) -> tuple[bool, str]:
        """``/readyz?leader=1``: the leader was heard within --node-timeout. Returns
        (ready, why)."""
        cause = self._link.cause_text if self._link is not None and self._link.cause else ""
        ok, why = self.follower.link_readiness(now, cause, bool(self.config.curve_keys))
        return (True, self._ready_text()) if ok else (False, why)

    def _role_status(self, now: float) -> dict[str, Any]:
        seen = self.follower.leader_seen
        aggregator = self.follower.aggregator
        return {"leader_reachable": self.group_readiness(now)[0],
                "leader_last_seen_s": round(now - seen, 3) if seen else None,
                "relay": "per worker" if aggregator is None else "per node",
                "held_for_the_node": aggregator.held if aggregator is not None else 0}
