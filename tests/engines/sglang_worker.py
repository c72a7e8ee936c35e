"""One EP rank of a tiny SGLang MoE model, driven like SGLang's ModelRunner drives its layers,
with the eplb SGLang adapter in it (started by tests/engines/test_sglang.py).

The model has ``ModelShape.num_layers`` engine layers, the first ``first_dense`` dense, ``E``
logical experts and ``P`` physical slots over the EP ranks. Everything SGLang owns is SGLang's
real code: the ``ExpertLocationMetadata`` (``init_trivial``), the dispatch of logical to physical
ids (``ExpertLocationDispatchInfo`` made once per layer at start, as SGLang's layers do), the
expert-distribution recorder (mode ``stat``), and for the checks ``init_by_mapping`` and
``update_expert_weights_single_layer``.

Phases, in lockstep over the gloo group (one all-reduce per step):
1. step and route skewed tokens until the hook has switched to a new placement on every rank
   (the test forces the rebalance through the sidecar);
2. restart SGLang's recording and route ``--count-steps`` more steps, noting the hook's counts
   as they go to the sidecar;
3. check, and write the results to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import sglang_env
from sglang_env import ModelShape

NUM_PHYSICAL = 12
TOKENS, TOP_K, PADDED_ROWS = 6, 2, 2
WEIGHT_SHAPES = ((4, 6), (6,))  # two tensors per expert, as SGLang's w13/w2 (shapes are small)


def expert_weights(engine_layer: int, experts: torch.Tensor, k: int) -> torch.Tensor:
    """The weights tensor ``k`` of ``experts`` (``[S]`` logical ids) in ``engine_layer`` must
    hold: ``[S, *WEIGHT_SHAPES[k]]`` float32 values that name layer, expert and tensor."""
    shape = WEIGHT_SHAPES[k]
    numel = 1
    for d in shape:
        numel *= d
    base = engine_layer * 100_000 + experts.to(torch.int64) * 1_000 + k * 100
    values = base.unsqueeze(1) + torch.arange(numel) % 100
    return values.to(torch.float32).reshape(len(experts), *shape)


def route_logical(step: int, rank: int, engine_layer: int) -> torch.Tensor:
    """``[TOKENS, TOP_K]`` logical expert ids, skewed towards experts 0 and 1 (so that a plan
    replicates them)."""
    gen = torch.Generator().manual_seed(step * 1000 + rank * 10 + engine_layer)
    probs = torch.ones(ModelShape.num_logical_experts)
    probs[0], probs[1] = 12.0, 6.0
    return torch.multinomial(probs.expand(TOKENS, -1), TOP_K, generator=gen)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--ranks-per-node", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dist-init", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--counting", default="select_experts")
    p.add_argument("--dispatch", default="static", choices=["static", "dynamic"])
    p.add_argument("--count-steps", type=int, default=12)
    p.add_argument("--max-seconds", type=float, default=90.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank={args.rank} %(name)s: %(message)s")
    rank, world, rpn = args.rank, args.world, args.ranks_per_node
    result: dict = {"rank": rank, "ok": False}
    try:
        result.update(run(args, rank, world, rpn))
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - the test reads why
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    Path(args.out + ".tmp").write_text(json.dumps(result))
    Path(args.out + ".tmp").rename(args.out)
    return 0 if result["ok"] else 1


def run(args, rank: int, world: int, rpn: int) -> dict:
    torch.set_num_threads(1)
    sglang_env.publish_runtime(rank, world, nnodes=world // rpn,
                               num_redundant=NUM_PHYSICAL - ModelShape.num_logical_experts,
                               dispatch=args.dispatch)
    from sglang.srt.eplb.expert_distribution import (ExpertDistributionRecorder,
                                                     get_global_expert_distribution_recorder,
                                                     set_global_expert_distribution_recorder)
    from sglang.srt.eplb.expert_location import (ExpertLocationMetadata,
                                                 set_global_expert_location_metadata)
    from sglang.srt.eplb.expert_location_dispatch import (ExpertLocationDispatchInfo,
                                                          topk_ids_logical_to_physical)
    from sglang.srt.eplb.expert_location_updater import (create_temp_buffers,
                                                         update_expert_weights_single_layer)
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    from eplb.engines.sglang import SGLangAdapter, metadata_builder, per_layer_fields
    from eplb.proto import Counts

    dist.init_process_group("gloo", init_method=args.dist_init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    model_config = sglang_env.TinyModelConfig()
    moe_layers = list(range(ModelShape.first_dense, ModelShape.num_layers))
    metadata = ExpertLocationMetadata.init_trivial(model_config, moe_ep_rank=rank)
    set_global_expert_location_metadata(metadata)
    live_tensors = {name: t for name, t in per_layer_fields(metadata).items()}
    initial_map = metadata.physical_to_logical_map_cpu.clone()  # [N, P]
    per_gpu = NUM_PHYSICAL // world
    local = slice(rank * per_gpu, (rank + 1) * per_gpu)
    weights = {layer: [expert_weights(layer, initial_map[layer, local], k)
                       for k in range(len(WEIGHT_SHAPES))] for layer in moe_layers}
    old_weights = copy.deepcopy(weights)
    # SGLang's MoE layers take their dispatch info (views into the metadata) once, at build.
    infos = {layer: ExpertLocationDispatchInfo.init_new(layer) for layer in moe_layers}

    recorder = ExpertDistributionRecorder.init_new(metadata, rank)
    set_global_expert_distribution_recorder(recorder)
    adapter = SGLangAdapter(metadata, weights, rank, world, metadata_builder(model_config, rank),
                            ranks_per_node=rpn, counting=args.counting, run_dir=args.run_dir,
                            hook_options={"flush_every": 1, "heartbeat_s": 0.2,
                                          "hold_timeout_s": 30.0},
                            copy_options={"timeout_s": 30.0})
    set_global_expert_distribution_recorder(adapter.wrap_recorder(recorder))
    hook = adapter.hook
    sent: list[Counts] = []  # what the hook sends to the sidecar (observed on its socket thread)
    sent_lock = threading.Lock()
    send = hook._send

    def observe(sock, msg):
        if isinstance(msg, Counts):
            with sent_lock:
                sent.append(msg)
        send(sock, msg)

    hook._send = observe
    hook.wait_joined(30.0)
    dist.barrier()

    # [count steps, L, E]: the logical ids routed in each counted pass (valid rows only)
    truth = torch.zeros(args.count_steps, len(moe_layers), ModelShape.num_logical_experts,
                        dtype=torch.int64)
    deadline = time.monotonic() + args.max_seconds
    step, count_from = 0, None

    def forward(step: int) -> None:
        """One forward pass as SGLang runs it: recorder around the pass and each layer; MoE
        layers route logical ids to physical slots and hand them (padded rows -1) to the
        recorder."""
        rec = get_global_expert_distribution_recorder()
        with rec.with_forward_pass(step, ForwardBatch()):
            for layer in range(ModelShape.num_layers):
                with rec.with_current_layer(layer):
                    if layer not in infos:
                        continue
                    logical = route_logical(step, rank, layer)
                    physical = topk_ids_logical_to_physical(logical.clone(), infos[layer])
                    physical[-PADDED_ROWS:] = -1  # SGLang marks padded rows -1
                    if count_from is not None:
                        truth[step - count_from, layer - ModelShape.first_dense].scatter_add_(
                            0, logical[:-PADDED_ROWS].reshape(-1),
                            torch.ones(logical[:-PADDED_ROWS].numel(), dtype=torch.int64))
                    rec.on_select_experts(topk_ids=physical)

    while True:
        step += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new placement landed on every rank within "
                               f"{args.max_seconds:g}s (step {step}, hook state {hook.state})")
        adapter.on_step(step)
        if count_from is not None and step == count_from + args.count_steps:
            break
        landed = hook.state == "idle" and not torch.equal(hook.phys2log, initial_map[moe_layers])
        vote = torch.tensor([float(landed)])
        dist.all_reduce(vote)
        if count_from is None and int(vote.item()) == world:
            count_from = step  # every rank: SGLang's recording restarts before this pass
            recorder.start_record()
        forward(step)
        time.sleep(0.002 if count_from is None else 0.02)  # counting: let the sender keep up

    count_to = step
    # [count steps, L, E], summed over the ranks: SGLang's logical count of each pass
    sglang_steps = recorder.dump_record(output_mode="object")["logical_count"]
    sglang_steps = sglang_steps[:, moe_layers].to(torch.int64)
    wait_until = time.monotonic() + 10
    while time.monotonic() < wait_until:
        with sent_lock:
            if any(m.to_step >= count_to for m in sent):
                break
        time.sleep(0.02)
    # The hook reports counts over step ranges [from, to) (one a step here, several together
    # when its sender fell behind). Compare over the steps between the first and last range
    # boundaries that every rank has inside the counted steps.
    with sent_lock:
        inside = sorted(((m.from_step, m.to_step, m.counts) for m in sent
                         if m.from_step >= count_from and m.to_step <= count_to),
                        key=lambda t: t[0])
    boundary = torch.zeros(count_to - count_from + 1, dtype=torch.int64)
    for start, end, _ in inside:
        boundary[start - count_from] = boundary[end - count_from] = 1
    dist.all_reduce(boundary, op=dist.ReduceOp.MIN)
    common = [count_from + i for i in boundary.nonzero().flatten().tolist()]
    first, last = (common[0], common[-1]) if common else (count_from, count_from)
    tiles = [(start, end) for start, end, _ in inside if first <= start and end <= last]
    hook_logical = torch.zeros(len(moe_layers), ModelShape.num_logical_experts,
                               dtype=torch.int64)
    for start, end, counts in inside:
        if first <= start and end <= last:
            hook_logical += counts
    global_hook = hook_logical.clone()
    dist.all_reduce(global_hook)
    global_truth = truth[first - count_from:last - count_from].sum(0)
    dist.all_reduce(global_truth)
    sglang_logical = sglang_steps[first - count_from:last - count_from].sum(0)

    # --- the maps: every field equals SGLang's constructor for the new placement ---------------
    new_moe = hook.phys2log.clone()  # [L, P]
    new_map = initial_map.clone()
    new_map[moe_layers] = new_moe
    expected = ExpertLocationMetadata.init_by_mapping(model_config, new_map, moe_ep_rank=rank)
    field_mismatches = []
    for field in dataclasses.fields(expected):
        want, have = getattr(expected, field.name), getattr(metadata, field.name)
        same = (torch.equal(want, have) if isinstance(want, torch.Tensor)
                else want == have)
        if not same:
            field_mismatches.append(field.name)
    rebound = [name for name, t in live_tensors.items() if getattr(metadata, name) is not t]

    # --- the weights: equal to what SGLang's own updater makes from the same maps -------------
    sglang_weights = copy.deepcopy(old_weights)
    for layer in moe_layers:
        update_expert_weights_single_layer(
            routed_experts_weights=sglang_weights[layer],
            temp_buffers=create_temp_buffers(sglang_weights[layer]),
            old_physical_to_logical_map=initial_map[layer].tolist(),
            new_physical_to_logical_map=new_map[layer].tolist(),
            num_local_physical_experts=per_gpu, num_gpu_per_node=rpn, rank=rank,
            world_size=world)
    weights_vs_sglang = [(layer, k) for layer in moe_layers for k in range(len(WEIGHT_SHAPES))
                         if not torch.equal(weights[layer][k], sglang_weights[layer][k])]
    weights_vs_truth = [(layer, k) for layer in moe_layers for k in range(len(WEIGHT_SHAPES))
                        if not torch.equal(weights[layer][k],
                                           expert_weights(layer, new_map[layer, local], k))]

    # --- SGLang's dispatch sends each logical expert to a slot that holds it -------------------
    gathered = {}
    for layer in moe_layers:
        for k in range(len(WEIGHT_SHAPES)):
            parts = [torch.empty_like(weights[layer][k]) for _ in range(world)]
            dist.all_gather(parts, weights[layer][k].contiguous())
            gathered[(layer, k)] = torch.cat(parts)  # [P, ...] every rank's slots
    every_expert = torch.arange(ModelShape.num_logical_experts).repeat(3).reshape(-1, TOP_K)
    dispatch_errors = []
    for layer in moe_layers:
        fresh = ExpertLocationDispatchInfo.init_new(layer)
        ways = [(f"{args.dispatch}, info from start", infos[layer]),
                (f"{args.dispatch}, new info", fresh)]
        if args.dispatch == "static":  # the same live maps also serve SGLang's dynamic pick
            ways.append(("dynamic", dataclasses.replace(infos[layer], rank_invariant=True,
                                                        ep_dispatch_algorithm="dynamic")))
        for how, info in ways:
            slots = topk_ids_logical_to_physical(every_expert.clone(), info)
            for expert, slot in zip(every_expert.reshape(-1).tolist(), slots.reshape(-1).tolist()):
                if not 0 <= slot < NUM_PHYSICAL or int(new_map[layer, slot]) != expert:
                    dispatch_errors.append(f"{how}: layer {layer} expert {expert} -> slot {slot}")
                    continue
                for k in range(len(WEIGHT_SHAPES)):
                    held = gathered[(layer, k)][slot]
                    if not torch.equal(held, expert_weights(layer, torch.tensor([expert]), k)[0]):
                        dispatch_errors.append(f"{how}: layer {layer} slot {slot} does not hold "
                                               f"expert {expert}'s weights")
    adapter.close()
    dist.destroy_process_group()
    return {
        "moved_slots": int((new_moe != initial_map[moe_layers]).sum()),
        "fields_checked": [f.name for f in dataclasses.fields(expected)],
        "field_mismatches": field_mismatches, "rebound_fields": rebound,
        "weights_vs_sglang": weights_vs_sglang, "weights_vs_truth": weights_vs_truth,
        "dispatch_errors": dispatch_errors[:20],
        "count_window": [first, last], "counted_steps": [count_from, count_to],
        "count_tiles": tiles,
        "hook_logical": global_hook.tolist(), "sglang_logical": sglang_logical.tolist(),
        "truth_logical": global_truth.tolist(),
        "max_on_step_ms": hook.max_on_step_seconds * 1e3,
    }


if __name__ == "__main__":
    raise SystemExit(main())
