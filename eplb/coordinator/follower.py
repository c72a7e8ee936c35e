"""A follower sidecar's logic with no I/O: its link to the leader and what crosses it.

The follower driver (:mod:`eplb.coordinator.follower_driver`) feeds it the leader's messages,
the local frames its :class:`~eplb.coordinator.worker_registry.LocalAdmission` admitted, control
requests and ticks, and carries out what it returns (:mod:`eplb.coordinator.outputs`):
:class:`Up` to the leader, :class:`ToLocal` to workers, :class:`ToControl` to ``eplbctl``.

- NODE_HELLO goes first, before anything is relayed, and again whenever the leader is heard
  after a silence longer than the node time-out (a restarted leader never read the first one).
  The leader also takes a new incarnation's first RELAY as its hello
  (:mod:`eplb.coordinator.membership`), so no frame waits for this.
- Local frames that passed admission go through the node's
  :class:`~eplb.coordinator.aggregate.NodeAggregator` (unless ``aggregator`` is None: the
  per-worker path): counts are summed into one NODE_COUNTS a flush round, the agreement answers
  (PLAN_ACK, PROMISE/REFUSE, DONE) of the node's ranks go up as one NODE_ACKS / NODE_PROMISES /
  NODE_DONE; what it does not hold is relayed as it came, in one ``[RELAY, frames...]`` per run
  of such frames in a burst (order kept). The leader's PLAN, COMMIT and ABORT on their way down
  open and end what it holds; a WELCOME adds the rank to those it waits for, a REJOIN or the
  rank leaving takes it out. Ticks send up what waited its bound.
- From the leader: relayed worker frames are decoded (a worker must never have to drop what
  its sidecar passed on) and handed to the local connections; a CONTROL_REPLY goes to the
  ``eplbctl`` that asked; heartbeats only say the leader is alive.
- Control requests are answered locally (``status`` with ``local``) or forwarded, and answered
  with an error when the leader does not reply within ``control_timeout_s``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from eplb.coordinator.aggregate import NodeAggregator, PassThrough
from eplb.coordinator.aggregate import Up as AggregatorUp
from eplb.coordinator.outputs import Admitted, Reject, ToControl, ToLocal, Up
from eplb.proto import (Abort, Commit, ControlReply, ControlRequest, InvalidField, Message,
                        NodeHeartbeat, NodeHello, Plan, ProtocolError, Rejoin, Relay, Welcome,
                        WorkerLeft, decode, encode)
from eplb.proto.envelope import relay

log = logging.getLogger("eplb.sidecar")

FollowerOutput = Up | ToLocal | ToControl | Reject


class FollowerCore:
    """Everything a follower sidecar decides about its link to the leader.

    Args:
        node: this node's rank (>= 1). leader_address: for messages. incarnation: this
        process's (NODE_HELLO carries it). node_timeout_s: the leader is silent past this.
        control_timeout_s: a forwarded control request not answered within this gets an error.
        pid: this process's id (NODE_HELLO carries it). aggregator: answers for the node's
        workers (None: every worker frame is relayed as it came).
    """

    def __init__(self, node: int, leader_address: str, incarnation: str,
                 node_timeout_s: float = 3.0, control_timeout_s: float = 5.0,
                 pid: int | None = None, aggregator: NodeAggregator | None = None) -> None:
        self.node = node
        self.leader_address = leader_address
        self.incarnation = incarnation
        self.node_timeout_s = node_timeout_s
        self.control_timeout_s = control_timeout_s
        self.pid = os.getpid() if pid is None else pid
        self.leader_seen = 0.0  # monotonic time the leader was last heard; 0: never
        self.pending_control: dict[str, tuple[bytes, float]] = {}  # request id -> (client, asked)
        self.hellos_sent = 0
        self.aggregator = aggregator

    # --- to the leader --------------------------------------------------------------------------

    def start(self) -> list[FollowerOutput]:
        """The first message on the link: NODE_HELLO."""
        return [self._hello()]

    def relay(self, admitted: list[Admitted], now: float) -> list[FollowerOutput]:
        """Local frames that passed admission (one burst): through the aggregator, and what it
        does not hold relayed as it came, each run of such frames in one envelope."""
        if not admitted:
            return []
        if self.aggregator is None:
            return [self._relay(admitted)]
        out: list[FollowerOutput] = []
        run: list[Admitted] = []
        for a in admitted:
            for up in self.aggregator.on_worker(a.msg, now):
                if isinstance(up, PassThrough):
                    run.append(a if up.msg is a.msg else Admitted(a.rank, up.msg, encode(up.msg)))
                else:
                    if run:
                        out.append(self._relay(run))
                        run = []
                    out.append(Up([encode(up.msg)]))
        if run:
            out.append(self._relay(run))
        return out

    def _relay(self, admitted: list[Admitted]) -> Up:
        return Up(relay(self.node, [a.rank for a in admitted], [a.frame for a in admitted]))

    def worker_left(self, rank: int, why: str, now: float) -> list[FollowerOutput]:
        """Local worker ``rank`` left: what waited only for it goes up, then WORKER_LEFT."""
        out = self._aggregated(self.aggregator.on_left(rank, now)) if self.aggregator else []
        return out + [Up([encode(WorkerLeft(node=self.node, rank=rank, reason=why))])]

    def _aggregated(self, ups: list[AggregatorUp]) -> list[FollowerOutput]:
        """The aggregator's outputs outside a burst: a held frame passed through is relayed
        alone (re-encoded: the aggregator keeps messages, not frames)."""
        return [Up(relay(self.node, [up.msg.rank], [encode(up.msg)]))  # type: ignore[attr-defined]
                if isinstance(up, PassThrough) else Up([encode(up.msg)]) for up in ups]

    def heartbeat(self, ranks: list[int]) -> list[FollowerOutput]:
        """The node's heartbeat: ``ranks`` bound here and, when aggregating, the latest step of
        each welcomed rank (whose own heartbeats stopped here)."""
        progress = self.aggregator.progress() if self.aggregator is not None else ()
        return [Up([encode(NodeHeartbeat(node=self.node, ranks=tuple(sorted(ranks)),
                                         progress=progress))])]

    def _hello(self) -> Up:
        self.hellos_sent += 1
        return Up([encode(NodeHello(node=self.node, pid=self.pid, incarnation=self.incarnation))])

    # --- from the leader ------------------------------------------------------------------------

    def on_leader(self, header: Message, header_frame: bytes, frames: list[tuple[int, bytes]],
                  now: float) -> list[FollowerOutput]:
        """One message from the leader: ``header`` (``header_frame`` as it came) and, for a
        RELAY, its ``(rank, frame)`` pairs (:func:`eplb.proto.envelope.open_peer`).

        Raises:
            InvalidField: a message the leader never sends.
        """
        out: list[FollowerOutput] = []
        if self.leader_seen and now - self.leader_seen > self.node_timeout_s:
            log.info("node %d: the leader is heard again after %.1fs; saying NODE_HELLO again",
                     self.node, now - self.leader_seen)
            out.append(self._hello())
        self.leader_seen = now
        if isinstance(header, Relay):
            for rank, frame in frames:
                try:
                    msg = decode(frame)  # never pass on what a worker would have to drop
                except ProtocolError as exc:
                    out.append(Reject(f"the leader, for rank {rank}", exc))
                    continue
                out.append(ToLocal(rank, frame, msg))
                if self.aggregator is not None:
                    out += self._aggregated(self._passing_down(msg, now))
        elif isinstance(header, ControlReply):
            client = self.pending_control.pop(header.request_id, None)
            if client is not None:
                out.append(ToControl(client[0], header_frame))
        elif not isinstance(header, NodeHeartbeat):
            raise InvalidField(f"unexpected {header.TYPE} from the leader")
        return out

    def _passing_down(self, msg: Message, now: float) -> list[AggregatorUp]:
        """A leader message on its way to local worker(s): what it tells the aggregator."""
        assert self.aggregator is not None
        if isinstance(msg, (Plan, Commit, Abort)):
            return self.aggregator.on_leader(msg, now)
        if isinstance(msg, Welcome) and msg.ok:
            self.aggregator.on_joined(msg.rank)
        elif isinstance(msg, Rejoin):
            return self.aggregator.on_left(msg.rank, now)
        return []

    # --- control and time -----------------------------------------------------------------------

    def on_control(self, identity: bytes, msg: ControlRequest, frame: bytes, now: float,
                   local_status: Callable[[], dict[str, Any]]) -> list[FollowerOutput]:
        """A control request: ``status`` with ``local`` is answered here (``local_status``),
        anything else is forwarded to the leader and awaited."""
        if msg.op == "status" and msg.args.get("local"):
            reply = ControlReply(request_id=msg.request_id, ok=True, result=local_status(),
                                 error="")
            return [ToControl(identity, encode(reply))]
        self.pending_control[msg.request_id] = (identity, now)
        return [Up([frame])]

    def on_tick(self, now: float) -> list[FollowerOutput]:
        """What the aggregator held past its bound goes up; forwarded control requests past
        their time-out get an error reply."""
        out: list[FollowerOutput] = (self._aggregated(self.aggregator.on_tick(now))
                                     if self.aggregator is not None else [])
        for request_id, (client, asked) in list(self.pending_control.items()):
            if now - asked > self.control_timeout_s:
                del self.pending_control[request_id]
                out.append(ToControl(client, encode(ControlReply(
                    request_id=request_id, ok=False, result={},
                    error=f"the leader at {self.leader_address} did not answer within "
                          f"{self.control_timeout_s:g}s"))))
        return out

    def link_readiness(self, now: float, link_cause: str = "",
                       curve: bool = False) -> tuple[bool, str]:
        """Whether the leader was heard within the node time-out, and why not. ``link_cause``:
        what the link monitor knows about a link that does not come up; ``curve``: keys are in
        use (the hint then names them)."""
        if not self.leader_seen:
            hint = (" (CURVE: does the leader have this node's public key, and this node the "
                    "leader's?)" if curve else "")
            if link_cause:
                hint = f": {link_cause}{hint}"
            return False, f"leader {self.leader_address} not heard from yet{hint}"
        if now - self.leader_seen > self.node_timeout_s:
            return False, (f"leader {self.leader_address} silent for "
                           f"{now - self.leader_seen:.1f}s (limit {self.node_timeout_s:g}s)")
        return True, ""
