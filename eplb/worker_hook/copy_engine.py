"""What the worker hook asks of an engine's weight copies: the :class:`CopyEngine` protocol, and
adapters for a plain ``copy_fn`` callable and for none.

The hook only carries out what :class:`~eplb.worker_hook.agreement.WorkerAgreement` schedules
(``Prefetch``, ``StartChunk``, ``LandChunk`` actions); the engine only moves bytes. Each side
keeps its own state: the agreement knows which chunks are scheduled, started and landed (chunk
indices), the engine knows what it holds for them (buffers, transfers in flight). Neither asks
the other.

Every method takes ``(epoch, layers, old, new)``: the rebalance epoch, the MoE layer indices of
one chunk (in copy order, the same on every rank), and the full ``[L, P]`` placements before and
after the switch (only the rows of ``layers`` matter).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

#: ``copy_fn(epoch, layers, old, new)``: make every local slot of ``layers`` hold its expert under
#: ``new``, in one call. May return a stats object with ``bytes_received``; raising marks the rank
#: unsafe. :func:`as_copy_engine` wraps one in :class:`OneCallCopy`.
CopyFn = Callable[[int, list[int], torch.Tensor, torch.Tensor], object]


@runtime_checkable
class CopyEngine(Protocol):
    """An engine's weight copies, driven by the hook at agreed steps only.

    Attributes:
        pipeline_depth: steps between the start of a chunk's transfers and its landing. ``0``:
            :meth:`start` is never called and :meth:`land` copies chunk ``i`` in one call at step
            ``S + i``. ``1`` (:class:`~eplb.worker_hook.copy_exec.CopyExecutor`): chunk ``i``
            starts at ``S + i`` (its transfers run beside that step) and lands at ``S + i + 1``;
            the last of ``n`` chunks lands at ``S + n``. At most ``pipeline_depth`` chunks are
            started and not landed at any time.
    """

    pipeline_depth: int

    def prefetch(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> None:
        """Prepare a chunk that will come (pack what this rank sends, ...), off the agreed
        steps: once the epoch committed and before S for the first chunk; with depth 0, right
        after each landing for the next chunk. Must not wait for the device; its errors are
        logged and ignored (the chunk is then prepared when it starts or lands)."""

    def start(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        """Issue a chunk's transfers and return without waiting; no weight changes yet. Called
        at the same step on every rank. Raising marks the rank unsafe."""

    def land(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> object:
        """Finish a chunk (what :meth:`start` issued, or all of it with depth 0): afterwards
        every local slot of ``layers`` holds its expert under ``new``. Returns a stats object
        (``bytes_received`` is read if present). Raising marks the rank unsafe."""


class OneCallCopy:
    """A :class:`CopyEngine` around a plain ``copy_fn`` (:data:`CopyFn`): depth 0, no
    prefetch, each chunk copied in one call at its step."""

    pipeline_depth = 0

    def __init__(self, copy_fn: CopyFn) -> None:
        self.copy_fn = copy_fn

    def prefetch(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> None:
        pass

    def start(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        raise RuntimeError("a one-call copy_fn has no start; depth 0 never schedules one")

    def land(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> object:
        return self.copy_fn(epoch, layers, old, new)


class NoCopy(OneCallCopy):
    """The engine of a hook given no ``copy_fn``: its agreement refuses plans that move layers,
    so no chunk ever reaches it; if one did, the copy fails (the rank stops)."""

    def __init__(self) -> None:
        super().__init__(self._refuse)

    @staticmethod
    def _refuse(epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> object:
        raise RuntimeError("no copy_fn was given to WorkerHook, so weights cannot move")


def as_copy_engine(copy_fn: CopyEngine | CopyFn | None) -> CopyEngine:
    """``copy_fn`` itself when it is a :class:`CopyEngine`, a plain callable wrapped in
    :class:`OneCallCopy`, None as :class:`NoCopy`.

    Raises:
        TypeError: ``copy_fn`` has a ``prefetch`` or ``start`` method but is no
            :class:`CopyEngine` (those methods were once looked up one by one; now the object
            declares ``pipeline_depth`` and ``land``, or it would silently lose them).
    """
    if copy_fn is None:
        return NoCopy()
    if isinstance(copy_fn, CopyEngine):
        return copy_fn
    partial = [name for name in ("prefetch", "start") if hasattr(copy_fn, name)]
    if partial:
        raise TypeError(f"copy_fn {type(copy_fn).__name__} has {' and '.join(partial)} but is no "
                        "CopyEngine: give it pipeline_depth and land(epoch, layers, old, new) too "
                        "(see eplb.worker_hook.copy_engine)")
    if not callable(copy_fn):
        raise TypeError(f"copy_fn must be a CopyEngine or a callable, not {type(copy_fn).__name__}")
    return OneCallCopy(copy_fn)
