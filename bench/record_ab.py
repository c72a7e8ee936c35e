"""A/B of the hook's per-layer count, interleaved in one process (this VM's speed drifts between
runs by as much as the change): slicing on every call (before) vs cached row and ones views (now).
Prints microseconds per layer for each round."""

from __future__ import annotations

import time

import torch

L, E, ROUNDS, STEPS = 58, 256, 4, 300


def main() -> None:
    torch.set_num_threads(1)
    counts = torch.zeros(L, E, dtype=torch.int64)
    ones = torch.ones(2048, dtype=torch.int64)
    ids = [torch.randint(E, (128, 8)) for _ in range(L)]
    rows = list(counts.unbind(0))
    cache: dict[int, torch.Tensor] = {}

    def sliced() -> None:
        for layer in range(L):
            x = ids[layer].reshape(-1)
            counts[layer].index_add_(0, x, ones[:x.numel()])

    def cached() -> None:
        for layer in range(L):
            x = ids[layer].reshape(-1)
            o = cache.get(x.numel())
            if o is None:
                o = cache[x.numel()] = ones[:x.numel()]
            rows[layer].index_add_(0, x, o)

    print("| round | slice each call, us/layer | cached views, us/layer |")
    print("|---|---|---|")
    for r in range(ROUNDS):
        result = []
        for fn in (sliced, cached):
            t0 = time.perf_counter()
            for _ in range(STEPS):
                fn()
            result.append((time.perf_counter() - t0) / STEPS / L * 1e6)
        print(f"| {r} | {result[0]:.2f} | {result[1]:.2f} |")


if __name__ == "__main__":
    main()
