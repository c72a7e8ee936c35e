"""Every call the simulator makes into the real cores, in one module.

The leader side is :class:`~eplb.coordinator.leader.LeaderCore` (with its
:class:`~eplb.coordinator.agreement.EpochAgreement` and
:class:`~eplb.coordinator.membership.NodeMembership`), each follower sidecar one
:class:`~eplb.coordinator.follower.FollowerCore` (with its
:class:`~eplb.coordinator.aggregate.NodeAggregator` on the per-node path, none on the per-worker
path), the worker side one :class:`~eplb.worker_hook.agreement.WorkerAgreement` per rank.
Between follower and leader only real envelopes cross (``list[bytes]``, built and opened by
:mod:`eplb.proto.envelope` as the drivers do); the simulator carries them and reads only their
size. The simulator sees the cores only through :class:`LeaderPort`, :class:`FollowerPort`,
:class:`RankPort` and the few functions below, in its own small vocabulary (:class:`Kind`,
:class:`ToAll`, :class:`ToRank`, :class:`ToLeader`, :class:`ToWorkers`, :class:`NeedPlan`,
:class:`Step`), so that when the cores' APIs change this is the one file to port.

Worker messages cross this boundary as the cores' own message objects; the simulator never
looks inside them except through :func:`kind_of`, :func:`epoch_of` and :func:`switch_step_of`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

from eplb.coordinator.aggregate import NodeAggregator
from eplb.coordinator.agreement import AgreementTimeouts, Phase
from eplb.coordinator.follower import FollowerCore
from eplb.coordinator.leader import LeaderConfig, LeaderCore
from eplb.coordinator.membership import NodeMembership
from eplb.coordinator.sidecar import MAX_BURST
from eplb.coordinator.outputs import (Admitted, Broadcast, ComputePlan, Persist, Reject, SendTo,
                                      ToLocal, Up)
from eplb.placement.planner import PlannerSpec, PlanResult, plan_rebalance
from eplb.placement.rules import default_placement
from eplb.proto import (Counts, Heartbeat, Hello, Message, NodeHeartbeat, ProtocolError,
                        decode, encode)
from eplb.proto.envelope import BROADCAST, node_identity, open_peer, relay
from eplb.proto.reasons import AbortCode
from eplb.worker_hook.agreement import (CopyChunk, Hold, LandChunk, Prefetch, WorkerAgreement,
                                        WorkerState)


class Kind(enum.Enum):
    """What a message is, as the simulator needs to know it (routing and bookkeeping)."""

    HELLO = "HELLO"
    HEARTBEAT = "HEARTBEAT"
    COUNTS = "COUNTS"
    OUTCOME_QUERY = "OUTCOME_QUERY"
    PLAN_ACK = "PLAN_ACK"
    PROMISE = "PROMISE"
    REFUSE = "REFUSE"
    DONE = "DONE"
    PLAN = "PLAN"
    PREPARE = "PREPARE"
    COMMIT = "COMMIT"
    ABORT = "ABORT"
    NODE_HEARTBEAT = "NODE_HEARTBEAT"
    WELCOME = "WELCOME"
    REJOIN = "REJOIN"
    OTHER = "OTHER"


_KINDS = {k.value: k for k in Kind}


def kind_of(msg: Message) -> Kind:
    return _KINDS.get(msg.TYPE, Kind.OTHER)


def epoch_of(msg: Message) -> int | None:
    return getattr(msg, "epoch", None)


def switch_step_of(msg: Message) -> int:
    """S of a PREPARE or COMMIT."""
    return int(msg.step)


def encode_frame(msg: Message) -> bytes:
    """``msg`` as a worker's hook puts it on its socket."""
    return encode(msg)


def decode_seconds(msg: Message, repeats: int = 20) -> float:
    """Median CPU seconds the real :func:`eplb.proto.decode` takes on ``msg``'s frame (what the
    leader pays per frame before the core sees it)."""
    import time
    frame = encode(msg)
    samples = []
    for _ in range(repeats):
        t0 = time.thread_time()
        decode(frame)
        samples.append(time.thread_time() - t0)
    samples.sort()
    return samples[len(samples) // 2]


class AbortCause(enum.Enum):
    """Why an epoch aborted, as the report counts it: the leader's :class:`AbortCode`, with a
    refusal and a timeout split one level finer (see :func:`abort_cause`)."""

    REFUSED_LATE = "refused: a rank was already at or past S"
    REFUSED_OTHER = "refused (other)"
    NO_PLAN_ACK = "timeout: no PLAN_ACK"
    NO_PROMISE = "timeout: no PROMISE"
    NODE_LOST = "a node was lost (the leader heard nothing from it)"
    WORKER_LEFT = "a rank left"
    OTHER = "other"


def abort_cause(code: AbortCode | None, reason: str) -> AbortCause:
    """The cause of an abort from the leader's code. The code does not say which refusal or
    which timeout it was; for those two only, the reason's text does."""
    if code is AbortCode.REFUSED:
        return AbortCause.REFUSED_LATE if "already at step" in reason else AbortCause.REFUSED_OTHER
    if code is AbortCode.TIMEOUT:
        return AbortCause.NO_PLAN_ACK if "no PLAN_ACK" in reason else AbortCause.NO_PROMISE
    if code is AbortCode.NODE_LOST:
        return AbortCause.NODE_LOST
    if code is AbortCode.WORKER_LEFT:
        return AbortCause.WORKER_LEFT
    return AbortCause.OTHER


# --- leader ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToAll:
    """Broadcast ``msg`` to every worker: the leader's own, and every follower it knows
    (:meth:`LeaderPort.followers`) as one ``[RELAY to BROADCAST, frame]``."""

    msg: Message


@dataclass(frozen=True)
class ToRank:
    """``msg`` to ``rank`` only, through ``node`` (None: the leader knows no node for it, the
    driver drops it)."""

    rank: int
    msg: Message
    node: int | None


@dataclass(frozen=True)
class NeedPlan:
    """The leader asks for a plan; answer with :meth:`LeaderPort.plan_result`.
    ``current: [L, P]`` the placement it plans from."""

    request_id: int
    current: torch.Tensor


@dataclass(frozen=True)
class Durable:
    """A record the leader writes (fsync) before anything after it is sent."""


@dataclass(frozen=True)
class Dropped:
    """A core refused a frame (invariant I4); the simulator records it as a failure."""

    where: str
    error: str


LeaderOut = ToAll | ToRank | NeedPlan | Durable | Dropped


@dataclass(frozen=True)
class EpochView:
    """One line of the leader's history, as the simulator reports it."""

    epoch: int | None
    outcome: str  # committed | aborted | failed | skipped | plan_error
    cause: AbortCause | None
    reason: str
    switch_step: int | None
    margin: int | None
    agreement_ms: float | None  # PREPARE sent -> COMMIT sent, on the leader's (virtual) clock


@dataclass(frozen=True)
class LeaderSettings:
    interval_steps: int = 400
    window_steps: int = 1000
    min_margin: int = 2
    max_retries: int = 3
    layers_per_chunk: int = 8
    ack_s: float = 5.0
    promise_s: float = 5.0
    done_s: float = 120.0


def _lift(outputs: list, members: NodeMembership) -> list[LeaderOut]:
    out: list[LeaderOut] = []
    for o in outputs:
        if isinstance(o, Broadcast):
            out.append(ToAll(o.msg))
        elif isinstance(o, SendTo):
            out.append(ToRank(o.rank, o.msg, o.node if o.node is not None
                              else members.node_of(o.rank)))
        elif isinstance(o, ComputePlan):
            out.append(NeedPlan(o.request_id, o.current))
        elif isinstance(o, Persist):
            out.append(Durable())
        elif isinstance(o, Reject):
            out.append(Dropped(o.where, str(o.error)))
        else:  # a new output type: port it here
            raise TypeError(f"unknown leader output {type(o).__name__}")
    return out


#: Most local worker frames a sidecar reads in one burst (a follower relays a burst at once).
FOLLOWER_BURST: int = MAX_BURST

#: The incarnation every simulated follower has (none restarts).
INCARNATION = "sim"


def identity_of(node: int) -> bytes:
    """A follower's socket identity, as the leader's ROUTER sees it."""
    return node_identity(node, INCARNATION)


class LeaderPort:
    """The leader's core with its :class:`NodeMembership`, fed by the simulator's leader queue
    as the leader driver feeds it: follower messages as their parts (:meth:`peer`), its own
    node's worker frames (:meth:`local`), ticks. Membership (which followers are live, when one
    is lost) is the core's."""

    def __init__(self, settings: LeaderSettings, num_nodes: int, node_timeout_s: float,
                 local_ranks: tuple[int, ...]) -> None:
        timeouts = AgreementTimeouts(ack_s=settings.ack_s, promise_s=settings.promise_s,
                                     done_s=settings.done_s)
        self.core = LeaderCore(LeaderConfig(
            interval_steps=settings.interval_steps, window_steps=settings.window_steps,
            min_margin=settings.min_margin, max_retries=settings.max_retries,
            layers_per_chunk=settings.layers_per_chunk, timeouts=timeouts),
            NodeMembership(num_nodes=num_nodes, node_timeout_s=node_timeout_s))
        self.local_ranks = set(local_ranks)

    def peer(self, node: int, parts: list[bytes],
             now: float) -> tuple[str, int, list[LeaderOut]]:
        """One follower message as the leader's ROUTER reads it (``parts`` without the
        identity): opened (:func:`open_peer`) and handed to the core. Returns its header's
        type, the frames the leader decoded for it (the header, and each relayed frame), and
        the outputs."""
        try:
            header, frames = open_peer(parts)
            outs = self.core.on_peer(identity_of(node), header, frames, now, self.local_ranks)
        except ProtocolError as exc:
            return "refused", 1, [Dropped(f"node {node}", str(exc))]
        return header.TYPE, 1 + len(frames), _lift(outs, self.core.members)

    def local(self, rank: int, frame: bytes, now: float) -> list[LeaderOut]:
        """A frame of a worker on the leader's own node (its registry admitted it)."""
        return _lift(self.core.on_worker(0, decode(frame), now, self.local_ranks),
                     self.core.members)

    def tick(self, now: float) -> tuple[list[LeaderOut], list[int]]:
        """The core's tick; also returns the follower nodes it lost on it."""
        before = set(self.core.members.nodes)
        outs = _lift(self.core.on_tick(now), self.core.members)
        return outs, sorted(before - set(self.core.members.nodes))

    def followers(self) -> list[int]:
        """The follower nodes the leader knows, in its order (a broadcast goes to each)."""
        return list(self.core.members.nodes)

    def plan_result(self, request_id: int, plan: PlanResult, now: float) -> list[LeaderOut]:
        return _lift(self.core.on_plan_result(request_id, plan, now), self.core.members)

    def request_rebalance(self, force: bool = True) -> bool:
        return self.core.request_rebalance(force, "the simulator")[0]

    @property
    def group_complete(self) -> bool:
        return self.core.group_complete

    def epoch_in_flight(self) -> tuple[int, int | None, dict[int, int]] | None:
        """(epoch, S or None, {rank: step of its PLAN_ACK}) of the epoch being agreed."""
        a = self.core.agreement
        if a is None or a.phase not in (Phase.PLANNED, Phase.PREPARING, Phase.COMMITTED):
            return None
        return a.epoch, a.switch_step, dict(a.acked_steps)

    def history(self) -> list[EpochView]:
        return [EpochView(r.epoch, r.outcome,
                          abort_cause(r.abort_code, r.reason) if r.outcome == "aborted" else None, r.reason,
                          r.switch_step, r.margin, r.agreement_ms)
                for r in self.core.history]

    def counters(self) -> dict[str, int]:
        return dict(self.core.counters)


def down_parts(msg: Message, rank: int | None) -> list[bytes]:
    """The leader's ``[RELAY, frame]`` to a follower: for ``rank``, or (None) every worker of
    the node."""
    return relay(0, [BROADCAST if rank is None else rank], [encode(msg)])


def leader_heartbeat(local_ranks: tuple[int, ...]) -> list[bytes]:
    """The leader's NODE_HEARTBEAT to its followers (one message, sent to each)."""
    return [encode(NodeHeartbeat(node=0, ranks=local_ranks))]


def peer_bytes(parts: list[bytes]) -> int:
    return sum(len(p) for p in parts)


# --- followers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToLeader:
    """A follower's message up: ``parts`` as its DEALER sends them."""

    parts: list[bytes]


@dataclass(frozen=True)
class ToWorkers:
    """``msg`` to local worker ``rank`` (None: every worker of the node)."""

    rank: int | None
    msg: Message


FollowerOut = ToLeader | ToWorkers | Dropped


class FollowerPort:
    """One follower sidecar's :class:`FollowerCore`: with a :class:`NodeAggregator` (the
    per-node path, the default), or without (``aggregate=False``: the per-worker path)."""

    def __init__(self, node: int, aggregate: bool, node_timeout_s: float) -> None:
        self.node = node
        self.core = FollowerCore(node, "tcp://leader:5555", INCARNATION,
                                 node_timeout_s=node_timeout_s, pid=100_000 + node,
                                 aggregator=NodeAggregator(node) if aggregate else None)

    def start(self) -> list[FollowerOut]:
        return self._lift(self.core.start())

    def relay(self, burst: list[tuple[int, Message, bytes]], now: float) -> list[FollowerOut]:
        """Local worker frames admitted in one burst: ``(rank, message, frame)``."""
        return self._lift(self.core.relay([Admitted(r, m, f) for r, m, f in burst], now))

    def from_leader(self, parts: list[bytes], now: float) -> list[FollowerOut]:
        try:
            header, frames = open_peer(parts)
            return self._lift(self.core.on_leader(header, parts[0], frames, now))
        except ProtocolError as exc:
            return [Dropped(f"the leader, at node {self.node}", str(exc))]

    def tick(self, now: float) -> list[FollowerOut]:
        return self._lift(self.core.on_tick(now))

    def heartbeat(self, ranks: list[int]) -> list[FollowerOut]:
        return self._lift(self.core.heartbeat(ranks))

    def next_deadline(self) -> float | None:
        """When a tick next has something to send up (None: nothing held)."""
        agg = self.core.aggregator
        return None if agg is None else agg.next_deadline()

    @staticmethod
    def _lift(outputs: list) -> list[FollowerOut]:
        out: list[FollowerOut] = []
        for o in outputs:
            if isinstance(o, Up):
                out.append(ToLeader(o.parts))
            elif isinstance(o, ToLocal):
                out.append(ToWorkers(None if o.rank == BROADCAST else o.rank, o.msg))
            elif isinstance(o, Reject):
                out.append(Dropped(o.where, str(o.error)))
            else:  # ToControl: the simulator sends no control requests
                raise TypeError(f"unexpected follower output {type(o).__name__}")
        return out


# --- planner --------------------------------------------------------------------------------------

def make_plan(load: torch.Tensor, current: torch.Tensor, num_gpus: int) -> PlanResult:
    """The real planner (default policy), forced: ``load: [L, E]``, ``current: [L, P]``."""
    return plan_rebalance(load, current, num_gpus, min_gain=0.0, force=True, spec=PlannerSpec())


def plan_to(result: PlanResult, target: torch.Tensor) -> PlanResult:
    """``result`` with its placement replaced by ``target: [L, P]`` (going back to the start
    placement reuses the measured plan's other fields)."""
    return replace(result, phys2log=target.clone(), skip_reason="")


def start_placement(num_layers: int, num_experts: int, num_physical: int) -> torch.Tensor:
    return default_placement(num_layers, num_experts, num_physical)


# --- workers --------------------------------------------------------------------------------------

class Step(enum.Enum):
    """What a rank does at a step."""

    PROCEED = "proceed"
    HOLD = "hold"  # promised S, outcome unknown
    COPY = "copy"  # copy one chunk before the step


class RankPort:
    """One rank's :class:`WorkerAgreement` and the messages a worker hook builds."""

    def __init__(self, rank: int, node: int, world_size: int, num_experts: int,
                 phys2log: torch.Tensor, bytes_per_expert: int) -> None:
        self.rank, self.node, self.world_size = rank, node, world_size
        self.num_experts = num_experts
        self.bytes_per_expert = bytes_per_expert
        self.agreement = WorkerAgreement(rank, num_experts, world_size, phys2log,
                                         bytes_per_expert, can_copy=True)
        self._chunk: CopyChunk | None = None

    def hello(self, step: int) -> Message:
        p = self.agreement.phys2log
        return Hello(rank=self.rank, node=self.node, world_size=self.world_size,
                     num_layers=p.shape[0], num_experts=self.num_experts, num_physical=p.shape[1],
                     bytes_per_expert=self.bytes_per_expert, step=step, pid=1000 + self.rank,
                     phys2log=p, applied_epoch=self.agreement.applied_epoch)

    def heartbeat(self, step: int) -> Message:
        return Heartbeat(rank=self.rank, step=step)

    def counts(self, from_step: int, to_step: int, counts: torch.Tensor) -> Message:
        """``counts: [L, E]`` int64 (shared between ranks; frames are immutable)."""
        return Counts(rank=self.rank, from_step=from_step, to_step=to_step, counts=counts)

    def on_message(self, msg: Message, step: int) -> list[Message]:
        return self.agreement.on_message(msg, step)

    def outcome_query(self) -> Message | None:
        return self.agreement.outcome_query()

    def action_at(self, step: int) -> Step:
        """The agreement's actions before ``step``, as the sim carries them out: a copy engine
        of pipeline depth 0 (each chunk copied in one call at its step), prefetch offered and
        taken at once (it costs nothing in the model)."""
        for action in self.agreement.actions_at(step):
            if isinstance(action, Hold):
                return Step.HOLD
            if isinstance(action, LandChunk):
                self._chunk = action.chunk
                return Step.COPY
            if isinstance(action, Prefetch):
                self.agreement.prefetched(action.chunk)
        return Step.PROCEED

    def chunk_index(self) -> int:
        """Index of the chunk the last :meth:`action_at` returned COPY for."""
        assert self._chunk is not None
        return self._chunk.index

    def chunk_copied(self, seconds: float) -> list[Message]:
        """The chunk of the last COPY is copied (``seconds`` of copying)."""
        assert self._chunk is not None
        chunk, self._chunk = self._chunk, None
        return self.agreement.chunk_landed(chunk, 0, seconds)

    def held(self, seconds: float) -> None:
        self.agreement.held(seconds)

    @property
    def promised(self) -> bool:
        return self.agreement.state is WorkerState.PROMISED

    @property
    def copying(self) -> bool:
        return self.agreement.state is WorkerState.COPYING

    @property
    def planned(self) -> bool:
        return self.agreement.state is WorkerState.PLANNED

    @property
    def epoch(self) -> int | None:
        return self.agreement.epoch

    @property
    def switch_step(self) -> int | None:
        return self.agreement.switch_step

    @property
    def applied_epoch(self) -> int:
        return self.agreement.applied_epoch

