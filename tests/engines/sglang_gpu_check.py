"""Manual check on one CUDA GPU (not collected by pytest): the adapter's map switch under a
captured CUDA graph, with SGLang's real metadata, dispatch and recorder on the GPU.

    python tests/engines/sglang_gpu_check.py          # --cpu: the same steps on CPU, no graph

1. SGLang's ``ExpertLocationMetadata.init_trivial`` on ``cuda`` (2 dense + 3 MoE layers, E=8,
   P=12, EP size 1, dynamic dispatch without an a2a backend), SGLang's recorder (mode ``stat``)
   wrapped by the adapter's :class:`CountingRecorder`, and a :class:`WorkerHook` counting
   physical ids (no sidecar: only its counters are used).
2. A CUDA graph captures one "forward": per MoE layer SGLang's ``topk_ids_logical_to_physical``
   with the layer's ``ExpertLocationDispatchInfo`` (taken before capture, as SGLang's layers do)
   and the recorder's ``on_select_experts``.
3. :class:`SGLangMaps` builds the new placement on its thread and switches every layer in place;
   the same graph, replayed, must route by the new maps; every field must equal SGLang's
   ``init_by_mapping``; the hook's counters must match the routed ids of each replay.
Prints one JSON line with the results; exits 1 on a mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sglang_env  # noqa: E402


def main() -> int:
    dry = "--cpu" in sys.argv  # a dry run of the same steps on CPU, without the graph
    if not dry:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --cpu for a dry run)"
        torch.cuda.set_device(0)
    device = "cpu" if dry else "cuda"
    sglang_env.import_sglang(cpu_engine=dry)
    sglang_env.publish_runtime(0, 1, nnodes=1, num_redundant=4, dispatch="dynamic",
                               device=device)
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder
    from sglang.srt.eplb.expert_location import (ExpertLocationMetadata,
                                                 set_global_expert_location_metadata)
    from sglang.srt.eplb.expert_location_dispatch import (ExpertLocationDispatchInfo,
                                                          topk_ids_logical_to_physical)

    from eplb.engines.sglang import (CountingRecorder, SGLangMaps, metadata_builder,
                                     per_layer_fields)
    from eplb.worker_hook import WorkerHook

    config = sglang_env.TinyModelConfig()
    moe = [2, 3, 4]
    live = ExpertLocationMetadata.init_trivial(config, moe_ep_rank=0)
    set_global_expert_location_metadata(live)
    infos = {layer: ExpertLocationDispatchInfo.init_new(layer) for layer in moe}
    pointers = {name: t.data_ptr() for name, t in per_layer_fields(live).items()}
    p2l0 = live.physical_to_logical_map_cpu[moe].clone()
    hook = WorkerHook(0, 1, len(moe), 8, 12, p2l0, device=device, count_ids="physical",
                      run_dir=Path(tempfile.mkdtemp()) / "none")
    inner = ExpertDistributionRecorder.init_new(live, 0)
    recorder = CountingRecorder(inner, hook, moe, counting="select_experts")

    logical = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [0, 0], [1, 1]], device=device)
    routed = {layer: torch.empty_like(logical) for layer in moe}

    def forward() -> None:
        for layer in moe:
            with recorder.with_current_layer(layer):
                ids = topk_ids_logical_to_physical(logical.clone(), infos[layer])
                routed[layer].copy_(ids)
                recorder.on_select_experts(topk_ids=ids)

    if dry:
        replay = forward
        sync = lambda: None  # noqa: E731
    else:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()  # warm-up outside the graph, as SGLang does before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        replay, sync = graph.replay, torch.cuda.synchronize
    sync()
    hook.counters().zero_()

    replay()
    sync()
    before = {layer: routed[layer].cpu().clone() for layer in moe}
    counts_before = hook.counters().cpu().clone()

    new = p2l0.clone()
    new[:, 8:] = torch.tensor([4, 5, 6, 7])  # the 4 redundant slots now replicate experts 4..7
    new[1] = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 7, 7, 0, 0])
    maps = SGLangMaps(live, moe, metadata_builder(config, 0), rank=0)
    started = time.perf_counter()
    maps.prepare(1, new)
    maps._prepared.result(timeout=60)
    build_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    maps.apply(1, [0, 1, 2])
    sync()
    apply_ms = (time.perf_counter() - started) * 1e3

    replay()  # the graph captured before the switch, replayed after it
    sync()
    after = {layer: routed[layer].cpu().clone() for layer in moe}
    counts_after = hook.counters().cpu() - counts_before

    full = live.physical_to_logical_map_cpu.clone()
    expected = ExpertLocationMetadata.init_by_mapping(config, full, moe_ep_rank=0)
    problems = []
    for field in dataclasses.fields(expected):
        want, have = getattr(expected, field.name), getattr(live, field.name)
        if isinstance(want, torch.Tensor):
            if want.device != have.device or not torch.equal(want.cpu(), have.cpu()):
                problems.append(f"field {field.name} differs")
        elif want != have:
            problems.append(f"field {field.name} differs")
    if not torch.equal(full[moe], new):
        problems.append("physical_to_logical_map rows are not the new placement")
    if any(t.data_ptr() != pointers[name] for name, t in per_layer_fields(live).items()):
        problems.append("a field was rebound")
    for i, layer in enumerate(moe):
        for tag, slots, p2l in (("before", before[layer], p2l0[i]),
                                ("after", after[layer], new[i])):
            if not torch.equal(p2l[slots], logical.cpu()):
                problems.append(f"{tag}: layer {layer} routed {slots.tolist()} "
                                f"under {p2l.tolist()}")
        for tag, slots, counted in (("before", before[layer], counts_before[i]),
                                    ("after", after[layer], counts_after[i])):
            want_counts = torch.bincount(slots.reshape(-1), minlength=12)
            if not torch.equal(counted, want_counts):
                problems.append(f"{tag}: layer {layer} counted {counted.tolist()}, "
                                f"routed {want_counts.tolist()}")
    out = {"ok": not problems, "problems": problems[:20],
           "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
           "torch": torch.__version__, "build_ms": round(build_ms, 2),
           "apply_ms": round(apply_ms, 3), "routed_after_layer3": after[3].tolist(),
           }
    print(json.dumps(out))
    hook.close()
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
