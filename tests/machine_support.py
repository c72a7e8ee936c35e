"""What the hypothesis state machines of the agreement (``test_agreement_properties.py``,
``test_restart_properties.py``) share: the :func:`checked` marker, and :class:`RankCopies`, one
rank's decode loop and copy engine as :meth:`WorkerHook.on_step` drives them, checked against the
start-ahead schedule written out here independently of :class:`WorkerAgreement`'s code.

The schedule of a committed epoch with switch step ``S``, ``n`` chunks and pipeline depth ``d``:

* depth 0: chunk ``i`` lands (is copied in one call) at ``S + i``; nothing is started;
* depth ``d >= 1``: chunk ``i`` starts at ``S + i`` and lands at ``S + i + min(d, n)`` (``d``
  steps after its start, or, with fewer than ``d`` chunks, one a step once all are started);
* chunks are started and landed in order, each once; never landed before started; at most ``d``
  started and not landed; DONE(ok) comes with the landing of the last chunk, never before;
* a chunk may be offered for prefetch once, before it is issued (started, or landed at depth 0);
* after a failed start or landing nothing more is scheduled on that rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eplb.proto import Done, Message
from eplb.worker_hook.agreement import (CopyChunk, Hold, LandChunk, Prefetch, StartChunk,
                                        WorkerAgreement)


def checked(method):
    """Mark the machine broken while a rule or invariant runs, so that a failure in it is not
    overwritten by a consequential one in ``teardown`` (which returns early while broken)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.broken = True
        result = method(self, *args, **kwargs)
        self.broken = False
        return result

    return wrapper


def holds(w: WorkerAgreement, step: int) -> bool:
    """Whether ``w``'s decode loop must hold before ``step``."""
    return any(isinstance(a, Hold) for a in w.actions_at(step))


def copy_kinds(w: WorkerAgreement, step: int) -> list[type]:
    """The kinds of engine work at ``step`` that can fail (:class:`StartChunk`,
    :class:`LandChunk`)."""
    return [type(a) for a in w.actions_at(step) if isinstance(a, (StartChunk, LandChunk))]


@dataclass
class EpochCopies:
    """What one rank's engine did in one epoch: ``(step, chunk index)`` of each prefetch and
    start, ``(step, chunk index, layers)`` of each landing."""

    switch_step: int
    num_chunks: int
    prefetches: list[tuple[int, int]] = field(default_factory=list)
    starts: list[tuple[int, int]] = field(default_factory=list)
    lands: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    done: bool = False
    failed: bool = False

    def in_flight(self) -> int:
        return len(self.starts) - len(self.lands) if self.starts else 0


class RankCopies:
    """One simulated rank: runs decode steps of ``w`` (carrying out its actions in order, as the
    hook does) and checks every action against the schedule above.

    Args:
        w: the rank's agreement; its ``pipeline_depth`` is the engine's.
        before_work: called as ``before_work(kind, step, chunk)`` (kind ``"prefetch"``,
            ``"start"`` or ``"land"``) before the engine does it: the machine's own checks
            (a COMMIT was sent and delivered, the chunk is the expected one).
    """

    def __init__(self, w: WorkerAgreement,
                 before_work: Callable[[str, int, CopyChunk], None] = lambda *a: None) -> None:
        self.w = w
        self.depth = w.pipeline_depth
        self.before_work = before_work
        self.epochs: dict[int, EpochCopies] = {}

    def epoch(self, epoch: int) -> EpochCopies | None:
        return self.epochs.get(epoch)

    @property
    def failed(self) -> bool:
        return any(e.failed for e in self.epochs.values())

    def run_step(self, step: int, fail: type | None = None) -> tuple[bool, list[Message]]:
        """Carry out the actions before ``step``; ``fail``: the first action of that kind
        (:class:`StartChunk` or :class:`LandChunk`) fails in the engine.

        Returns:
            ``(ran, replies)``: ran is False when the loop holds or a copy failed (the engine
            stops); replies are the messages to send (DONE, DONE(error)).
        """
        w = self.w
        actions = w.actions_at(step)
        if actions and isinstance(actions[0], Hold):
            assert len(actions) == 1, actions
            return False, []
        assert not self.failed, f"rank {w.rank} scheduled {actions} after a copy failure"
        replies: list[Message] = []
        kinds = [type(a) for a in actions]
        assert kinds == sorted(kinds, key=[LandChunk, StartChunk, Prefetch].index), kinds
        assert len(set(kinds)) == len(kinds), f"two actions of one kind at step {step}: {kinds}"
        for action in actions:
            chunk = action.chunk
            e = self.epochs.setdefault(chunk.epoch, EpochCopies(w.switch_step, chunk.num_chunks))
            assert not e.done, f"epoch {chunk.epoch}: {action} after DONE"
            assert (e.switch_step, e.num_chunks) == (w.switch_step, chunk.num_chunks)
            s, d = e.switch_step, self.depth
            issued = e.starts if d else e.lands
            if isinstance(action, Prefetch):
                self.before_work("prefetch", step, chunk)
                assert chunk.index not in [i for _, i in e.prefetches], "prefetched twice"
                assert chunk.index == len(issued), (
                    f"prefetch of chunk {chunk.index} with {len(issued)} issued")
                e.prefetches.append((step, chunk.index))
                w.prefetched(chunk)
            elif isinstance(action, StartChunk):
                self.before_work("start", step, chunk)
                assert d >= 1, "a start at pipeline depth 0"
                assert step == s + chunk.index, (
                    f"chunk {chunk.index} started at step {step}, S={s}")
                assert chunk.index == len(e.starts), "a chunk started out of order or twice"
                assert len(e.starts) + 1 - len(e.lands) <= d, "more chunks in flight than the depth"
                if fail is StartChunk:
                    return False, self._fail(e, chunk, replies)
                w.chunk_started(chunk, 0.0)
                e.starts.append((step, chunk.index))
            elif isinstance(action, LandChunk):
                self.before_work("land", step, chunk)
                assert chunk.index == len(e.lands), "a chunk landed out of order or twice"
                if d:
                    assert chunk.index < len(e.starts), f"chunk {chunk.index} landed, never started"
                    assert e.starts[chunk.index][0] + min(d, e.num_chunks) == step, (
                        f"chunk {chunk.index} started at {e.starts[chunk.index][0]}, landed at "
                        f"{step}, depth {d}, {e.num_chunks} chunks")
                assert step == s + chunk.index + min(d, e.num_chunks), (
                    f"chunk {chunk.index} landed at step {step}, S={s}, depth {d}")
                if fail is LandChunk:
                    return False, self._fail(e, chunk, replies)
                before = w.phys2log.clone()
                rows = list(chunk.layers)
                out = w.chunk_landed(chunk, bytes_received=1, seconds=0.0)
                others = [layer for layer in range(before.shape[0]) if layer not in rows]
                assert torch.equal(w.phys2log[rows], chunk.new[rows]), "chunk rows not switched"
                assert torch.equal(w.phys2log[others], before[others]), "rows outside the chunk moved"
                e.lands.append((step, chunk.index, chunk.layers))
                for msg in out:
                    if isinstance(msg, Done):
                        assert msg.ok and msg.epoch == chunk.epoch
                        assert len(e.lands) == e.num_chunks and e.in_flight() == 0, (
                            f"DONE with {len(e.lands)} of {e.num_chunks} chunks landed")
                        e.done = True
                replies += out
        return True, replies

    def _fail(self, e: EpochCopies, chunk: CopyChunk, replies: list[Message]) -> list[Message]:
        e.failed = True
        out = self.w.copy_failed(chunk, "simulated copy error")
        assert [type(m) for m in out] == [Done] and not out[0].ok
        return replies + out

    def check_quiet_after_failure(self, step: int) -> None:
        """After a failed copy, nothing is scheduled at this or any later step."""
        if self.failed:
            for t in range(step, step + 4):
                assert self.w.actions_at(t) == (), f"rank {self.w.rank} scheduled work after failing"

    def expected(self, epoch: int, chunks: list[tuple[int, ...]]) -> tuple[list, list]:
        """The ``(starts, lands)`` a completed epoch must show, for its chunks' layers."""
        s, d = self.epochs[epoch].switch_step, min(self.depth, len(chunks))
        starts = [(s + i, i) for i in range(len(chunks))] if d else []
        lands = [(s + i + d, i, layers) for i, layers in enumerate(chunks)]
        return starts, lands
