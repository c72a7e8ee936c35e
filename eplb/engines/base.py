"""What every engine adapter shares: a copy callback that also switches the engine's maps.

The engine routes tokens with maps derived from the placement ``phys2log`` (``[L, P]``): which
slots hold a logical expert, how many replicas it has, and so on. CUDA graphs captured by the
engine hold pointers to those map tensors, so they are never replaced: at the step a layer's
weights land, that layer's rows are copied into them in place. Building the new rows (the costly
part) happens at prefetch time, before the switch step.
"""

from __future__ import annotations

import os
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
    """A :class:`~eplb.worker_hook.copy_engine.CopyEngine` that copies weights with ``executor``
    and then switches ``maps`` for the layers that landed. Has the executor's pipeline depth and
    passes ``prefetch`` and ``start`` through, so the hook starts transfers a step ahead and the
    maps are prepared with the first prefetch (or start).

    Args:
        executor: copies the expert weights (the engine's own parameters).
        maps: the engine's routing maps.
    """

    def __init__(self, executor: CopyExecutor, maps: EngineMaps) -> None:
        self.executor = executor
        self.maps = maps
        self.pipeline_depth = executor.pipeline_depth
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

    def land(self, epoch: int, layers: list[int], old: torch.Tensor,
             new: torch.Tensor) -> ChunkStats:
        self._prepare(epoch, new)
        stats = self.executor.land(epoch, layers, old, new)
        self.maps.apply(epoch, list(layers))
        return stats


# --- settings the engine plugins read from the environment --------------------------------------

#: Set to ``1`` to let an engine plugin attach (installing eplb alone changes nothing).
ENV_ENABLE = "EPLB_SIDECAR"
#: Optional: longest wait at a promised switch step, seconds (WorkerHook ``hold_timeout_s``).
ENV_HOLD_TIMEOUT = "EPLB_HOLD_TIMEOUT_S"
#: Optional: steps between count reports to the sidecar (WorkerHook ``flush_every``).
ENV_FLUSH_EVERY = "EPLB_FLUSH_EVERY"


class PluginSettingError(RuntimeError):
    """An ``EPLB_*`` setting an engine plugin reads is not usable; the message says which."""


def plugin_enabled() -> bool:
    """Whether ``$EPLB_SIDECAR`` turns the engine plugins on (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(ENV_ENABLE, "").strip().lower() in ("1", "true", "yes", "on")


def env_number(name: str, kind: type[float] | type[int]) -> float | int | None:
    """``$name`` as a ``kind``, or None when unset or empty.

    Raises:
        PluginSettingError: it is set to something else than a number of that kind.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise PluginSettingError(f"{name}={value!r} is not a {kind.__name__}; fix or unset "
                                 "it") from None


def hook_options_from_env() -> dict[str, float | int]:
    """:class:`~eplb.worker_hook.WorkerHook` options set by ``$EPLB_HOLD_TIMEOUT_S`` and
    ``$EPLB_FLUSH_EVERY``."""
    options: dict[str, float | int] = {}
    for name, option, kind in ((ENV_HOLD_TIMEOUT, "hold_timeout_s", float),
                               (ENV_FLUSH_EVERY, "flush_every", int)):
        value = env_number(name, kind)
        if value is not None:
            options[option] = value
    return options
