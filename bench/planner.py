"""Planner speed and balance at DeepSeek-V3 scale: 58 MoE layers, 256 experts in 288 slots.

For 32 / 72 / 144 GPUs over 4 / 9 / 18 nodes (8 expert groups) and three loads (lognormal
sigma 0.5 and 1.0, Zipf s = 1.1), both policies run in this process on the same loads. Prints plan
time (median of --repeats), balancedness (mean GPU load / max, averaged over layers) and how many
slots differ from the previous plan of a drift sequence (ten windows whose ranking shifts a little).

    .venv/bin/python bench/planner.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eplb.coordinator.planner import PlannerSpec, plan_placement
from eplb.placement import overall_balancedness

L, E, P, GROUPS = 58, 256, 288, 8


def loads(kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind.startswith("lognormal"):
        sigma = float(kind.split("=")[1])
        return (torch.randn(L, E, generator=gen, dtype=torch.float64) * sigma).exp() * 1000
    ranks = torch.stack([torch.randperm(E, generator=gen) for _ in range(L)]) + 1
    return 1e6 / ranks.double() ** 1.1


def drift(base: torch.Tensor, windows: int, seed: int) -> list[torch.Tensor]:
    """``windows`` loads: each swaps a few random pairs of experts' loads in every layer."""
    gen = torch.Generator().manual_seed(seed)
    out, load = [], base.clone()
    for _ in range(windows):
        for _ in range(4):
            i, j = torch.randint(E, (2,), generator=gen).tolist()
            load[:, [i, j]] = load[:, [j, i]]
        out.append(load.clone())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"planner at L={L}, E={E}, P={P}, {GROUPS} groups; one CPU thread, torch {torch.__version__}")
    print("| GPUs / nodes | load | policy | plan ms (median) | balancedness | slots moved per drift window |")
    print("|---|---|---|---|---|---|")
    for gpus, nodes in ((32, 4), (72, 9), (144, 18)):
        for kind in ("lognormal=0.5", "lognormal=1.0", "zipf=1.1"):
            load = loads(kind, seed=gpus)
            for policy in ("greedy", "deepseek"):
                spec = PlannerSpec(policy, GROUPS, nodes)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    plan = plan_placement(load, P, gpus, spec)
                    times.append(time.perf_counter() - t0)
                previous, moved = plan, []
                for window in drift(load, 10, seed=gpus + 1):
                    nxt = plan_placement(window, P, gpus, spec)
                    moved.append(int((nxt != previous).sum()))
                    previous = nxt
                print(f"| {gpus} / {nodes} | {kind} | {policy} | {statistics.median(times) * 1e3:.1f} | "
                      f"{overall_balancedness(load, plan, gpus):.4f} | {statistics.mean(moved):.0f} "
                      f"of {L * P} |")


if __name__ == "__main__":
    main()
