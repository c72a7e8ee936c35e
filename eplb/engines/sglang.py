"""SGLang adapter: one EP rank of an SGLang server joins the eplb sidecar.

Given SGLang's own objects on one EP rank, :class:`SGLangAdapter`

- makes a :class:`~eplb.worker_hook.WorkerHook` over the MoE layers only (``L`` of them; SGLang's
  layer ids also count dense layers, so MoE layer ``i`` is engine layer ``moe_layer_ids[i]``),
  counting physical slot ids (``count_ids="physical"``) and starting from the placement the live
  ``ExpertLocationMetadata`` serves;
- counts what SGLang routes: :class:`CountingRecorder` stands in for SGLang's global
  expert-distribution recorder and hands each MoE layer's physical top-k ids (``-1`` on padded
  rows) to :meth:`WorkerHook.record` (``counting="select_experts"``), or, when SGLang's recorder
  already counts per slot (``--expert-distribution-recorder-mode stat``), adds its per-pass
  ``[L, P]`` buffer with :meth:`WorkerHook.add_counts` once per forward pass
  (``counting="stat"``);
- copies SGLang's expert weights (``routed_experts_weights_of_layer``) with a
  :class:`~eplb.worker_hook.copy_exec.CopyExecutor` on the EP process group, and switches SGLang's
  routing maps (:class:`SGLangMaps`) layer by layer, in place, when each layer's weights landed.

:func:`install` builds it from a ``ModelRunner``; :func:`plugin` is the entry point SGLang's
plugin loader (``sglang.srt.plugins``) runs, which hooks ``ModelRunner.initialize`` (install)
and ``ModelRunner.forward`` (one :meth:`WorkerHook.on_step` per forward pass). See
docs/engines/sglang.md.

This module imports SGLang only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist

from eplb.engines.base import (ENV_ENABLE, MapSwitchingCopy, PluginSettingError, env_number,
                               hook_options_from_env, plugin_enabled)
from eplb.worker_hook import HookError, WorkerHook
from eplb.worker_hook.copy_exec import CopyExecutor

log = logging.getLogger("eplb.engines.sglang")

#: ``build(physical_to_logical_map)``: SGLang's ``ExpertLocationMetadata`` for a full
#: ``[num_engine_layers, P]`` map (see :func:`metadata_builder`).
MetadataBuilder = Callable[[torch.Tensor], Any]
Counting = Literal["select_experts", "stat"]

#: Optional: ``select_experts`` (default) or ``stat`` (see :class:`CountingRecorder`).
ENV_COUNTING = "EPLB_SGLANG_COUNTING"
#: Optional: longest wait at start for the sidecar to accept the rank, seconds (default 120).
ENV_JOIN_TIMEOUT = "EPLB_JOIN_TIMEOUT_S"


def _options_from_env() -> tuple[dict[str, Any], float]:
    """WorkerHook options and the join timeout from ``EPLB_*`` variables."""
    join_timeout = env_number(ENV_JOIN_TIMEOUT, float)
    return hook_options_from_env(), 120.0 if join_timeout is None else join_timeout


class SGLangAdapterError(PluginSettingError):
    """SGLang is configured in a way the adapter cannot serve; the message says what to change."""


def per_layer_fields(metadata: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of an ``ExpertLocationMetadata`` that hold one row per engine layer
    (first dimension = number of engine layers), by field name: today
    ``physical_to_logical_map`` (``[N, P]``) and its CPU copy, ``logical_to_all_physical_map``
    (``[N, E, P]``) and its CPU copy, ``logical_to_all_physical_map_num_valid`` (``[N, E]``) and
    ``logical_to_rank_dispatch_physical_map`` (``[N, E]``, None unless static dispatch)."""
    num_engine_layers = metadata.physical_to_logical_map.shape[0]
    out = {}
    for field in dataclasses.fields(metadata):
        value = getattr(metadata, field.name)
        if isinstance(value, torch.Tensor) and value.dim() >= 1 \
                and value.shape[0] == num_engine_layers:
            out[field.name] = value
    return out


def metadata_builder(model_config: Any, moe_ep_rank: int) -> MetadataBuilder:
    """SGLang's own constructor for a placement: ``ExpertLocationMetadata.init_by_mapping``
    with this rank's ``moe_ep_rank`` (the rank-dependent fields depend on it)."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    def build(physical_to_logical_map: torch.Tensor) -> Any:
        return ExpertLocationMetadata.init_by_mapping(model_config, physical_to_logical_map,
                                                      moe_ep_rank=moe_ep_rank)
    return build


class SGLangMaps:
    """SGLang's routing maps (:class:`~eplb.engines.base.EngineMaps`), updated in place.

    Args:
        live: the ``ExpertLocationMetadata`` SGLang routes with (its tensors are captured by
            CUDA graphs and by each layer's ``ExpertLocationDispatchInfo``: never rebound).
        moe_layer_ids: engine layer id of each MoE layer, ``[L]``, increasing.
        build: SGLang's constructor for a full ``[N, P]`` map (:func:`metadata_builder`).
        rank: for log lines.
        build_timeout_s: longest wait in :meth:`apply` for SGLang's constructor.
    """

    def __init__(self, live: Any, moe_layer_ids: Sequence[int], build: MetadataBuilder,
                 rank: int = 0, build_timeout_s: float = 60.0) -> None:
        self.live = live
        self.moe_layer_ids = [int(x) for x in moe_layer_ids]
        self.build = build
        self.rank = rank
        self.field_names = sorted(per_layer_fields(live))
        self.build_timeout_s = build_timeout_s
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"eplb-maps-{rank}")
        self._prepared: Future[dict[str, torch.Tensor]] | None = None
        self._prepared_epoch: int | None = None

    def prepare(self, epoch: int, new: torch.Tensor) -> None:
        """Start building SGLang's metadata for MoE placement ``new`` (``[L, P]``) embedded into
        every engine layer (dense layers keep their rows). SGLang's constructor loops in Python
        over layers and experts, so it runs on a thread of its own; :meth:`apply` waits for it
        (it is long done by then: the first layers land a step or more after the prefetch)."""
        if new.shape != (len(self.moe_layer_ids), self.live.physical_to_logical_map_cpu.shape[1]):
            raise ValueError(f"rank {self.rank} epoch {epoch}: placement is {list(new.shape)}, "
                             f"expected [{len(self.moe_layer_ids)}, "
                             f"{self.live.physical_to_logical_map_cpu.shape[1]}]")
        device = self.live.physical_to_logical_map.device
        cuda_index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self._prepared_epoch = epoch
        self._prepared = self._builder.submit(self._build, epoch, new.detach().cpu().clone(),
                                              cuda_index)

    def _build(self, epoch: int, new: torch.Tensor,
               cuda_index: int | None) -> dict[str, torch.Tensor]:
        if cuda_index is not None:  # a new thread starts on GPU 0; SGLang builds on "cuda"
            torch.cuda.set_device(cuda_index)
        live_map = self.live.physical_to_logical_map_cpu
        full = live_map.clone()
        full[self.moe_layer_ids] = new.to(dtype=full.dtype)
        prepared = self.build(full)
        tensors = per_layer_fields(prepared)
        if sorted(tensors) != self.field_names or prepared.ep_size != self.live.ep_size:
            raise SGLangAdapterError(
                f"rank {self.rank} epoch {epoch}: SGLang built metadata with fields "
                f"{sorted(tensors)} (ep_size {prepared.ep_size}); the live one has "
                f"{self.field_names} (ep_size {self.live.ep_size}). Were SGLang's flags "
                "(--ep-dispatch-algorithm, --ep-size) changed after the adapter started?")
        for name, tensor in tensors.items():
            live = getattr(self.live, name)
            if tensor.shape != live.shape or tensor.dtype != live.dtype:
                raise SGLangAdapterError(
                    f"rank {self.rank} epoch {epoch}: SGLang built {name} as "
                    f"{tensor.dtype}{list(tensor.shape)}, the live one is "
                    f"{live.dtype}{list(live.shape)}; cannot update it in place")
            tensors[name] = tensor.to(live.device)
        if any(t.is_cuda for t in tensors.values()):
            torch.cuda.current_stream().synchronize()  # this thread's work is done before apply
        log.info("rank %d epoch %d: SGLang expert-location metadata built for the new placement",
                 self.rank, epoch)
        return tensors

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)

    def apply(self, epoch: int, layers: list[int]) -> None:
        """Copy the prepared rows of MoE ``layers`` into every per-layer field of the live
        metadata, in place (``live[engine_layer].copy_(prepared[engine_layer])``)."""
        if self._prepared is None or self._prepared_epoch != epoch:
            raise RuntimeError(f"rank {self.rank}: maps of epoch {epoch} were never prepared "
                               f"(prepared: {self._prepared_epoch})")
        prepared = self._prepared.result(timeout=self.build_timeout_s)
        for layer in layers:
            engine_layer = self.moe_layer_ids[layer]
            for name, rows in prepared.items():
                getattr(self.live, name)[engine_layer].copy_(rows[engine_layer], non_blocking=True)


class CountingRecorder:
    """Stands in for SGLang's global expert-distribution recorder and counts for the hook.

    SGLang's models wrap each layer in ``recorder.with_current_layer(layer_id)`` and its top-k
    selection calls ``recorder.on_select_experts(topk_ids=...)`` with the physical ids after
    routing (``-1`` on padded rows); both go through here to the wrapped recorder, so SGLang's
    own statistics are unchanged. Everything else is passed to the wrapped recorder.

    Args:
        inner: SGLang's recorder (the one it made; a no-op one when recording is off).
        hook: the rank's hook (``count_ids="physical"``).
        moe_layer_ids: engine layer id of each MoE layer, ``[L]``.
        counting: ``"select_experts"``: :meth:`WorkerHook.record` per MoE layer and forward
            pass (also inside captured CUDA graphs); ``"stat"``: SGLang's recorder (mode
            ``stat``) counts per slot already, so after each forward pass its per-pass buffer
            rows of the MoE layers (``[L, P]``) go to :meth:`WorkerHook.add_counts`.
    """

    def __init__(self, inner: Any, hook: WorkerHook, moe_layer_ids: Sequence[int],
                 counting: Counting = "select_experts") -> None:
        if counting not in ("select_experts", "stat"):
            raise ValueError(f"counting must be 'select_experts' or 'stat', not {counting!r}")
        self.inner = inner
        self.hook = hook
        self.counting = counting
        self.moe_layer_ids = [int(x) for x in moe_layer_ids]
        self._moe_index = {engine: i for i, engine in enumerate(self.moe_layer_ids)}
        self._layer: int | None = None
        self._missed_passes = 0

    @contextmanager
    def with_current_layer(self, layer_idx: int) -> Iterator[None]:
        previous, self._layer = self._layer, layer_idx
        try:
            with self.inner.with_current_layer(layer_idx):
                yield
        finally:
            self._layer = previous

    def on_select_experts(self, topk_ids: torch.Tensor) -> None:
        if self.counting == "select_experts":
            moe_layer = self._moe_index.get(self._layer)
            if moe_layer is not None:
                self.hook.record(moe_layer, topk_ids)
        self.inner.on_select_experts(topk_ids=topk_ids)

    @contextmanager
    def with_forward_pass(self, forward_pass_id: int, forward_batch: Any) -> Iterator[dict]:
        with self.inner.with_forward_pass(forward_pass_id, forward_batch) as outputs:
            yield outputs
        if self.counting == "stat":
            self._add_pass_counts()

    def _add_pass_counts(self) -> None:
        """Hand SGLang's counts of the pass that just ended (``[L, P]`` int32) to the hook."""
        rows = [self.inner.get_current_pass_count_buffer(layer) for layer in self.moe_layer_ids]
        if any(row is None for row in rows):  # not recording, or this pass was not recorded
            self._missed_passes += 1
            if self._missed_passes in (1, 1000):
                log.warning("rank %d: SGLang's expert-distribution recorder kept no counts for a "
                            "forward pass (%d so far); is it recording? (counting='stat' needs "
                            "--expert-distribution-recorder-mode stat)", self.hook.rank,
                            self._missed_passes)
            return
        self.hook.add_counts(torch.stack(rows))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class SGLangAdapter:
    """One EP rank of SGLang in the eplb cluster: hook, counting, copies and map switches.

    Args:
        metadata: the live ``ExpertLocationMetadata`` (``[N, P]`` maps over ``N`` engine layers).
        weights_of_layer: ``{engine layer id: [tensor, ...]}`` for the MoE layers only, each
            tensor ``[P / ep_size, ...]`` (SGLang's ``model.routed_experts_weights_of_layer``).
            Updated in place.
        ep_rank, ep_size: this rank in the EP group and its size.
        build_metadata: SGLang's constructor for a full map (:func:`metadata_builder`).
        ranks_per_node: EP ranks per node (same-node sources are preferred).
        ep_group: the EP process group (ranks ``0..ep_size-1`` = EP ranks); None: default group.
        counting: see :class:`CountingRecorder`.
        run_dir, node, hook_options: passed to :class:`WorkerHook` (``node`` defaults to
            ``ep_rank // ranks_per_node``).
        copy_options: passed to :class:`CopyExecutor` (``timeout_s``, ``bytes_budget``, ...).
    """

    def __init__(self, metadata: Any, weights_of_layer: Mapping[int, Sequence[torch.Tensor]],
                 ep_rank: int, ep_size: int, build_metadata: MetadataBuilder,
                 ranks_per_node: int, ep_group: dist.ProcessGroup | None = None,
                 counting: Counting = "select_experts", run_dir: str | os.PathLike | None = None,
                 node: int | None = None, hook_options: Mapping[str, Any] | None = None,
                 copy_options: Mapping[str, Any] | None = None) -> None:
        self.metadata = metadata
        self.moe_layer_ids = sorted(int(x) for x in weights_of_layer)
        if not self.moe_layer_ids:
            raise SGLangAdapterError("the model has no MoE layer (routed_experts_weights_of_layer "
                                     "is empty); there is nothing to rebalance")
        num_engine_layers = metadata.num_layers
        if self.moe_layer_ids[-1] >= num_engine_layers:
            raise SGLangAdapterError(f"MoE layer ids {self.moe_layer_ids} exceed the "
                                     f"{num_engine_layers} layers of the expert-location metadata")
        if metadata.ep_size != ep_size:
            raise SGLangAdapterError(f"expert-location metadata has ep_size {metadata.ep_size}, "
                                     f"the EP group {ep_size}")
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.num_experts = metadata.num_logical_experts
        self.num_physical = metadata.num_physical_experts
        weights = [list(weights_of_layer[layer]) for layer in self.moe_layer_ids]
        self.executor = CopyExecutor(ep_rank, ep_size, weights, ranks_per_node, group=ep_group,
                                     **dict(copy_options or {}))
        self.maps = SGLangMaps(metadata, self.moe_layer_ids, build_metadata, rank=ep_rank)
        self.copy = MapSwitchingCopy(self.executor, self.maps)
        phys2log = metadata.physical_to_logical_map_cpu[self.moe_layer_ids].clone()
        self.hook = WorkerHook(ep_rank, ep_size, len(self.moe_layer_ids), self.num_experts,
                               self.num_physical, phys2log, copy_fn=self.copy,
                               device=weights[0][0].device,
                               node=ep_rank // ranks_per_node if node is None else node,
                               run_dir=run_dir, bytes_per_expert=self.executor.bytes_per_expert,
                               count_ids="physical", **dict(hook_options or {}))
        self.counting: Counting = counting
        self.recorder: CountingRecorder | None = None
        log.info("rank %d: eplb adapter over %d MoE layers (engine layers %s), E=%d, P=%d, "
                 "counting=%s", ep_rank, len(self.moe_layer_ids), self.moe_layer_ids,
                 self.num_experts, self.num_physical, counting)

    def wrap_recorder(self, inner: Any) -> CountingRecorder:
        """A :class:`CountingRecorder` around SGLang's recorder ``inner``; set it as SGLang's
        global recorder (``set_global_expert_distribution_recorder``)."""
        if self.counting == "stat" and not inner.recording:
            inner.start_record()  # its per-pass buffer is kept only while recording
        self.recorder = CountingRecorder(inner, self.hook, self.moe_layer_ids, self.counting)
        return self.recorder

    def on_step(self, step: int) -> None:
        """Before forward pass ``step`` (the same number on every EP rank)."""
        self.hook.on_step(step)

    def close(self) -> None:
        self.hook.close()
        self.maps.close()


# --- SGLang's ModelRunner: install, per-step call, plugin entry point ---------------------------


def _check_server_flags(rank: int) -> None:
    from sglang.srt.runtime_context import get_exec, get_parallel

    parallel = get_parallel()
    if parallel.moe_tp_size != 1 or parallel.moe_dp_size != 1:
        raise SGLangAdapterError(
            f"rank {rank}: the MoE layers are split {parallel.moe_tp_size}-way by tensor "
            f"parallelism and {parallel.moe_dp_size}-way by MoE data parallelism; the adapter "
            "needs one EP group with one process per EP rank: use --ep-size equal to --tp-size "
            "and no --moe-dp-size")
    moe = get_exec().moe
    if moe.ep_dispatch_algorithm not in ("static", "dynamic"):
        raise SGLangAdapterError(
            f"rank {rank}: SGLang routes without a logical->physical map "
            f"(--ep-dispatch-algorithm {moe.ep_dispatch_algorithm}), so moved experts would not "
            "be used. Start SGLang with --ep-num-redundant-experts N and "
            "--ep-dispatch-algorithm dynamic (no --moe-a2a-backend) or static (with one).")
    if moe.elastic_ep_backend is not None:
        raise SGLangAdapterError(f"rank {rank}: elastic EP (--elastic-ep-backend) rebuilds the "
                                 "expert-location metadata; the eplb adapter does not support it")


def _disable_sglang_rebalancer(model_runner: Any, rank: int) -> None:
    manager = getattr(model_runner, "eplb_manager", None)
    if manager is not None:
        manager.disable_rebalance("the eplb sidecar owns rebalancing on this server")
        log.warning("rank %d: SGLang's own EPLB (--enable-eplb) is on; its rebalancing is now "
                    "disabled (EPLBManager.disable_rebalance). Start without --enable-eplb to "
                    "save its recording work.", rank)


def install(model_runner: Any, *, counting: Counting | None = None,
            run_dir: str | os.PathLike | None = None,
            join_timeout_s: float | None = None) -> SGLangAdapter | None:
    """Join the eplb sidecar from an initialized SGLang ``ModelRunner`` (after its model is
    loaded, before its CUDA graphs are captured). Returns None for a draft (speculative) model
    runner. Waits until the sidecar accepted the rank (``join_timeout_s``, default
    ``$EPLB_JOIN_TIMEOUT_S`` or 120 s). ``$EPLB_HOLD_TIMEOUT_S`` and ``$EPLB_FLUSH_EVERY`` set
    the hook's ``hold_timeout_s`` and ``flush_every``; the sidecar's run directory is
    ``run_dir`` or ``$EPLB_RUN_DIR`` (or its default).

    Raises:
        SGLangAdapterError: SGLang's flags do not allow it (the message says which to set).
        HookError: the sidecar did not accept the rank in time.
    """
    if getattr(model_runner, "is_draft_worker", False):
        return None
    from sglang.srt.eplb.expert_distribution import (get_global_expert_distribution_recorder,
                                                     set_global_expert_distribution_recorder)
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata
    from sglang.srt.runtime_context import get_exec, get_parallel

    parallel = get_parallel()
    rank, ep_size = parallel.moe_ep_rank, parallel.moe_ep_size
    _check_server_flags(rank)
    metadata = get_global_expert_location_metadata()
    if metadata is None:
        raise SGLangAdapterError(f"rank {rank}: SGLang made no expert-location metadata; the "
                                 "model does not support EPLB (it has no "
                                 "get_model_config_for_expert_location)")
    weights = getattr(model_runner.model, "routed_experts_weights_of_layer", None)
    if not weights:
        raise SGLangAdapterError(f"rank {rank}: the model has no routed_experts_weights_of_layer; "
                                 "SGLang's EPLB does not support it either")
    hook_options, env_join_timeout = _options_from_env()
    counting = counting or os.environ.get(ENV_COUNTING) or "select_experts"
    if counting == "stat" and get_exec().moe.expert_distribution_recorder_mode != "stat":
        raise SGLangAdapterError(f"rank {rank}: {ENV_COUNTING}=stat needs "
                                 "--expert-distribution-recorder-mode stat")
    _disable_sglang_rebalancer(model_runner, rank)
    adapter = SGLangAdapter(
        metadata, weights, rank, ep_size,
        metadata_builder(model_runner.model_config, rank),
        ranks_per_node=max(1, ep_size // max(1, parallel.nnodes)),
        ep_group=parallel.moe_ep_group.device_group, counting=counting, run_dir=run_dir,
        hook_options=hook_options)
    set_global_expert_distribution_recorder(
        adapter.wrap_recorder(get_global_expert_distribution_recorder()))
    try:
        adapter.hook.wait_joined(env_join_timeout if join_timeout_s is None else join_timeout_s)
    except HookError:
        adapter.close()
        raise
    model_runner._eplb_adapter = adapter
    return adapter


def before_forward(model_runner: Any) -> None:
    """Per forward pass, before it runs: keep the counting recorder in place (SGLang makes a new
    recorder on some events) and call the hook with this pass's number (``forward_pass_id + 1``,
    the number ``ModelRunner.forward`` gives it; EP ranks run forward passes in lockstep, as
    SGLang's own EPLB assumes)."""
    adapter: SGLangAdapter | None = getattr(model_runner, "_eplb_adapter", None)
    if adapter is None:
        return
    expert_distribution = sys.modules["sglang.srt.eplb.expert_distribution"]  # imported by install
    current = expert_distribution.get_global_expert_distribution_recorder()
    if current is not adapter.recorder:
        log.warning("rank %d: SGLang replaced its expert-distribution recorder; counting through "
                    "the new one", adapter.ep_rank)
        expert_distribution.set_global_expert_distribution_recorder(adapter.wrap_recorder(current))
    adapter.on_step(model_runner.forward_pass_id + 1)


def _after_initialize(result: Any, model_runner: Any, *args: Any, **kwargs: Any) -> None:
    install(model_runner)


def _around_forward(original: Callable, model_runner: Any, *args: Any, **kwargs: Any) -> Any:
    before_forward(model_runner)
    return original(model_runner, *args, **kwargs)


#: The ModelRunner methods :func:`plugin` hooks, with SGLang's hook types.
HOOK_TARGETS = {
    "sglang.srt.model_executor.model_runner.ModelRunner.initialize": ("AFTER", _after_initialize),
    "sglang.srt.model_executor.model_runner.ModelRunner.forward": ("AROUND", _around_forward),
}


def plugin() -> None:
    """SGLang general plugin (entry point group ``sglang.srt.plugins``, name ``eplb``): when
    ``$EPLB_SIDECAR`` is ``1``, registers :data:`HOOK_TARGETS` with SGLang's ``HookRegistry``;
    otherwise does nothing."""
    if not plugin_enabled():
        log.debug("eplb SGLang plugin loaded but off (set %s=1 to turn it on)", ENV_ENABLE)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, (kind, fn) in HOOK_TARGETS.items():
        HookRegistry.register(target, fn, HookType[kind])
    log.info("eplb SGLang plugin: hooked %s", ", ".join(HOOK_TARGETS))


__all__ = ["SGLangAdapter", "SGLangMaps", "CountingRecorder", "SGLangAdapterError", "install",
           "before_forward", "plugin", "metadata_builder", "per_layer_fields", "HookError"]
