"""What the sans-IO cores return for their drivers to carry out, in order.

Leader (:class:`~eplb.coordinator.leader.LeaderCore`): :class:`Persist` (on disk before anything
after it leaves), :class:`Broadcast`, :class:`SendTo`, :class:`ComputePlan`, :class:`Reject`.
Local workers (:class:`~eplb.coordinator.worker_registry.LocalAdmission`, both roles):
:class:`ToLocal`, :class:`LocalLeft`, :class:`Admitted`, :class:`Reject`. Follower
(:class:`~eplb.coordinator.follower.FollowerCore`): :class:`Up`, :class:`ToLocal`,
:class:`ToControl`, :class:`Reject`. A driver maps them to sockets and nothing else: a node to
its socket identity, a rank to its connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eplb.coordinator.decision_log import LogRecord
from eplb.placement.planner import PlannerSpec
from eplb.proto import Message, ProtocolError


@dataclass(frozen=True)
class Broadcast:
    """Send ``msg`` to every worker."""

    msg: Message


@dataclass(frozen=True)
class ComputePlan:
    """Run :func:`eplb.placement.planner.plan_rebalance` off the event loop, then call
    :meth:`LeaderCore.on_plan_result` with ``request_id``. ``load: [L, E]``, ``current: [L, P]``."""

    request_id: int
    load: torch.Tensor
    current: torch.Tensor
    num_gpus: int
    min_gain: float
    force: bool
    spec: PlannerSpec


@dataclass(frozen=True)
class SendTo:
    """Send ``msg`` to worker ``rank`` only, through ``node`` (0: the leader's own sidecar;
    None: the node ``rank`` joined through, :meth:`NodeMembership.node_of`)."""

    rank: int
    msg: Message
    node: int | None = None


@dataclass(frozen=True)
class Reject:
    """A frame was dropped (invariant I4): count and log ``error``; ``where`` it came from."""

    where: str
    error: ProtocolError


@dataclass(frozen=True)
class Persist:
    """Write ``record`` to the decision log durably before carrying out any later output."""

    record: LogRecord


Output = Broadcast | SendTo | ComputePlan | Persist | Reject


@dataclass(frozen=True)
class ToLocal:
    """Send ``frame`` (``msg`` encoded) to this sidecar's connection ``identity``, or, with
    ``identity`` None, to the connection bound to ``rank`` (every bound one for
    :data:`eplb.proto.envelope.BROADCAST`)."""

    rank: int
    frame: bytes
    msg: Message
    identity: bytes | None = None


@dataclass(frozen=True)
class LocalLeft:
    """Local worker ``rank`` left (BYE, silence, or its process gone): tell the group."""

    rank: int
    why: str


@dataclass(frozen=True)
class Admitted:
    """A local worker's frame passed admission: the role takes it from here (the leader's core
    reads it, a follower relays ``frame``)."""

    rank: int
    msg: Message
    frame: bytes


@dataclass(frozen=True)
class Up:
    """Follower: send ``parts`` to the leader (one ZeroMQ message)."""

    parts: list[bytes]


@dataclass(frozen=True)
class ToControl:
    """Send ``frame`` to the control client ``identity``."""

    identity: bytes
    frame: bytes
