"""One EP rank of a small vLLM-shaped MoE model, driven by the eplb sidecar through
:class:`eplb.engines.vllm.VllmAdapter` (started by ``tests/engines/test_vllm.py``).

vLLM's real ``EplbModelState`` holds the maps (built with vLLM's own functions), ``expert_weights``
holds small weights whose values name their layer and expert, and every step the rank routes
tokens the way vLLM's router does on GPU: logical ids -> a replica's slot via the live
``logical_to_physical_map`` / ``logical_replica_count``, one count per routed token into
``expert_load_pass`` (rows past the unpadded-token count not counted). vLLM's Triton
``eplb_map_and_record`` kernel cannot run on CPU (vLLM's CPU fallback returns the ids unmapped),
so these few lines stand in for it here.

After the test's stop file appears the rank leaves its loop and checks, against vLLM's own code
on the same gloo group, that the sidecar's epoch left it with:

- maps equal to what vLLM's ``_commit_eplb_maps`` makes of the old state and the new placement;
- weights equal to what vLLM's ``rearrange_expert_weights_inplace`` makes of the old weights;
- count reports equal to ``expert_load_pass`` turned logical with the maps that routed it.

It writes what it found to ``--result`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import vllm_stubs  # noqa: E402 - before vLLM: see the module's docstring

vllm_stubs.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from vllm.distributed.eplb.eplb_communicator import TorchDistNcclEplbCommunicator  # noqa: E402
from vllm.distributed.eplb.eplb_state import (EplbModelState, EplbState,  # noqa: E402
                                              _commit_eplb_maps, compute_logical_maps)
from vllm.distributed.eplb.rebalance_execute import (  # noqa: E402
    rearrange_expert_weights_inplace)

import vllm.distributed.eplb.eplb_state as vllm_eplb_state  # noqa: E402
from eplb.engines.vllm import VllmAdapter  # noqa: E402
from eplb.proto import Counts  # noqa: E402


def initial_model_state(num_layers: int, num_experts: int, num_physical: int,
                        expert_weights: list[list[torch.Tensor]],
                        communicator: object) -> EplbModelState:
    """vLLM's state for a fresh model: placement from ``build_initial_global_physical_to_logical_map``,
    logical maps from ``compute_logical_maps`` padded with -1 to ``num_redundant + 1`` replicas
    (vLLM's width without elastic EP)."""
    row = torch.tensor(EplbState.build_initial_global_physical_to_logical_map(
        num_experts, num_physical - num_experts))
    p2l = row.unsqueeze(0).expand(num_layers, -1).contiguous()
    l2p, replicas = compute_logical_maps(p2l, num_experts)
    width = num_physical - num_experts + 1
    l2p = torch.nn.functional.pad(l2p, (0, width - l2p.shape[-1]), value=-1)
    load = torch.zeros(num_layers, num_physical, dtype=torch.int32)
    model = SimpleNamespace(expert_weights=expert_weights, num_logical_experts=num_experts,
                            num_moe_layers=num_layers, num_physical_experts=num_physical)
    return EplbModelState(
        physical_to_logical_map=p2l, physical_to_logical_map_buffer=p2l,
        logical_to_physical_map=l2p, logical_replica_count=replicas,
        expert_load_pass=load, expert_load_pass_buffer=load,
        expert_load_window=torch.zeros(1, num_layers, num_physical, dtype=torch.int32),
        last_expert_load=torch.ones(num_layers, num_experts, dtype=torch.int64),
        model_name="tiny-moe", model=model,
        expert_buffer=[torch.empty_like(w) for w in expert_weights[0]], rebalanced=False,
        eplb_stats=None, device_index=None, communicator=communicator)


def expert_weights_for(p2l: torch.Tensor, rank: int, world: int) -> list[list[torch.Tensor]]:
    """Per layer ``[w_in float32 [S, 4, 6], w_scale bfloat16 [S, 2]]`` for this rank's ``S``
    slots; the values name (layer, logical expert) exactly."""
    per_rank = p2l.shape[1] // world
    weights = []
    for layer in range(p2l.shape[0]):
        experts = p2l[layer, rank * per_rank:(rank + 1) * per_rank].to(torch.float32)
        w_in = (layer * 1000 + experts * 10).view(-1, 1, 1) + torch.arange(24.).view(1, 4, 6)
        w_scale = (layer * 16 + experts).view(-1, 1).repeat(1, 2).to(torch.bfloat16)
        weights.append([w_in.contiguous(), w_scale.contiguous()])
    return weights


def route_and_record(state: EplbModelState, step: int, rank: int, tokens: int, top_k: int,
                     num_unpadded: int) -> None:
    """This step's routing of ``tokens`` rows (the last ones padding): skewed logical choices,
    a replica per token as vLLM picks it, one count per real row into ``expert_load_pass``."""
    num_layers, num_experts = state.logical_replica_count.shape
    gen = torch.Generator().manual_seed(step * 131 + rank)
    weights = torch.arange(num_experts, 0, -1, dtype=torch.float64) ** 3  # expert 0 is hot
    for layer in range(num_layers):
        logical = torch.multinomial(weights, tokens * top_k, replacement=True,
                                    generator=gen).view(tokens, top_k)
        token = torch.arange(tokens).view(-1, 1).expand(-1, top_k)
        replica = token % state.logical_replica_count[layer][logical]
        physical = state.logical_to_physical_map[layer][logical, replica]  # [T, K]
        counted = physical[:num_unpadded].reshape(-1)
        state.expert_load_pass[layer].index_add_(
            0, counted, torch.ones_like(counted, dtype=state.expert_load_pass.dtype))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--ranks-per-node", type=int, required=True)
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
    # vLLM finds no accelerator platform on this CPU machine yet reports pinned memory as
    # available; its map commit would pin host tensors, which CPU-only torch refuses.
    vllm_eplb_state.PIN_MEMORY = False
    dist.init_process_group("gloo", init_method=args.dist_init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    ep_group = dist.new_group(list(range(world)), backend="gloo", timeout=timedelta(seconds=60))

    # Old state, and a copy of it for vLLM's own updaters to work on at the end.
    row = torch.tensor(EplbState.build_initial_global_physical_to_logical_map(
        args.experts, args.physical - args.experts))
    weights = expert_weights_for(row.unsqueeze(0).expand(args.layers, -1), rank, world)
    communicator = TorchDistNcclEplbCommunicator(ep_group)  # torch.distributed P2P, any backend
    state = initial_model_state(args.layers, args.experts, args.physical, weights, communicator)
    old_p2l = state.physical_to_logical_map.clone()
    old_weights = [[w.clone() for w in layer] for layer in weights]
    map_pointers = [t.data_ptr() for t in (state.physical_to_logical_map,
                                           state.logical_to_physical_map,
                                           state.logical_replica_count)]

    adapter = VllmAdapter(state, weights, rank=rank, ep_size=world, group=ep_group,
                          ranks_per_node=args.ranks_per_node, run_dir=args.run_dir,
                          hook_options={"flush_every": 4, "hold_timeout_s": 30.0})
    # What the hook reports to the sidecar, seen where it leaves (test-only tap).
    reported: list[dict] = []
    send = adapter.hook._send

    def tap(sock, msg):
        if isinstance(msg, Counts):
            reported.append({"from": msg.from_step, "to": msg.to_step,
                             "counts": msg.counts.tolist()})
        send(sock, msg)

    adapter.hook._send = tap
    result: dict = {"rank": rank, "ok": False}
    expected_by_pass: list[torch.Tensor] = []  # [L, E] logical counts of forward pass k
    try:
        adapter.hook.wait_joined(30.0)
        dist.barrier()
        stop = Path(args.stop_file)
        # All ranks leave at the same step: a stop vote every 16 steps (vLLM's DP ranks step
        # in lockstep the same way); the file only appears after the epoch landed everywhere.
        for forward in range(args.max_steps):
            tokens = 8
            route_and_record(state, forward, rank, tokens, top_k=2, num_unpadded=tokens - 2)
            logical = torch.zeros(args.layers, args.experts, dtype=torch.int64)
            logical.scatter_add_(1, state.physical_to_logical_map.to(torch.int64),
                                 state.expert_load_pass.to(torch.int64))
            expected_by_pass.append(logical)
            adapter.step()  # the forward pass's counts -> hook; maybe copies at agreed steps
            if forward % 16 == 15:
                vote = torch.tensor([float(stop.exists())])
                dist.all_reduce(vote, group=ep_group)
                if vote.item() > 0:
                    break
            time.sleep(0.002)
        result["steps"] = adapter.steps
        result["expert_load_pass_zeroed"] = bool((state.expert_load_pass == 0).all())
        adapter.export_load(args.export)
        new_p2l = adapter.hook.phys2log.clone()
        result["placement"] = new_p2l.tolist()
        result["placement_changed"] = not torch.equal(new_p2l, old_p2l)

        # Maps: vLLM's own commit of the new placement into a copy of the old state.
        reference = initial_model_state(args.layers, args.experts, args.physical, old_weights,
                                        communicator)
        _commit_eplb_maps(reference, new_p2l)
        result["maps"] = {name: torch.equal(getattr(state, name), getattr(reference, name))
                          for name in ("physical_to_logical_map", "logical_to_physical_map",
                                       "logical_replica_count")}
        result["maps_in_place"] = map_pointers == [t.data_ptr() for t in (
            state.physical_to_logical_map, state.logical_to_physical_map,
            state.logical_replica_count)]
        result["l2p_shape"] = list(state.logical_to_physical_map.shape)

        # Weights: vLLM's own rearrangement of the old weights, on the same gloo group.
        rearrange_expert_weights_inplace(old_p2l, new_p2l, old_weights,
                                         [torch.empty_like(w) for w in old_weights[0]],
                                         ep_group, communicator)
        result["weights_equal"] = all(torch.equal(a, b) for la, lb in zip(weights, old_weights)
                                      for a, b in zip(la, lb))
        result["weights_moved"] = any(not torch.equal(a, b) for la, lb in
                                      zip(weights, expert_weights_for(old_p2l, rank, world))
                                      for a, b in zip(la, lb))

        # Counts: every report equals the passes it covers (pass k is counted before step k+1).
        adapter.close()  # drains what is queued
        mismatches = []
        for report in reported:
            want = sum((expected_by_pass[k] for k in range(report["from"], report["to"])),
                       torch.zeros(args.layers, args.experts, dtype=torch.int64))
            if want.tolist() != report["counts"]:
                mismatches.append({"from": report["from"], "to": report["to"]})
        result["reports"] = len(reported)
        result["reported_steps"] = sum(r["to"] - r["from"] for r in reported)
        result["count_mismatches"] = mismatches
        result["expected_total"] = torch.stack(expected_by_pass).sum(0).tolist()
        result["ok"] = True
    except Exception as exc:  # the test reads the reason
        logging.getLogger("vllm_worker").exception("rank %d failed", rank)
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        Path(args.result).write_text(json.dumps(result))
        adapter.close()
        dist.destroy_process_group()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
