"""vLLM adapter: the sidecar rebalances a vLLM engine's experts instead of vLLM's own EPLB.

On one EP rank, :class:`VllmAdapter` takes vLLM's own objects:

- the model's ``EplbModelState`` (``vllm.distributed.eplb.eplb_state``): its
  ``physical_to_logical_map`` ``[L, P]``, ``logical_to_physical_map`` ``[L, E, R]`` (padded with
  -1 to ``R`` replicas), ``logical_replica_count`` ``[L, E]`` and ``expert_load_pass`` ``[L, P]``;
- the model's ``expert_weights``: per MoE layer a list of tensors ``[P / G, ...]``;
- the EP process group.

Counting: vLLM's router (``eplb_map_and_record``) already adds one per routed token to the slot it
chose in ``expert_load_pass``, skipping padded rows. :meth:`VllmAdapter.step` hands that buffer to
the :class:`~eplb.worker_hook.WorkerHook` (``count_ids="physical"``) and zeroes it, as vLLM's own
``EplbState.step`` does. Copying: a :class:`~eplb.worker_hook.copy_exec.CopyExecutor` moves vLLM's
own weight tensors in place and :class:`VllmMaps` switches the maps, layer by layer, with rows
built by vLLM's own ``compute_logical_maps``.

vLLM's own rebalancer never runs while the adapter is attached: :func:`register` (the
``vllm.general_plugins`` entry point, active only with ``EPLB_SIDECAR=1``) replaces
``EplbState.step`` so that it steps the adapter instead of vLLM's window and ``rearrange``.
See ``docs/engines/vllm.md``.

vLLM is imported lazily: importing this module (as vLLM's plugin loader does in every process)
imports no vLLM module, and :func:`register` returns at once while the plugin is off.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eplb.engines.base import (MapSwitchingCopy, PluginSettingError, hook_options_from_env,
                               plugin_enabled)
from eplb.worker_hook import WorkerHook
from eplb.worker_hook.copy_exec import CopyExecutor

log = logging.getLogger("eplb.engines.vllm")

#: Optional: write each rank's load (see :meth:`VllmAdapter.export_load`) here at exit;
#: ``{rank}`` in the path is replaced by the EP rank.
ENV_EXPORT_LOAD = "EPLB_EXPORT_LOAD"


class VllmAdapterError(PluginSettingError):
    """vLLM's state cannot be driven by the sidecar; the message says what to change."""


class VllmMaps:
    """vLLM's routing maps of one model, switched layer by layer in place.

    ``prepare`` builds the maps of the new placement with vLLM's ``compute_logical_maps`` and pads
    ``logical_to_physical_map`` with -1 to the live tensor's ``R`` (as vLLM does when it commits
    maps); ``apply`` copies the prepared rows of the landed layers into the live tensors with
    ``copy_``. The live tensors are never rebound: captured CUDA graphs and every MoE layer's
    ``EplbLayerState`` hold views of them.

    Args:
        model_state: vLLM's ``EplbModelState`` of the model.
    """

    def __init__(self, model_state: Any) -> None:
        self.model_state = model_state
        self.num_layers, self.num_physical = model_state.physical_to_logical_map.shape
        _, self.num_experts, self.max_replicas = model_state.logical_to_physical_map.shape
        self._prepared: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare(self, epoch: int, new: torch.Tensor) -> None:
        """Build vLLM's maps for placement ``new`` (``[L, P]``), on the live maps' device.

        Raises:
            VllmAdapterError: ``new`` has an expert with more replicas than vLLM's
                ``logical_to_physical_map`` holds (``R``).
        """
        from vllm.distributed.eplb.eplb_state import compute_logical_maps

        live = self.model_state
        p2l = new.detach().to("cpu", live.physical_to_logical_map.dtype)
        if tuple(p2l.shape) != (self.num_layers, self.num_physical):
            raise VllmAdapterError(f"epoch {epoch}: placement is {list(p2l.shape)}, vLLM serves "
                                   f"[{self.num_layers}, {self.num_physical}]")
        l2p, replica_count = compute_logical_maps(p2l, self.num_experts)
        if l2p.shape[-1] > self.max_replicas:
            raise VllmAdapterError(
                f"epoch {epoch}: an expert has {l2p.shape[-1]} replicas but vLLM's "
                f"logical_to_physical_map holds {self.max_replicas} (num_redundant_experts + 1); "
                "the sidecar's placement does not fit this vLLM instance")
        l2p = torch.nn.functional.pad(l2p, (0, self.max_replicas - l2p.shape[-1]), value=-1)
        self._prepared = (epoch,
                          _to_device(p2l, live.physical_to_logical_map),
                          _to_device(l2p, live.logical_to_physical_map),
                          _to_device(replica_count, live.logical_replica_count))

    def apply(self, epoch: int, layers: list[int]) -> None:
        """Switch ``layers`` (MoE layer indices) to the prepared maps, in place.

        Raises:
            VllmAdapterError: nothing was prepared for ``epoch``.
        """
        if self._prepared is None or self._prepared[0] != epoch:
            have = None if self._prepared is None else self._prepared[0]
            raise VllmAdapterError(f"epoch {epoch}: maps were prepared for epoch {have}; "
                                   "the copy callback must prepare before it applies")
        _, p2l, l2p, replica_count = self._prepared
        live = self.model_state
        for layer in layers:
            live.physical_to_logical_map[layer].copy_(p2l[layer])
            live.logical_to_physical_map[layer].copy_(l2p[layer])
            live.logical_replica_count[layer].copy_(replica_count[layer])


def _to_device(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``src`` (host) as a new tensor on ``like``'s device and dtype. On CUDA the copy starts
    from pinned memory without blocking the host (PyTorch's pinned-memory cache reuses the
    block only after the copy ran)."""
    src = src.to(like.dtype)
    if like.device.type == "cuda":
        return src.pin_memory().to(like.device, non_blocking=True)
    return src.to(like.device).clone()


class VllmAdapter:
    """Drive one vLLM EP rank from the sidecar.

    Args:
        model_state: vLLM's ``EplbModelState`` of the model to rebalance.
        expert_weights: ``model.expert_weights``: per MoE layer a list of tensors
            ``[P / G, ...]``, updated in place.
        rank: this rank's rank in ``group`` (the EP rank); ep_size: ``G``.
        group: the EP process group the copies use (vLLM's ``get_eplb_group().device_group``),
            or None for the default group.
        ranks_per_node: EP ranks per node (rank ``r`` is on node ``r // ranks_per_node``).
        run_dir: the sidecar's run directory (default ``$EPLB_RUN_DIR`` or the sidecar default).
        hook_options: more :class:`~eplb.worker_hook.WorkerHook` keyword arguments
            (``hold_timeout_s``, ``flush_every``, ...).
        copy_options: more :class:`~eplb.worker_hook.copy_exec.CopyExecutor` keyword arguments.
        keep_load_window: also sum each step's counts per logical expert for
            :meth:`export_load` (two more small kernels a step); off by default.

    Raises:
        VllmAdapterError: the state has padded (elastic EP) slots, or shapes disagree.
    """

    def __init__(self, model_state: Any, expert_weights: Sequence[Sequence[torch.Tensor]], *,
                 rank: int, ep_size: int, group: dist.ProcessGroup | None = None,
                 ranks_per_node: int, run_dir: str | Path | None = None,
                 hook_options: dict[str, Any] | None = None,
                 copy_options: dict[str, Any] | None = None,
                 keep_load_window: bool = False) -> None:
        p2l = model_state.physical_to_logical_map
        num_layers, num_physical = p2l.shape
        num_experts = model_state.logical_replica_count.shape[1]
        if len(expert_weights) != num_layers:
            raise VllmAdapterError(f"rank {rank}: expert_weights has {len(expert_weights)} MoE "
                                   f"layers, physical_to_logical_map has {num_layers}")
        placement = p2l.detach().cpu().to(torch.int64)
        if bool((placement < 0).any()):
            raise VllmAdapterError(f"rank {rank}: physical_to_logical_map has unused (-1) slots, "
                                   "as with elastic EP; the sidecar needs every slot in use. "
                                   "Turn off elastic EP or unset EPLB_SIDECAR")
        self.rank, self.ep_size = rank, ep_size
        self.model_state = model_state
        self.num_layers, self.num_experts, self.num_physical = num_layers, num_experts, num_physical
        self.maps = VllmMaps(model_state)
        self.executor = CopyExecutor(rank, ep_size, expert_weights, ranks_per_node, group=group,
                                     **(copy_options or {}))
        self.copy_fn = MapSwitchingCopy(self.executor, self.maps)
        self.hook = WorkerHook(rank, ep_size, num_layers, num_experts, num_physical, placement,
                               copy_fn=self.copy_fn, device=p2l.device, count_ids="physical",
                               node=rank // ranks_per_node, run_dir=run_dir,
                               bytes_per_expert=self.executor.bytes_per_expert,
                               **(hook_options or {}))
        self.steps = 0
        self._closed = False
        # Logical load since the start (or the last reset), [L, E] int64 on the device: each
        # step's slot counts are summed into their expert with the maps that routed them.
        self.keep_load_window = keep_load_window
        self._window = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=p2l.device)
        self._window_from = 0
        self._window_lock = threading.Lock()
        log.info("rank %d: vLLM adapter attached: %d MoE layers, %d experts, %d slots over %d "
                 "ranks, run dir %s", rank, num_layers, num_experts, num_physical, ep_size,
                 self.hook.run_dir)

    def step(self, is_dummy: bool = False) -> None:
        """Call once after each forward pass, where vLLM calls ``EplbState.step``.

        Hands this pass's ``expert_load_pass`` (``[L, P]``, per slot) to the hook and zeroes it;
        a dummy pass's counts are dropped, as vLLM drops them. Then the hook's step: usually
        nothing, at an agreed step a chunk of expert copies and the switch of its layers' maps.

        Raises:
            eplb.worker_hook.HookError: a copy failed or the outcome of a promised epoch never
                came; the engine must stop serving.
        """
        load = self.model_state.expert_load_pass
        if not is_dummy:
            self.hook.add_counts(load)
        if not is_dummy and self.keep_load_window:
            with self._window_lock:
                p2l = self.model_state.physical_to_logical_map
                self._window.scatter_add_(1, p2l.to(torch.int64), load.to(torch.int64))
        load.zero_()
        self.steps += 1
        self.hook.on_step(self.steps)

    def record(self, layer: int, physical_ids: torch.Tensor,
               num_valid: torch.Tensor | None = None) -> None:
        """Count physical slot ids of MoE layer ``layer`` (``[T, K]``, -1 for padding) where an
        engine passes them; ``num_valid``: 0-d device tensor of rows that count. Use it *instead
        of* vLLM's own recording (with ``expert_load_pass`` left at zero), never with it. It does
        not feed :meth:`export_load`."""
        self.hook.record(layer, physical_ids, num_valid)

    def load_window(self) -> tuple[torch.Tensor, int, int]:
        """``([L, E] int64 on the host, from_step, to_step)``: this rank's logical load counted
        since the start or the last :meth:`reset_window`. Waits for the device (not for the
        decode path)."""
        with self._window_lock:
            return self._window.cpu(), self._window_from, self.steps

    def reset_window(self) -> None:
        """Start a new load window at the current step."""
        with self._window_lock:
            self._window.zero_()
            self._window_from = self.steps

    def export_load(self, path: str | Path) -> Path:
        """Write this rank's load window for ``eplbctl plan``: ``logical_count`` ``[L, E]`` (the
        load it reads), ``physical_to_logical_map`` ``[L, P]`` (the placement served now, which
        ``--current`` reads from the same file), the step range and the rank. ``.pt`` or ``.json``.

        The global load is the sum over ranks (see :func:`merge_load_files`).

        Raises:
            ValueError: an unknown file suffix.
            VllmAdapterError: the adapter was made without ``keep_load_window``.
        """
        if not self.keep_load_window:
            raise VllmAdapterError("this adapter keeps no load window; make it with "
                                   "keep_load_window=True (the plugin does with EPLB_EXPORT_LOAD)")
        path = Path(path)
        counts, from_step, to_step = self.load_window()
        data = {"logical_count": counts,
                "physical_to_logical_map": self.model_state.physical_to_logical_map.cpu()
                .to(torch.int64),
                "from_step": from_step, "to_step": to_step, "rank": self.rank}
        _write_load(path, data)
        log.info("rank %d: load of steps [%d, %d) written to %s", self.rank, from_step, to_step,
                 path)
        return path

    def close(self) -> None:
        """Leave the sidecar (the hook says goodbye and stops its thread); idempotent."""
        if not self._closed:
            self._closed = True
            self.hook.close()


def _write_load(path: Path, data: dict[str, Any]) -> None:
    suffix = path.suffix.lower()
    if suffix == ".pt":
        torch.save(data, path)
    elif suffix == ".json":
        path.write_text(json.dumps({k: v.tolist() if isinstance(v, torch.Tensor) else v
                                    for k, v in data.items()}))
    else:
        raise ValueError(f"{path}: use a .pt or .json file name")


def merge_load_files(paths: Sequence[str | Path], output: str | Path) -> Path:
    """Sum the ``logical_count`` of per-rank files written by :meth:`VllmAdapter.export_load`
    into one file ``eplbctl plan --load`` reads (keeping the first file's placement)."""
    from eplb.offline_plan import read_load, read_placement

    if not paths:
        raise ValueError("no load files to merge")
    total = sum(read_load(Path(p)) for p in paths)
    data = {"logical_count": total.to(torch.int64),
            "physical_to_logical_map": read_placement(Path(paths[0]))}
    _write_load(Path(output), data)
    return Path(output)


# --- the vLLM plugin ----------------------------------------------------------------------------

_ADAPTER_ATTR = "_eplb_sidecar_adapter"
_live_adapter: VllmAdapter | None = None  # one per process: one hook per EP rank


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM calls it in every process).

    Without ``EPLB_SIDECAR=1`` it does nothing. With it, it wraps two methods of vLLM's
    ``EplbState`` (once per process):

    - ``add_model``: after vLLM built the model's EPLB state, attach a :class:`VllmAdapter` to
      the first model (the target model; a draft model's experts keep their placement) and keep
      vLLM's recording on every step;
    - ``step``: step the adapter instead of vLLM's load window and ``rearrange`` (the profile
      run still goes to vLLM, which only reserves its communication buffers there).
    """
    if not plugin_enabled():
        return
    from vllm.distributed.eplb.eplb_state import EplbState

    if getattr(EplbState, "_eplb_sidecar_patched", False):
        return
    original_add_model = EplbState.add_model
    original_step = EplbState.step

    def add_model(self: Any, model: Any, model_config: Any, model_name: str | None = None) -> None:
        original_add_model(self, model, model_config, model_name)
        if getattr(self, _ADAPTER_ATTR, None) is None:
            attach(self, next(s for s in self.model_states.values() if s.model is model))
        else:
            log.warning("EPLB_SIDECAR: the sidecar rebalances the first MoE model only; "
                        "%s keeps its initial expert placement", model_name or "a second model")

    def step(self: Any, is_dummy: bool = False, is_profile: bool = False,
             log_stats: bool = False) -> None:
        adapter: VllmAdapter | None = getattr(self, _ADAPTER_ATTR, None)
        if adapter is None or is_profile:
            return original_step(self, is_dummy, is_profile, log_stats)
        for model_state in self.model_states.values():
            if model_state is not adapter.model_state:
                model_state.expert_load_pass.zero_()  # a draft model: counts are not used
        adapter.step(is_dummy=is_dummy)

    EplbState.add_model = add_model
    EplbState.step = step
    EplbState._eplb_sidecar_patched = True
    log.info("EPLB_SIDECAR=1: vLLM's EplbState is driven by the eplb sidecar")


def attach(eplb_state: Any, model_state: Any) -> VllmAdapter:
    """Attach a :class:`VllmAdapter` to vLLM's ``eplb_state`` for ``model_state``; keep vLLM's
    router recording on every step. Returns the adapter (also kept on ``eplb_state``).

    The copies run on vLLM's EPLB process group (same ranks as the EP group, created by vLLM
    apart from it so that weight transfers do not queue behind the forward's collectives); the
    sidecar's run directory is ``$EPLB_RUN_DIR`` (or its default).

    Raises:
        VllmAdapterError: elastic EP is on, or an ``EPLB_*`` setting is not a number.
    """
    from vllm.distributed.parallel_state import get_eplb_group, get_node_count

    parallel_config = eplb_state.parallel_config
    if getattr(parallel_config, "enable_elastic_ep", False):
        raise VllmAdapterError("EPLB_SIDECAR=1 does not support elastic EP "
                               "(--enable-elastic-ep); turn one of them off")
    group = get_eplb_group()
    ep_size, rank = group.world_size, group.rank_in_group
    nodes = max(1, get_node_count())
    ranks_per_node = ep_size // nodes if ep_size % nodes == 0 else ep_size
    hook_options: dict[str, Any] = hook_options_from_env()
    global _live_adapter
    if _live_adapter is not None:  # vLLM built a new EplbState (a model reload): leave first
        log.warning("rank %d: a new EPLB state replaces the one the sidecar drove; its hook "
                    "leaves and a new one joins", _live_adapter.rank)
        _live_adapter.close()
    device = model_state.physical_to_logical_map.device
    # Every EP rank adds the model at the same point, so one collective here is safe. It makes
    # the group's NCCL communicator exist before the first copy (whose P2P batches involve only
    # some ranks, which must not be the first use of a communicator).
    dist.all_reduce(torch.zeros(1, device=device), group=group.device_group)
    adapter = VllmAdapter(model_state, model_state.model.expert_weights, rank=rank,
                          ep_size=ep_size, group=group.device_group,
                          ranks_per_node=ranks_per_node, hook_options=hook_options,
                          keep_load_window=bool(os.environ.get(ENV_EXPORT_LOAD)))
    if eplb_state.should_record_tensor is not None:
        eplb_state.should_record_tensor.fill_(True)  # vLLM's kernel records every step
        eplb_state._should_record_value = True
    setattr(eplb_state, _ADAPTER_ATTR, adapter)
    _live_adapter = adapter
    export = os.environ.get(ENV_EXPORT_LOAD)
    if export:
        atexit.register(_export_at_exit, adapter, export.replace("{rank}", str(rank)))
    atexit.register(adapter.close)
    return adapter


def _export_at_exit(adapter: VllmAdapter, path: str) -> None:
    try:
        adapter.export_load(path)
    except Exception:  # noqa: BLE001 - at exit: say so, do not mask the exit
        log.exception("rank %d: could not write the load to %s", adapter.rank, path)
