"""One EP rank of a small MoE model inside vLLM's own EPLB machinery, with the eplb plugin on
(started by ``tests/engines/test_vllm.py``).

What is vLLM's own code here: the process groups (``init_distributed_environment`` and
``initialize_model_parallel`` on gloo, giving the EP and EPLB groups), ``EplbState`` with
``add_model`` (initial placement, maps, ``expert_load_pass``, recording switches, the per-layer
``EplbLayerState`` views), ``prepare_forward`` and ``step`` as the model runner calls them, the
``MixtureOfExperts.set_eplb_state`` that gathers ``expert_weights``, and at the end
``_commit_eplb_maps`` and ``rearrange_expert_weights_inplace`` as references. The plugin is
:func:`eplb.engines.vllm.register`, as vLLM's plugin loader would call it.

What stands in for a GPU engine: the model (3 MoE layers of small tensors whose values name
their layer and expert) and the router's recording. vLLM's Triton ``eplb_map_and_record`` kernel
cannot run on CPU (vLLM's CPU fallback returns the ids unmapped), so ``route_and_record`` does
what it does through the same ``EplbLayerState`` views: logical id -> a replica's slot, one count
per routed row below the unpadded-token count, only while ``should_record_tensor`` is set.

After the test's stop file appears the ranks leave their loop together and check:

- maps: equal to what vLLM's ``_commit_eplb_maps`` makes of the old state and the new placement,
  in the same tensors (never rebound);
- weights: equal to what vLLM's ``rearrange_expert_weights_inplace`` makes of the old weights;
- counts: every report the hook sent equals the passes it covers, ``expert_load_pass`` turned
  logical with the maps that routed it (dummy passes dropped);
- vLLM's own ``rearrange`` never ran.

It writes what it found to ``--result`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import vllm_stubs  # noqa: E402 - before vLLM: see the module's docstring

vllm_stubs.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import vllm.config.vllm as vllm_config_module  # noqa: E402
import vllm.distributed.eplb.eplb_state as vllm_eplb_state  # noqa: E402
from vllm.config import ParallelConfig  # noqa: E402
from vllm.config.parallel import EPLBConfig  # noqa: E402
from vllm.distributed import parallel_state  # noqa: E402
from vllm.distributed.eplb.eplb_communicator import TorchDistNcclEplbCommunicator  # noqa: E402
from vllm.distributed.eplb.eplb_state import (EplbLayerState, EplbState,  # noqa: E402
                                              _commit_eplb_maps)
from vllm.distributed.eplb.rebalance_execute import (  # noqa: E402
    rearrange_expert_weights_inplace)
from vllm.model_executor.models.interfaces import MixtureOfExperts  # noqa: E402

from eplb.engines import vllm as eplb_vllm  # noqa: E402
from eplb.engines.base import ENV_ENABLE, ENV_FLUSH_EVERY  # noqa: E402
from eplb.proto import Counts  # noqa: E402


class TinyMoeLayer:
    """One MoE layer as vLLM's EPLB sees it: its expert weights and vLLM's ``EplbLayerState``."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        self.weights = weights
        self.eplb_state = EplbLayerState()

    def get_expert_weights(self) -> list[torch.Tensor]:
        return self.weights

    def set_eplb_state(self, moe_layer_idx: int, expert_load_view: torch.Tensor,
                       logical_to_physical_map: torch.Tensor,
                       logical_replica_count: torch.Tensor) -> None:
        self.eplb_state.set_layer_state(moe_layer_idx, expert_load_view,
                                        logical_to_physical_map, logical_replica_count)


class TinyMoeModel(MixtureOfExperts):
    """A model with vLLM's ``MixtureOfExperts`` interface (its own ``set_eplb_state``)."""

    def __init__(self, layers: list[TinyMoeLayer], num_experts: int, num_physical: int,
                 ep_size: int) -> None:
        self.moe_layers = layers
        self.expert_weights = []
        self.num_moe_layers = len(layers)
        self.num_expert_groups = 1
        self.num_logical_experts = self.num_routed_experts = num_experts
        self.num_physical_experts = num_physical
        self.num_local_physical_experts = num_physical // ep_size
        self.num_shared_experts = 0
        self.num_redundant_experts = num_physical - num_experts


def expert_weights_for(p2l: torch.Tensor, rank: int, world: int) -> list[list[torch.Tensor]]:
    """Per layer ``[w_in float32 [S, 4, 6], w_scale bfloat16 [S, 2]]`` for this rank's ``S``
    slots of placement ``p2l`` (``[L, P]``); the values name (layer, logical expert) exactly."""
    per_rank = p2l.shape[1] // world
    weights = []
    for layer in range(p2l.shape[0]):
        experts = p2l[layer, rank * per_rank:(rank + 1) * per_rank].to(torch.float32)
        w_in = (layer * 1000 + experts * 10).view(-1, 1, 1) + torch.arange(24.).view(1, 4, 6)
        w_scale = (layer * 16 + experts).view(-1, 1).repeat(1, 2).to(torch.bfloat16)
        weights.append([w_in.contiguous(), w_scale.contiguous()])
    return weights


def route_and_record(layers: list[TinyMoeLayer], step: int, rank: int, num_tokens: int,
                     top_k: int) -> None:
    """Route ``num_tokens`` rows per layer (skewed: expert 0 is hot) through each layer's
    ``EplbLayerState`` and record as vLLM's router kernel does."""
    gen = torch.Generator().manual_seed(step * 131 + rank)
    for layer in layers:
        state = layer.eplb_state
        num_experts = state.logical_replica_count.shape[0]
        weights = torch.arange(num_experts, 0, -1, dtype=torch.float64) ** 3
        logical = torch.multinomial(weights, num_tokens * top_k, replacement=True,
                                    generator=gen).view(num_tokens, top_k)
        token = torch.arange(num_tokens).view(-1, 1).expand(-1, top_k)
        replica = token % state.logical_replica_count[logical]
        physical = state.logical_to_physical_map[logical, replica]  # [T, K] slot ids
        if not bool(state.should_record_tensor):
            continue
        counted = physical[:int(state.num_unpadded_tokens_tensors[0])].reshape(-1)
        state.expert_load_view.index_add_(
            0, counted, torch.ones_like(counted, dtype=state.expert_load_view.dtype))


def init_vllm_groups(rank: int, world: int, dist_init: str) -> ParallelConfig:
    """vLLM's process groups on gloo: TP = EP = ``world``, EPLB group beside it."""
    config = ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=True,
                            eplb_config=EPLBConfig(use_async=False, communicator="torch_gloo"))
    # vLLM's config validation refuses EPLB off CUDA/ROCm/XPU (and a full VllmConfig wants a
    # platform this machine lacks); the groups only read these fields.
    config.enable_eplb = True
    vllm_config_module._current_vllm_config = SimpleNamespace(
        parallel_config=config, model_config=None, engram_config=None)
    parallel_state.init_distributed_environment(world_size=world, rank=rank,
                                                distributed_init_method=dist_init,
                                                local_rank=rank, backend="gloo")
    parallel_state.initialize_model_parallel(world, 1, backend="gloo")
    return config


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dist-init", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--export", required=True, help="where export_load writes (.pt)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--physical", type=int, default=12)
    p.add_argument("--max-steps", type=int, default=20000)
    args = p.parse_args()
    rank, world = args.rank, args.world_size
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank={rank} %(name)s: %(message)s")
    torch.set_num_threads(1)
    # vLLM finds no accelerator platform here yet reports pinned memory as available; its map
    # commit would pin host tensors, which CPU-only torch refuses.
    vllm_eplb_state.PIN_MEMORY = False
    result: dict = {"rank": rank, "ok": False}
    adapter = None
    try:
        parallel_config = init_vllm_groups(rank, world, args.dist_init)

        def rearrange(self, *a, **k):
            raise AssertionError("vLLM's own rearrange ran while the sidecar drives EPLB")

        EplbState.rearrange = rearrange
        os.environ.update({ENV_ENABLE: "1", "EPLB_RUN_DIR": args.run_dir,
                           ENV_FLUSH_EVERY: "4",
                           eplb_vllm.ENV_EXPORT_LOAD: args.export})  # keeps the load window
        eplb_vllm.register()  # what vLLM's plugin loader calls in each worker

        initial = torch.tensor(EplbState.build_initial_global_physical_to_logical_map(
            args.experts, args.physical - args.experts)).expand(args.layers, -1)
        layers = [TinyMoeLayer(w) for w in expert_weights_for(initial, rank, world)]
        model = TinyMoeModel(layers, args.experts, args.physical, world)
        model_config = SimpleNamespace(model="tiny-moe",
                                       compile_factors=lambda: {"model": "tiny-moe"})
        eplb_state = EplbState(parallel_config, torch.device("cpu"))
        eplb_state.add_model(model, model_config)  # the plugin attaches here
        model_state = next(iter(eplb_state.model_states.values()))
        adapter = getattr(eplb_state, eplb_vllm._ADAPTER_ATTR)
        # vLLM's own state before anything moved, for its own updaters at the end.
        old = dataclasses.replace(
            model_state,
            physical_to_logical_map=model_state.physical_to_logical_map.clone(),
            logical_to_physical_map=model_state.logical_to_physical_map.clone(),
            logical_replica_count=model_state.logical_replica_count.clone())
        old_p2l = old.physical_to_logical_map.clone()  # _commit_eplb_maps updates `old`
        old_weights = [[w.clone() for w in layer] for layer in model.expert_weights]
        live_maps = (model_state.physical_to_logical_map, model_state.logical_to_physical_map,
                     model_state.logical_replica_count)
        pointers = [t.data_ptr() for t in live_maps]

        # What the hook reports to the sidecar, seen where it leaves (test-only tap).
        reported: list[dict] = []
        send = adapter.hook._send

        def tap(sock, msg):
            if isinstance(msg, Counts):
                reported.append({"from": msg.from_step, "to": msg.to_step,
                                 "counts": msg.counts.tolist()})
            send(sock, msg)

        adapter.hook._send = tap
        adapter.hook.wait_joined(30.0)
        ep_group = parallel_state.get_ep_group().device_group
        dist.barrier(group=ep_group)
        stop = Path(args.stop_file)
        expected_by_pass: list[torch.Tensor] = []  # [L, E] logical counts of forward pass k
        for forward in range(args.max_steps):
            dummy = forward % 7 == 6  # an idle DP rank's dummy pass: vLLM drops its counts
            num_tokens = 8
            eplb_state.prepare_forward(model_config, num_unpadded_tokens=num_tokens - 2)
            route_and_record(layers, forward, rank, num_tokens, top_k=2)
            logical = torch.zeros(args.layers, args.experts, dtype=torch.int64)
            if not dummy:
                logical.scatter_add_(1, model_state.physical_to_logical_map.to(torch.int64),
                                     model_state.expert_load_pass.to(torch.int64))
            expected_by_pass.append(logical)
            eplb_state.step(is_dummy=dummy)  # as the model runner does after each forward
            if forward % 16 == 15:  # all ranks leave at the same step, as DP ranks stay in step
                vote = torch.tensor([float(stop.exists())])
                dist.all_reduce(vote, group=ep_group)
                if vote.item() > 0:
                    break
            time.sleep(0.002)
        result["steps"] = adapter.steps
        result["should_record"] = bool(eplb_state.should_record_tensor)
        result["expert_load_pass_zeroed"] = bool((model_state.expert_load_pass == 0).all())
        adapter.export_load(args.export)
        new_p2l = adapter.hook.phys2log.clone()
        result["placement"] = new_p2l.tolist()
        result["placement_changed"] = not torch.equal(new_p2l, old_p2l)

        _commit_eplb_maps(old, new_p2l)  # vLLM's own map update
        result["maps"] = {name: torch.equal(getattr(model_state, name), getattr(old, name))
                          for name in ("physical_to_logical_map", "logical_to_physical_map",
                                       "logical_replica_count")}
        result["maps_in_place"] = pointers == [t.data_ptr() for t in live_maps] and all(
            a is b for a, b in zip(live_maps, (model_state.physical_to_logical_map,
                                               model_state.logical_to_physical_map,
                                               model_state.logical_replica_count)))
        result["layer_views_follow"] = all(
            torch.equal(layer.eplb_state.logical_to_physical_map,
                        model_state.logical_to_physical_map[i])
            for i, layer in enumerate(layers))
        result["l2p_shape"] = list(model_state.logical_to_physical_map.shape)

        # vLLM's own weight update on the EPLB group. Its gloo communicator syncs an accelerator
        # stream (none on CPU torch); the torch.distributed one issues the same isend/irecv.
        eplb_group = parallel_state.get_eplb_group().device_group
        rearrange_expert_weights_inplace(
            old_p2l, new_p2l, old_weights,
            [torch.empty_like(w) for w in old_weights[0]], eplb_group,
            TorchDistNcclEplbCommunicator(eplb_group))
        result["weights_equal"] = all(
            torch.equal(a, b) for la, lb in zip(model.expert_weights, old_weights)
            for a, b in zip(la, lb))
        result["weights_moved"] = any(
            not torch.equal(a, b) for la, lb in
            zip(model.expert_weights, expert_weights_for(initial, rank, world))
            for a, b in zip(la, lb))

        adapter.close()  # sends what is queued
        mismatches = []
        for report in reported:  # pass k is counted before the hook's step k + 1
            want = sum((expected_by_pass[k] for k in range(report["from"], report["to"])),
                       torch.zeros(args.layers, args.experts, dtype=torch.int64))
            if want.tolist() != report["counts"]:
                mismatches.append({"from": report["from"], "to": report["to"]})
        result["reports"] = len(reported)
        result["count_mismatches"] = mismatches
        result["expected_total"] = torch.stack(expected_by_pass).sum(0).tolist()
        result["ok"] = True
    except Exception as exc:  # the test reads the reason
        logging.getLogger("vllm_worker").exception("rank %d failed", rank)
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        Path(args.result).write_text(json.dumps(result))
        if adapter is not None:
            adapter.close()
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
