"""The worker's side of the step agreement (DESIGN.md §4), with no I/O and no threads.

:class:`WorkerAgreement` answers the leader's messages and decides, step by step, what the decode
loop must do: hold at the switch step S, and in a committed epoch the copy schedule of its chunks
(a chunk = the changed layers copied together, :func:`chunk_changed_layers`). The hook carries
the actions out (:meth:`WorkerAgreement.actions_at`) and reports what happened
(:meth:`~WorkerAgreement.chunk_started`, :meth:`~WorkerAgreement.chunk_landed`,
:meth:`~WorkerAgreement.copy_failed`, :meth:`~WorkerAgreement.held`); it decides nothing. It is
not thread-safe: the hook calls it under one lock from both its socket thread (``on_*``) and the
decode thread, which makes "my step is below S, so I promise" and "I am at S, is there a
promise?" atomic with each other.

States::

    IDLE ─PLAN ok─▶ PLANNED ─PREPARE, step < S─▶ PROMISED ─COMMIT─▶ COPYING ─last chunk─▶ IDLE
                      │ PREPARE, step >= S: REFUSE     │ ABORT ─▶ IDLE   (copy error ─▶ FAILED)

Once PROMISED, the decode loop may not run step S until the outcome is known: the actions at S
are ``(Hold,)``. The hook waits for the outcome with a timeout (invariant I2), and while PROMISED
it keeps asking for the outcome (:meth:`~WorkerAgreement.outcome_query`): a sidecar or leader that
restarted may have lost the COMMIT or ABORT, and the leader's decision log answers.

The copy schedule of a committed epoch with ``n`` chunks and an engine of pipeline depth ``d``
(:class:`~eplb.worker_hook.copy_engine.CopyEngine`); ``S + i`` is the ``i``-th call at or past S
(one per step):

* after the COMMIT arrived and before S: ``Prefetch`` chunk 0, once;
* ``d = 0``: at ``S + i``, ``LandChunk`` i (a copy in one call), then ``Prefetch`` chunk i + 1;
* ``d >= 1``: at ``S + i``, ``LandChunk`` of the oldest chunk in flight when ``d`` are in
  flight or all ``n`` are started, then ``StartChunk`` i (when i < n): chunk i starts at
  ``S + i`` and lands at ``S + i + min(d, n)`` (with ``d = 1``: one step after its start), at
  most ``d`` are in flight, and the last lands at ``S + n - 1 + min(d, n)``.

DONE comes with the last landing. An ABORT (only possible before COMMIT) or a refused PREPARE
schedules nothing; after a copy failure nothing more is scheduled.

A COMMIT of an epoch this rank already finished is answered with the same DONE again: a leader
that restarted, or whose DONE was lost with a sidecar, asks that way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from eplb.placement.copy_plan import changed_layers, chunk_layers, plan_copies
from eplb.placement.rules import InvalidPlacement, placement_hash, validate_placement
from eplb.proto import (Abort, Commit, Done, Message, OutcomeQuery, Plan, PlanAck, Prepare,
                        Promise, Refuse)
from eplb.proto.reasons import RefuseCode


class WorkerState(enum.Enum):
    IDLE = "idle"
    PLANNED = "planned"
    PROMISED = "promised"
    COPYING = "copying"
    FAILED = "failed"


@dataclass(frozen=True)
class CopyChunk:
    """One chunk of a committed epoch: ``layers`` switch from ``old`` to ``new``.

    Attributes:
        epoch: the rebalance epoch; index: ``i`` in ``[0, num_chunks)``, in copy order.
        layers: MoE layer indices, in copy order (the same on every rank).
        old: ``[L, P]`` the placement this rank serves (the agreement's live tensor: rows of
            chunks landed so far are switched already, the rows of ``layers`` not yet).
        new: ``[L, P]`` the epoch's placement.
    """

    epoch: int
    index: int
    num_chunks: int
    layers: tuple[int, ...]
    old: torch.Tensor
    new: torch.Tensor


@dataclass(frozen=True)
class Hold:
    """Step ``step`` is the promised switch step S of ``epoch`` and its outcome is not known yet:
    wait for it (with a timeout) and ask again."""

    epoch: int
    step: int


@dataclass(frozen=True)
class Prefetch:
    """Let the copy engine prepare ``chunk`` now (off its step); report :meth:`WorkerAgreement.
    prefetched` whether or not it could."""

    chunk: CopyChunk


@dataclass(frozen=True)
class StartChunk:
    """Issue ``chunk``'s transfers now (every rank at the same step); report
    :meth:`WorkerAgreement.chunk_started`, or :meth:`WorkerAgreement.copy_failed`."""

    chunk: CopyChunk


@dataclass(frozen=True)
class LandChunk:
    """Finish ``chunk`` before this step runs (with pipeline depth 0: copy all of it); its
    layers then serve ``chunk.new``. Report :meth:`WorkerAgreement.chunk_landed`, or
    :meth:`WorkerAgreement.copy_failed`."""

    chunk: CopyChunk


#: What :meth:`WorkerAgreement.actions_at` returns items of; ``()`` means: run the step as usual.
Action = Hold | Prefetch | StartChunk | LandChunk


def chunk_changed_layers(old: torch.Tensor, new: torch.Tensor, layers_per_chunk: int,
                         bytes_per_chunk: int = 0, bytes_per_expert: int = 0,
                         num_gpus: int = 1) -> list[tuple[int, ...]]:
    """Layers whose placement changes, in order, at most ``layers_per_chunk`` a chunk and, with
    ``bytes_per_chunk`` > 0, at most that many bytes received by the busiest rank a chunk.

    Args:
        old, new: ``[L, P]`` placements; num_gpus: ``G``.
    Returns:
        chunks of layer indices; empty when nothing changes. Every worker gets the same chunks,
        since the bytes come from the global copy plan.
    """
    layers = changed_layers(old, new)
    if bytes_per_chunk <= 0 or not layers:
        return [tuple(c) for c in chunk_layers(layers, layers_per_chunk=layers_per_chunk)]
    # Which holder sends an expert does not change what each rank receives, so any node
    # grouping gives the same bytes; one rank per node keeps the planning cheap.
    sizes = [max(plan.stats(bytes_per_expert).bytes_received)
             for plan in plan_copies(old, new, layers, num_gpus, ranks_per_node=1)]
    return [tuple(c) for c in chunk_layers(layers, layers_per_chunk=layers_per_chunk,
                                           bytes_per_layer=sizes, bytes_per_chunk=bytes_per_chunk)]


class WorkerAgreement:
    """Worker-side protocol state and copy schedule for one rank.

    Args:
        rank: this worker's global EP rank.
        num_experts: ``E``; num_gpus: EP size ``G``.
        phys2log: ``[L, P]`` placement the engine serves now (copied).
        bytes_per_expert: size of one expert's weights, for byte-budget chunking.
        can_copy: False when the engine gave no way to copy weights: a plan that moves any
            layer is then refused (rather than promised and failed at S).
        pipeline_depth: the copy engine's ``d`` (steps from a chunk's start to its landing; 0:
            each chunk is copied in one call), see the module docstring.
    """

    def __init__(self, rank: int, num_experts: int, num_gpus: int, phys2log: torch.Tensor,
                 bytes_per_expert: int = 0, can_copy: bool = True, pipeline_depth: int = 0) -> None:
        if pipeline_depth < 0:
            raise ValueError(f"pipeline_depth must be >= 0, not {pipeline_depth}")
        self.rank = rank
        self.can_copy = can_copy
        self.pipeline_depth = pipeline_depth
        self.bytes_per_expert = bytes_per_expert
        self.num_experts = num_experts
        self.num_gpus = num_gpus
        self.phys2log = phys2log.to(torch.int64).clone()
        self.state = WorkerState.IDLE
        self.epoch: int | None = None
        self.switch_step: int | None = None
        self._new: torch.Tensor | None = None
        self._chunks: list[tuple[int, ...]] = []
        # The schedule of the committed epoch, as counts of chunks: landed <= started <= n
        # (with depth 0 a chunk counts as started when it lands); chunks below `_prefetched`
        # were offered to the engine's prefetch.
        self._started = 0
        self._landed = 0
        self._prefetched = 0
        self._bytes_received = 0
        self._copy_seconds = 0.0
        self._hold_seconds = 0.0
        self.failure: str = ""
        self.applied_epoch = 0  # the last epoch whose copies finished ok
        self._last_done: Done | None = None

    # --- leader messages (socket thread) --------------------------------------------------------

    def on_message(self, msg: Message, step: int) -> list[Message]:
        """Feed one leader message while the decode loop has started ``step``; returns replies."""
        if isinstance(msg, Plan):
            return self._on_plan(msg, step)
        if isinstance(msg, Prepare):
            return self._on_prepare(msg, step)
        if isinstance(msg, Commit):
            return self._on_commit(msg)
        if isinstance(msg, Abort):
            self._on_abort(msg)
        return []

    def _on_plan(self, msg: Plan, step: int) -> list[Message]:
        if self.state in (WorkerState.PROMISED, WorkerState.COPYING, WorkerState.FAILED):
            # The leader never overlaps epochs; a PLAN now is stale or from a confused peer.
            return [Refuse(rank=self.rank, epoch=msg.epoch, step=step,
                           reason=f"busy with epoch {self.epoch} ({self.state.value})",
                           code=RefuseCode.BUSY)]
        try:
            validate_placement(msg.phys2log, self.num_experts, self.phys2log.shape[1], self.num_gpus,
                               num_layers=self.phys2log.shape[0])
            if placement_hash(msg.phys2log) != msg.plan_hash:
                raise InvalidPlacement("plan_hash does not match phys2log")
        except InvalidPlacement as exc:  # invariant I5: never act on a bad plan
            self._reset()
            return [Refuse(rank=self.rank, epoch=msg.epoch, step=step,
                           reason=f"invalid plan: {exc}", code=RefuseCode.INVALID_PLAN)]
        chunks = chunk_changed_layers(self.phys2log, msg.phys2log, msg.layers_per_chunk,
                                      msg.bytes_per_chunk, self.bytes_per_expert, self.num_gpus)
        if chunks and not self.can_copy:
            self._reset()
            return [Refuse(rank=self.rank, epoch=msg.epoch, step=step,
                           reason=f"cannot copy: rank {self.rank} has no copy_fn; give "
                                  "WorkerHook a copy_fn to take part in rebalances",
                           code=RefuseCode.CANNOT_COPY)]
        self.state = WorkerState.PLANNED
        self.epoch = msg.epoch
        self.switch_step = None
        self._new = msg.phys2log.clone()
        self._chunks = chunks
        self._started = self._landed = self._prefetched = 0
        self._bytes_received = 0  # this epoch's DONE reports from here on
        self._copy_seconds = 0.0
        self._hold_seconds = 0.0
        return [PlanAck(rank=self.rank, epoch=msg.epoch, step=step)]

    def _on_prepare(self, msg: Prepare, step: int) -> list[Message]:
        if self.state is not WorkerState.PLANNED or msg.epoch != self.epoch:
            return [Refuse(rank=self.rank, epoch=msg.epoch, step=step,
                           reason=f"no plan for epoch {msg.epoch} (state {self.state.value}, "
                                  f"epoch {self.epoch})", code=RefuseCode.NO_PLAN)]
        if step >= msg.step:
            return [Refuse(rank=self.rank, epoch=msg.epoch, step=step,
                           reason=f"already at step {step} >= S={msg.step}", code=RefuseCode.TOO_LATE)]
        self.state = WorkerState.PROMISED
        self.switch_step = msg.step
        return [Promise(rank=self.rank, epoch=msg.epoch)]

    def _on_commit(self, msg: Commit) -> list[Message]:
        if self._last_done is not None and msg.epoch == self._last_done.epoch:
            return [self._last_done]  # asked again: the first DONE may have been lost
        if self.state is WorkerState.PROMISED and msg.epoch == self.epoch and msg.step == self.switch_step:
            self.state = WorkerState.COPYING
            if not self._chunks:
                return [self._finish()]
        return []

    def _on_abort(self, msg: Abort) -> None:
        if msg.epoch == self.epoch and self.state in (WorkerState.PLANNED, WorkerState.PROMISED):
            self._reset()

    def outcome_query(self) -> OutcomeQuery | None:
        """While PROMISED: the question to ask the leader again (the outcome may have been lost)."""
        if self.state is WorkerState.PROMISED and self.epoch is not None:
            return OutcomeQuery(rank=self.rank, epoch=self.epoch)
        return None

    # --- decode thread: the schedule -----------------------------------------------------------

    def actions_at(self, step: int) -> tuple[Action, ...]:
        """What the decode loop must do before running ``step`` (steps only go up), in order.

        Pure: until something is reported, asking again returns the same actions.

        Returns:
            ``(Hold,)`` at or past S while the outcome of the promised epoch is unknown; in a
            committed epoch at most one each of :class:`LandChunk`, :class:`StartChunk`,
            :class:`Prefetch`, in that order (see the module docstring); else ``()``.
        """
        if self.state is WorkerState.PROMISED and step >= self.switch_step:
            return (Hold(epoch=self.epoch, step=self.switch_step),)
        if self.state is not WorkerState.COPYING:
            return ()
        actions: list[Action] = []
        started, landed, n = self._started, self._landed, len(self._chunks)
        if step >= self.switch_step:
            in_flight = started - landed
            if self.pipeline_depth == 0 or (in_flight and (in_flight >= self.pipeline_depth
                                                           or started == n)):
                actions.append(LandChunk(self._chunk(landed)))
                landed += 1
                started = max(started, landed)
            if self.pipeline_depth and started < n:
                actions.append(StartChunk(self._chunk(started)))
                started += 1
        if landed == started < n and landed >= self._prefetched:
            actions.append(Prefetch(self._chunk(landed)))  # the next chunk, not yet issued
        return tuple(actions)

    def _chunk(self, index: int) -> CopyChunk:
        assert self._new is not None and self.epoch is not None
        return CopyChunk(epoch=self.epoch, index=index, num_chunks=len(self._chunks),
                         layers=self._chunks[index], old=self.phys2log, new=self._new)

    @property
    def pending_done(self) -> bool:
        """True while a committed epoch still has chunks to copy."""
        return self.state is WorkerState.COPYING

    def held(self, seconds: float) -> None:
        """The decode loop waited ``seconds`` at S for the outcome (reported in DONE)."""
        self._hold_seconds += seconds

    def prefetched(self, chunk: CopyChunk) -> None:
        """The engine was offered ``chunk``'s :class:`Prefetch` (whether or not it could)."""
        if self.state is WorkerState.COPYING and chunk.epoch == self.epoch:
            self._prefetched = max(self._prefetched, chunk.index + 1)

    def chunk_started(self, chunk: CopyChunk, seconds: float) -> None:
        """The engine issued ``chunk``'s transfers (:class:`StartChunk`) in ``seconds``."""
        assert (self.state is WorkerState.COPYING and chunk.epoch == self.epoch
                and chunk.index == self._started
                and self._started - self._landed < self.pipeline_depth), (chunk.index, self.state)
        self._started += 1
        self._copy_seconds += seconds

    def chunk_landed(self, chunk: CopyChunk, bytes_received: int, seconds: float) -> list[Message]:
        """The engine finished ``chunk`` (:class:`LandChunk`) in ``seconds``: its layers now serve
        the new placement. Returns DONE after the last chunk."""
        assert (self.state is WorkerState.COPYING and chunk.epoch == self.epoch
                and chunk.index == self._landed
                and (chunk.index < self._started or self.pipeline_depth == 0)), (chunk.index,
                                                                                self.state)
        layers = list(chunk.layers)
        self.phys2log[layers] = chunk.new[layers]
        self._landed += 1
        self._started = max(self._started, self._landed)
        self._bytes_received += bytes_received
        self._copy_seconds += seconds
        if self._landed == len(self._chunks):
            return [self._finish()]
        return []

    def copy_failed(self, chunk: CopyChunk, error: str) -> list[Message]:
        """A copy failed: the maps may be mismatched; this rank must never serve again."""
        self.state = WorkerState.FAILED
        self.failure = f"epoch {chunk.epoch} chunk {chunk.index} (layers {list(chunk.layers)}): {error}"
        self._last_done = Done(rank=self.rank, epoch=chunk.epoch, ok=False,
                               error=self.failure[:2000], bytes_received=self._bytes_received,
                               copy_seconds=self._copy_seconds, hold_seconds=self._hold_seconds)
        return [self._last_done]

    def _finish(self) -> Done:
        assert self._new is not None and self.epoch is not None
        self.phys2log = self._new
        self.state = WorkerState.IDLE
        self._new = None
        self._chunks = []
        self.applied_epoch = self.epoch
        self._last_done = Done(rank=self.rank, epoch=self.epoch, ok=True, error="",
                               bytes_received=self._bytes_received,
                               copy_seconds=self._copy_seconds, hold_seconds=self._hold_seconds)
        return self._last_done

    def _reset(self) -> None:
        self.state = WorkerState.IDLE
        self.switch_step = None
        self._new = None
        self._chunks = []
