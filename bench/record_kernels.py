"""What each way of counting ids costs inside a CUDA graph (the choice behind WorkerHook.record).

For ``L`` layers, each variant turns ``[T, K]`` slot ids (-1 on padding rows) into counts of one
layer's row; the graph of all layers is replayed and timed with CUDA events (best of 3
interleaved rounds). Every variant's counts are checked against a bincount of the valid ids,
except the first two, which are given the ids with -1 already turned into slot 0 (they cannot skip
them) and show the floor of one kernel per layer.

Run: ``python bench/record_kernels.py`` on a CUDA machine.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--slots", type=int, default=288)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--padding", type=int, default=56, help="rows of -1 at the end")
    p.add_argument("--replays", type=int, default=500)
    args = p.parse_args()
    dev = torch.device("cuda")
    n, L = args.slots, args.layers
    ids = torch.randint(0, n, (L, args.tokens, args.topk), device=dev)
    ids[:, args.tokens - args.padding:] = -1
    no_padding = ids.clamp(min=0)  # for the one-kernel floor: -1 already turned into slot 0
    counts = torch.zeros(L, n + 2, dtype=torch.int64, device=dev)
    rows = list(counts.unbind(0))
    ones = torch.ones(args.tokens * args.topk, dtype=torch.int64, device=dev)
    one = torch.ones(1, dtype=torch.int64, device=dev)
    bounds = torch.arange(n + 1, dtype=torch.int64, device=dev)
    m = args.tokens * args.topk

    def floor_(i: int) -> None:  # legacy: contiguous ones, -1 clamped to 0
        rows[i][1:].index_add_(0, no_padding[i].reshape(-1), ones)

    def expanded_only(i: int) -> None:  # contiguous ones -> stride-0 source (no -1 handling)
        rows[i][1:].index_add_(0, no_padding[i].reshape(-1), one.expand(m))

    def clamp_add(i: int) -> None:
        rows[i].index_add_(0, ids[i].reshape(-1).clamp(-1, n).add_(1), one.expand(m))

    def clamp_add_ones(i: int) -> None:
        rows[i].index_add_(0, ids[i].reshape(-1).clamp(-1, n).add_(1), ones)

    def search(i: int) -> None:
        rows[i].index_add_(0, torch.searchsorted(bounds, ids[i], right=True).reshape(-1),
                           one.expand(m))

    def search_ones(i: int) -> None:
        rows[i].index_add_(0, torch.searchsorted(bounds, ids[i], right=True).reshape(-1), ones)

    def search_int32(i: int) -> None:
        col = torch.searchsorted(bounds, ids[i], right=True, out_int32=True).reshape(-1)
        rows[i].index_add_(0, col, ones)

    def where_(i: int) -> None:
        flat = ids[i].reshape(-1)
        rows[i][1:].index_add_(0, flat.clamp(min=0), (flat >= 0).long())

    variants = {"floor: 1 index_add_ of ones (legacy; ids without -1)": floor_,
                "1 index_add_ of an expanded 1-element tensor": expanded_only,
                "clamp(-1, n) + 1, expanded one": clamp_add,
                "clamp(-1, n) + 1, ones buffer": clamp_add_ones,
                "searchsorted, expanded one": search,
                "searchsorted, ones buffer": search_ones,
                "searchsorted int32, ones buffer": search_int32,
                "clamp(min=0), weights (id >= 0)": where_}
    want = torch.stack([torch.bincount(r[r >= 0], minlength=n) for r in ids.reshape(L, -1).cpu()])
    graphs = {}
    for name, fn in variants.items():
        counts.zero_()
        for i in range(L):
            fn(i)
        torch.cuda.synchronize()
        got = counts[:, 1:n + 1].cpu()
        exact = torch.equal(got, want)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(L):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(L):
                fn(i)
        graphs[name] = (g, exact)
    best = {name: float("inf") for name in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        for name, (g, _) in graphs.items():
            for _ in range(10):
                g.replay()
            start.record()
            for _ in range(args.replays):
                g.replay()
            end.record()
            end.synchronize()
            best[name] = min(best[name], start.elapsed_time(end) / args.replays * 1e3)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {L} layers, ids "
          f"[{args.tokens}, {args.topk}] with {args.padding} rows of -1, {n} slots")
    print(f"| counting variant, in a CUDA graph | us per step ({L} layers) | us per layer | "
          "counts exact |")
    print("|---|---:|---:|---|")
    for name, us in best.items():
        print(f"| {name} | {us:.1f} | {us / L:.2f} | {graphs[name][1]} |")


if __name__ == "__main__":
    main()
