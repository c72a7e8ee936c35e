"""The worker's side of the step agreement (DESIGN.md §4), with no I/O and no threads.

:class:`WorkerAgreement` answers the leader's messages and tells the decode loop what to do at
each step. It is not thread-safe: the hook calls it under one lock from both its socket thread
(``on_*``) and the decode thread (:meth:`action_at`), which makes "my step is below S, so I
promise" and "I am at S, is there a promise?" atomic with each other.

States::

    IDLE ─PLAN ok─▶ PLANNED ─PREPARE, step < S─▶ PROMISED ─COMMIT─▶ COPYING ─last chunk─▶ IDLE
                      │ PREPARE, step >= S: REFUSE     │ ABORT ─▶ IDLE   (copy error ─▶ FAILED)

Once PROMISED, the decode loop may not run step S until the outcome is known: :meth:`action_at`
returns :class:`Hold`. The hook waits for the outcome with a timeout (invariant I2), and while
PROMISED it keeps asking for the outcome (:meth:`outcome_query`): a sidecar or leader that
restarted may have lost the COMMIT or ABORT, and the leader's decision log answers.

A COMMIT of an epoch this rank already finished is answered with the same DONE again: a leader
that restarted, or whose DONE was lost with a sidecar, asks that way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from eplb.placement import InvalidPlacement, placement_hash, validate_placement
from eplb.worker_hook.copy_plan import changed_layers, chunk_layers, plan_copies
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
class Proceed:
    """Run the step as usual."""


@dataclass(frozen=True)
class Hold:
    """Step ``step`` is the promised switch step S of ``epoch`` and its outcome is not known yet."""

    epoch: int
    step: int


@dataclass(frozen=True)
class CopyChunk:
    """Before running this step, copy ``layers`` from ``old`` to ``new`` (both ``[L, P]``)."""

    epoch: int
    index: int
    num_chunks: int
    layers: tuple[int, ...]
    old: torch.Tensor
    new: torch.Tensor


Action = Proceed | Hold | CopyChunk
PROCEED = Proceed()


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
    """Worker-side protocol state for one rank.

    Args:
        rank: this worker's global EP rank.
        num_experts: ``E``; num_gpus: EP size ``G``.
        phys2log: ``[L, P]`` placement the engine serves now (copied).
        bytes_per_expert: size of one expert's weights, for byte-budget chunking.
        can_copy: False when the engine gave no way to copy weights: a plan that moves any
            layer is then refused (rather than promised and failed at S).
    """

    def __init__(self, rank: int, num_experts: int, num_gpus: int, phys2log: torch.Tensor,
                 bytes_per_expert: int = 0, can_copy: bool = True) -> None:
        self.rank = rank
        self.can_copy = can_copy
        self.bytes_per_expert = bytes_per_expert
        self.num_experts = num_experts
        self.num_gpus = num_gpus
        self.phys2log = phys2log.to(torch.int64).clone()
        self.state = WorkerState.IDLE
        self.epoch: int | None = None
        self.switch_step: int | None = None
        self._new: torch.Tensor | None = None
        self._chunks: list[tuple[int, ...]] = []
        self._next_chunk = 0
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
        self._next_chunk = 0
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

    # --- decode thread --------------------------------------------------------------------------

    def action_at(self, step: int) -> Action:
        """What the decode loop must do before running ``step`` (steps only go up)."""
        if self.state is WorkerState.PROMISED and step >= self.switch_step:
            return Hold(epoch=self.epoch, step=self.switch_step)
        if self.state is WorkerState.COPYING and step >= self.switch_step:
            assert self._new is not None
            i = self._next_chunk
            return CopyChunk(epoch=self.epoch, index=i, num_chunks=len(self._chunks),
                             layers=self._chunks[i], old=self.phys2log, new=self._new)
        return PROCEED

    def upcoming_chunk(self) -> CopyChunk | None:
        """The chunk a committed epoch copies next (before or after S), else None."""
        if self.state is not WorkerState.COPYING:
            return None
        assert self._new is not None
        i = self._next_chunk
        return CopyChunk(epoch=self.epoch, index=i, num_chunks=len(self._chunks),
                         layers=self._chunks[i], old=self.phys2log, new=self._new)

    @property
    def pending_done(self) -> bool:
        """True while a committed epoch still has chunks to copy."""
        return self.state is WorkerState.COPYING

    def held(self, seconds: float) -> None:
        """The decode loop waited ``seconds`` at S for the outcome (reported in DONE)."""
        self._hold_seconds += seconds

    def chunk_copied(self, chunk: CopyChunk, bytes_received: int, seconds: float) -> list[Message]:
        """The engine copied ``chunk``: its layers now serve the new placement. Returns DONE
        after the last chunk."""
        assert self.state is WorkerState.COPYING and chunk.index == self._next_chunk
        layers = list(chunk.layers)
        self.phys2log[layers] = chunk.new[layers]
        self._next_chunk += 1
        self._bytes_received += bytes_received
        self._copy_seconds += seconds
        if self._next_chunk == len(self._chunks):
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
