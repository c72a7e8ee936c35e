"""Every call the simulator makes into the real cores, in one module.

The leader side is :class:`~eplb.coordinator.leader.LeaderCore` (with its
:class:`~eplb.coordinator.agreement.EpochAgreement`), the worker side one
:class:`~eplb.worker_hook.agreement.WorkerAgreement` per rank. The simulator sees them only
through :class:`LeaderPort`, :class:`RankPort` and the few functions below, in its own small
vocabulary (:class:`Kind`, :class:`ToAll`, :class:`ToRank`, :class:`NeedPlan`, :class:`Step`), so
that when the cores' APIs change this is the one file to port. Ported so far: the worker's
actions (a copy engine of depth 0) and the abort codes. Not yet: node membership, which moved
into the leader core while this was written; the simulator's driver still times nodes out itself.

Messages cross this boundary as the cores' own message objects; the simulator never looks
inside them except through :func:`kind_of`, :func:`epoch_of` and :func:`switch_step_of`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

from eplb.coordinator.agreement import AgreementTimeouts, Phase
from eplb.coordinator.leader import (Broadcast, ComputePlan, LeaderConfig, LeaderCore, Persist,
                                     SendTo)
from eplb.placement.planner import PlannerSpec, PlanResult, plan_rebalance
from eplb.placement.rules import default_placement
from eplb.proto import (Counts, Heartbeat, Hello, Message, NodeHeartbeat, Refuse, decode,
                        encode)
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
    OTHER = "OTHER"


_KINDS = {k.value: k for k in Kind}


def kind_of(msg: Message) -> Kind:
    return _KINDS.get(msg.TYPE, Kind.OTHER)


def epoch_of(msg: Message) -> int | None:
    return getattr(msg, "epoch", None)


def switch_step_of(msg: Message) -> int:
    """S of a PREPARE or COMMIT."""
    return int(msg.step)


def frame_bytes(msg: Message) -> int:
    """Size of ``msg`` on the wire (one encoded frame)."""
    return len(encode(msg))


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
    RANK_LEFT = "a rank left (node lost)"
    OTHER = "other"


def abort_cause(code: AbortCode | None, reason: str) -> AbortCause:
    """The cause of an abort from the leader's code. The code does not say which refusal or
    which timeout it was; for those two only, the reason's text does."""
    if code is AbortCode.REFUSED:
        return AbortCause.REFUSED_LATE if "already at step" in reason else AbortCause.REFUSED_OTHER
    if code is AbortCode.TIMEOUT:
        return AbortCause.NO_PLAN_ACK if "no PLAN_ACK" in reason else AbortCause.NO_PROMISE
    if code in (AbortCode.WORKER_LEFT, AbortCode.NODE_LOST):
        return AbortCause.RANK_LEFT
    return AbortCause.OTHER


# --- leader ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToAll:
    """Broadcast ``msg`` to every worker (through every follower)."""

    msg: Message


@dataclass(frozen=True)
class ToRank:
    rank: int
    msg: Message


@dataclass(frozen=True)
class NeedPlan:
    """The leader asks for a plan; answer with :meth:`LeaderPort.plan_result`.
    ``current: [L, P]`` the placement it plans from."""

    request_id: int
    current: torch.Tensor


@dataclass(frozen=True)
class Durable:
    """A record the leader writes (fsync) before anything after it is sent."""


LeaderOut = ToAll | ToRank | NeedPlan | Durable


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


def _lift(outputs: list) -> list[LeaderOut]:
    out: list[LeaderOut] = []
    for o in outputs:
        if isinstance(o, Broadcast):
            out.append(ToAll(o.msg))
        elif isinstance(o, SendTo):
            out.append(ToRank(o.rank, o.msg))
        elif isinstance(o, ComputePlan):
            out.append(NeedPlan(o.request_id, o.current))
        elif isinstance(o, Persist):
            out.append(Durable())
        else:  # a new output type: port it here
            raise TypeError(f"unknown leader output {type(o).__name__}")
    return out


class LeaderPort:
    """The leader's core, fed by the simulator's leader queue."""

    def __init__(self, settings: LeaderSettings) -> None:
        timeouts = AgreementTimeouts(ack_s=settings.ack_s, promise_s=settings.promise_s,
                                     done_s=settings.done_s)
        self.core = LeaderCore(LeaderConfig(
            interval_steps=settings.interval_steps, window_steps=settings.window_steps,
            min_margin=settings.min_margin, max_retries=settings.max_retries,
            layers_per_chunk=settings.layers_per_chunk, timeouts=timeouts))

    def hello(self, msg: Message, now: float) -> tuple[str, list[LeaderOut]]:
        """A worker's HELLO; returns (error, outputs)."""
        error = self.core.on_hello(msg, now)
        return error, ([] if error else _lift(self.core.on_joined(msg.rank)))

    def message(self, msg: Message, now: float) -> list[LeaderOut]:
        return _lift(self.core.on_message(msg, now))

    def tick(self, now: float) -> list[LeaderOut]:
        return _lift(self.core.on_tick(now))

    def worker_left(self, rank: int, why: str, now: float) -> list[LeaderOut]:
        return _lift(self.core.on_worker_left(rank, why, now))

    def plan_result(self, request_id: int, plan: PlanResult, now: float) -> list[LeaderOut]:
        return _lift(self.core.on_plan_result(request_id, plan, now))

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


def is_late_refusal(msg: Message) -> bool:
    return isinstance(msg, Refuse) and "already at step" in msg.reason


def node_heartbeat(node: int, ranks: tuple[int, ...]) -> Message:
    return NodeHeartbeat(node=node, ranks=ranks)
