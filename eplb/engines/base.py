"""What every engine adapter shares: a copy callback that also switches the engine's maps.

The engine routes tokens with maps derived from the placement ``phys2log`` (``[L, P]``): which
slots hold a logical expert, how many replicas it has, and so on. CUDA graphs captured by the
engine hold pointers to those map tensors, so they are never replaced: at the step a layer's
weights land, that layer's rows are copied into them in place. Building the new rows (the costly
part) happens at prefetch time, before the switch step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from eplb.worker_hook.copy_exec import ChunkStats, CopyExecutor


class EngineMaps(Protocol):
    """An engine's routing maps, updated layer by layer.

    Layers are MoE layer indices ``0..L-1`` (the hook's), not the engine's layer ids.
    """

    def prepare(self, epoch: int, new: torch.Tensor) -> None:
        """Build (off the switch step) the engine's maps for placement ``new`` (``[L, P]``)."""

    def apply(self, epoch: int, layers: list[int]) -> None:
        """Copy the prepared rows of ``layers`` into the live maps, in place (cheap)."""


class MapSwitchingCopy:
    """A :data:`~eplb.worker_hook.hook.CopyFn` that copies weights with ``executor`` and then
    switches ``maps`` for the layers that landed. Passes ``prefetch`` and ``start`` through, so
    the hook starts transfers a step ahead and prepares the maps with the first prefetch.

    Args:
        executor: copies the expert weights (the engine's own parameters).
        maps: the engine's routing maps.
    """

    def __init__(self, executor: CopyExecutor, maps: EngineMaps) -> None:
        self.executor = executor
        self.maps = maps
        self._prepared_epoch: int | None = None  # one epoch has one new placement

    def _prepare(self, epoch: int, new: torch.Tensor) -> None:
        if epoch != self._prepared_epoch:
            self.maps.prepare(epoch, new)
            self._prepared_epoch = epoch

    def prefetch(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> None:
        self._prepare(epoch, new)
        self.executor.prefetch(epoch, layers, old, new)

    def start(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        self._prepare(epoch, new)
        self.executor.start(epoch, layers, old, new)

    def __call__(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> ChunkStats:
        self._prepare(epoch, new)
        stats = self.executor(epoch, layers, old, new)
        self.maps.apply(epoch, list(layers))
        return stats
