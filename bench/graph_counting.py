"""Counting expert selections inside a captured CUDA graph, as engines run decode.

A one-rank stand-in for an engine's decode step: for each of ``L`` MoE layers a router picks
``K`` logical experts per token, the engine's dispatch map (``[L, E]`` logical -> physical slot,
read by the graph by address) turns them into physical slot ids, rows past the batch's valid
count become -1 (graph padding), and the ids go to :meth:`WorkerHook.record` with the valid-row
count, the path the engine adapters take (``count_ids="physical"``). The step is captured once
in a CUDA graph and replayed, as SGLang and vLLM replay decode.

Checks (each prints ok or FAILED; the exit status is 1 if any failed):
  1. replays count exactly: after R replays, one eager call with a prefill-sized batch of ids
     (32,768 by default: more than any call before it) and R more replays, the hook's counters
     equal what a bincount of the same ids gives. The counting of the hook before the
     graph-safe change (a ones buffer that grew on a larger call) is run the same way beside it
     and shows what went wrong.
  2. a map updated in place is seen by the graph: after the dispatch map's rows are overwritten
     in place (as the adapters switch layers), replays route to the new slots.
Timing: the per-step GPU time of the graph without counting, with the counting before the change,
and with the hook's counting with and without the valid-row count (each the best of 3
interleaved rounds of replays timed with CUDA events, all in the same run).

Run: ``python bench/graph_counting.py`` on a CUDA machine (``--device cpu`` runs the checks
eagerly, without graphs, as a smoke test).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass

import torch

from eplb.worker_hook import WorkerHook


@dataclass
class Shape:
    layers: int
    experts: int
    slots: int
    tokens: int  # rows of the captured batch (the graph's padded batch size)
    valid: int  # rows that are real tokens; the rest is graph padding
    topk: int
    hidden: int


class LegacyCounter:
    """The hook's counting before the graph-safe change, kept here to show the failure: a ones
    buffer that is replaced by a larger one when a call brings more ids than any before."""

    def __init__(self, layers: int, ids: int, device: torch.device) -> None:
        self.counts = torch.zeros(layers, ids, dtype=torch.int64, device=device)
        self._ones = torch.ones(1024, dtype=torch.int64, device=device)

    def record(self, layer: int, ids: torch.Tensor) -> None:
        flat = ids.reshape(-1)
        if flat.numel() > self._ones.numel():
            self._ones = torch.ones(max(flat.numel(), 2 * self._ones.numel()), dtype=torch.int64,
                                    device=flat.device)
        self.counts[layer].index_add_(0, flat, self._ones[:flat.numel()])


class StandInDecode:
    """Router + dispatch of every MoE layer of one decode step, on fixed (static) buffers.

    Buffers: ``hidden`` ``[T, H]``; ``router`` ``[L, H, E]``; ``dispatch`` ``[L, E]`` physical
    slot of each logical expert (updated in place); ``num_valid`` 0-d; ``last_ids`` ``[L, T, K]``
    the physical ids of the last step (-1 on padding rows).
    """

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.shape = shape
        self.hidden = torch.randn(shape.tokens, shape.hidden, generator=g).to(device)
        self.router = torch.randn(shape.layers, shape.hidden, shape.experts, generator=g).to(device)
        # Slot e holds expert e; the extra slots (replicas) are not dispatched to at first.
        self.dispatch = torch.arange(shape.experts, device=device).repeat(shape.layers, 1)
        self.num_valid = torch.tensor(shape.valid, device=device)
        self.last_ids = torch.zeros(shape.layers, shape.tokens, shape.topk, dtype=torch.int64,
                                    device=device)
        self.last_logical = torch.zeros_like(self.last_ids)
        self._rows = torch.arange(shape.tokens, device=device).unsqueeze(1)  # [T, 1]

    def step(self, hook: WorkerHook | None = None, legacy: LegacyCounter | None = None,
             pass_num_valid: bool = True) -> None:
        """One decode step; counts into ``hook`` (with the valid-row count, or relying on the -1
        of padding rows alone) and/or the ``legacy`` counter."""
        s = self.shape
        for layer in range(s.layers):
            logits = self.hidden @ self.router[layer]  # [T, E]
            logical = logits.topk(s.topk, dim=1).indices  # [T, K]
            physical = self.dispatch[layer][logical]  # [T, K] the engine's dispatch
            physical = physical.masked_fill(self._rows >= self.num_valid, -1)  # padding rows
            self.last_ids[layer].copy_(physical)
            self.last_logical[layer].copy_(logical)
            if hook is not None:
                hook.record(layer, physical, self.num_valid if pass_num_valid else None)
            if legacy is not None:  # logical ids, all rows: it could neither skip -1 nor rows
                legacy.record(layer, logical)


def expected_counts(ids: torch.Tensor, slots: int, valid: int) -> torch.Tensor:
    """``[L, slots]`` counts of ``ids`` ``[L, T, K]`` over the first ``valid`` rows."""
    real = ids[:, :valid].reshape(ids.shape[0], -1).cpu()
    return torch.stack([torch.bincount(row[row >= 0], minlength=slots) for row in real])


def timed_replays(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Mean GPU milliseconds per replay."""
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph, as engines do
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=58, help="MoE layers (DeepSeek-V3: 58)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--slots", type=int, default=288, help="physical slots per layer")
    p.add_argument("--tokens", type=int, default=256, help="rows of the captured batch")
    p.add_argument("--valid", type=int, default=200, help="rows that are real tokens")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--prefill-ids", type=int, default=32_768,
                   help="ids in the eager call between replays")
    p.add_argument("--replays", type=int, default=50, help="replays before and after it")
    p.add_argument("--timed-replays", type=int, default=500)
    args = p.parse_args()
    device = torch.device(args.device)
    shape = Shape(args.layers, args.experts, args.slots, args.tokens, args.valid, args.topk,
                  args.hidden)
    use_graph = device.type == "cuda"
    failures = 0

    def report(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok    ' if ok else 'FAILED'} {name}: {detail}")

    print(f"device {torch.cuda.get_device_name(device) if use_graph else 'cpu'}; torch "
          f"{torch.__version__}; L={shape.layers} E={shape.experts} P={shape.slots} "
          f"batch {shape.tokens} rows ({shape.valid} valid) x top-{shape.topk}; "
          f"{'CUDA graph replays' if use_graph else 'eager (no CUDA graph)'}")
    with tempfile.TemporaryDirectory() as run_dir:  # no sidecar: counting needs none
        hook = WorkerHook(0, 1, shape.layers, shape.experts, shape.slots, device=device,
                          run_dir=run_dir, count_ids="physical", flush_every=1 << 30)
        try:
            engine = StandInDecode(shape, device)
            legacy = LegacyCounter(shape.layers, shape.slots, device)
            step = (lambda: engine.step(hook, legacy))
            graph = capture(step) if use_graph else None
            run = graph.replay if graph is not None else step
            hook.counters().zero_()  # the warm-up and capture counted too (capture runs no kernel)
            legacy.counts.zero_()

            # 1. replays, one eager prefill-sized call, replays.
            for _ in range(args.replays):
                run()
            per_step = expected_counts(engine.last_ids, shape.slots, shape.valid)
            big = torch.randint(0, shape.slots, (args.prefill_ids,), device=device)
            hook.record(0, big)
            legacy.record(0, big)
            # The engine's next allocations reuse what the caching allocator freed.
            scratch = [torch.full((n,), 7, dtype=torch.int64, device=device)
                       for n in (1024, 2048, 4096)]
            for _ in range(args.replays):
                run()
            if use_graph:
                torch.cuda.synchronize()
            del scratch
            want = 2 * args.replays * per_step
            want[0] += torch.bincount(big.cpu(), minlength=shape.slots)
            got = hook.counters().cpu()
            report("hook counts exact across an eager call", torch.equal(got, want),
                   f"{int(got.sum())} counted, {int(want.sum())} expected")
            legacy_got = legacy.counts.cpu()
            legacy_want = 2 * args.replays * expected_counts(engine.last_logical, shape.slots,
                                                             shape.tokens)
            legacy_want[0] += torch.bincount(big.cpu(), minlength=shape.slots)
            print(f"       (the counting before the change, on logical ids of every row: "
                  f"{int(legacy_got.sum())} counted, {int(legacy_want.sum())} expected: "
                  f"{'the same' if torch.equal(legacy_got, legacy_want) else 'WRONG'})")

            # 2. an in-place switch of the dispatch map is what the graph routes with next.
            replicas = shape.slots - shape.experts
            engine.dispatch[:, :replicas] += shape.experts  # experts 0.. move onto the replicas
            run()
            routed = torch.stack([engine.dispatch[i][engine.last_logical[i]]
                                  for i in range(shape.layers)])[:, :shape.valid]
            ids = engine.last_ids[:, :shape.valid]
            report("in-place map switch seen by replays",
                   torch.equal(ids, routed) and bool((ids >= shape.experts).any()),
                   f"{int((ids >= shape.experts).sum())} of {ids.numel()} ids on the new slots")
            engine.dispatch.copy_(torch.arange(shape.experts, device=device).repeat(shape.layers, 1))

            # Timing: the same step with and without counting, both captured.
            if use_graph:
                variants = {
                    "router + dispatch, no counting": lambda: engine.step(),
                    "+ counting before the change (logical ids, 1 index_add_)":
                        lambda: engine.step(legacy=legacy),
                    "+ hook.record(ids) (-1 rows skipped)":
                        lambda: engine.step(hook, pass_num_valid=False),
                    "+ hook.record(ids, num_valid)": lambda: engine.step(hook),
                }
                graphs = {name: capture(fn) for name, fn in variants.items()}
                best = {name: float("inf") for name in graphs}
                for _ in range(3):  # interleaved rounds; the best of each
                    for name, g in graphs.items():
                        best[name] = min(best[name], timed_replays(g, args.timed_replays))
                bare_ms = best["router + dispatch, no counting"]
                print()
                print(f"| CUDA graph of one decode step, {shape.layers} MoE layers | GPU us per "
                      "step | counting, us per step | counting, us per layer |")
                print("|---|---:|---:|---:|")
                for name, ms in best.items():
                    extra = (ms - bare_ms) * 1e3
                    print(f"| {name} | {ms * 1e3:.1f} | {extra:.1f} | {extra / shape.layers:.2f} |")
        finally:
            hook.close()
    print("all checks passed" if failures == 0 else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
