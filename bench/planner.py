"""Planner speed, balance and moves at DeepSeek-V3 scale: 58 MoE layers, 256 experts in 288 slots.

For 32 / 72 / 144 GPUs over 4 / 9 / 18 nodes (8 expert groups) and three loads (lognormal
sigma 0.5 and 1.0, Zipf s = 1.1), every policy runs in this process, on one CPU thread, on the
same loads. Each starts from the engine's default placement, plans the base load, then plans a
drift sequence of ten windows: ``stable`` plans from its own previous output, ``deepseek`` and
``greedy`` from scratch; slots moved are counted against the placement that policy was serving.
Two drift models, one table each: ``pairs`` (each window swaps the loads of 4 random pairs of
experts in every layer: a few experts change a lot) and ``noise`` (each window multiplies every
load by ``exp(N(0, 0.1^2))``: every expert changes a little, as sampling noise and slow trends
move loads).

Columns: plan ms = median over the ten drift plans (and the base plan from the default placement
for stable, in brackets); balancedness = mean GPU load / max, averaged over layers, on the base
load and (mean) over the drift windows; slots moved = mean per drift window, and those of the base
plan from the default placement (the first rebalance of a fresh engine). The checks at the end
are the goals of issue 4: stable >= deepseek - 0.005 on every load, stable moves <= 1/3 of
deepseek's on drift, and <= 10 ms per plan at 144 GPUs.

    .venv/bin/python bench/planner.py
    .venv/bin/python bench/planner.py --gpus 144 --policies deepseek,stable --drift pairs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eplb.placement.planner import PlannerSpec, plan_placement
from eplb.demo.workload import drift_windows, noise_windows, planner_load
from eplb.placement.load import overall_balancedness
from eplb.placement.rules import default_placement

L, E, P, GROUPS = 58, 256, 288, 8
NOISE_SIGMA = 0.1


def drift(model: str, load: torch.Tensor, windows: int, seed: int) -> list[torch.Tensor]:
    """The drift windows of ``model`` (``pairs`` or ``noise``) after ``load``."""
    if model == "pairs":
        return drift_windows(load, windows, seed=seed)
    return noise_windows(load, windows, seed=seed, sigma=NOISE_SIGMA)


def loads(kind: str, seed: int) -> torch.Tensor:
    return planner_load(kind, L, E, seed)


def timed(load: torch.Tensor, gpus: int, spec: PlannerSpec,
          current: torch.Tensor) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    plan = plan_placement(load, P, gpus, spec, current)
    return plan, time.perf_counter() - started


def run(load: torch.Tensor, windows: list[torch.Tensor], gpus: int,
        spec: PlannerSpec) -> dict[str, object]:
    """One policy over the base load and the drift windows."""
    start = default_placement(L, E, P)
    plan, first = timed(load, gpus, spec, start)
    row: dict[str, object] = {"first_ms": first * 1e3, "balance": overall_balancedness(load, plan, gpus),
                              "first_moved": int((plan != start).sum())}
    times, moved, drift_balance = [], [], []
    for window in windows:
        nxt, seconds = timed(window, gpus, spec, plan)
        times.append(seconds)
        moved.append(int((nxt != plan).sum()))
        drift_balance.append(overall_balancedness(window, nxt, gpus))
        plan = nxt
    row.update(ms=statistics.median(times) * 1e3, moved=statistics.mean(moved),
               drift_balance=drift_balance)
    return row


def check(model: str, gpus: int, nodes: int, kind: str, s: dict[str, object],
          d: dict[str, object]) -> str:
    """One line of the goal checks of issue 4, stable (``s``) against deepseek (``d``)."""
    worst = min([s["balance"] - d["balance"]]
                + [a - b for a, b in zip(s["drift_balance"], d["drift_balance"])])
    ratio = s["moved"] / max(d["moved"], 1)
    return (f"{model:<5} {gpus:>3} / {nodes:<2} {kind:<13} balance: stable - deepseek >= "
            f"{worst:+.4f} ({'ok' if worst >= -0.005 else 'FAIL'}); moves: stable / "
            f"deepseek = {ratio:.2f} ({'ok' if ratio <= 1 / 3 else 'over 1/3'})"
            + (f"; stable plan {s['ms']:.1f} ms ({'ok' if s['ms'] <= 10 else 'over 10 ms'})"
               if gpus == 144 else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="deepseek,stable,greedy",
                   help="comma-separated; deepseek and stable are needed for the checks")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--gpus", default="32,72,144",
                   help="comma-separated GPU counts to run, of 32, 72 and 144")
    p.add_argument("--drift", default="pairs,noise",
                   help="comma-separated drift models, of pairs and noise (one table each)")
    args = p.parse_args()
    nodes_of = {32: 4, 72: 9, 144: 18}
    if not set(args.gpus.split(",")) <= {str(g) for g in nodes_of}:
        p.error(f"--gpus {args.gpus!r}: use GPU counts of 32, 72 and 144")
    if not set(args.drift.split(",")) <= {"pairs", "noise"}:
        p.error(f"--drift {args.drift!r}: use pairs, noise or both")
    sizes = [(int(g), nodes_of[int(g)]) for g in args.gpus.split(",")]
    policies = args.policies.split(",")
    torch.set_num_threads(1)
    print(f"planner at L={L}, E={E}, P={P}, {GROUPS} groups; one CPU thread, torch {torch.__version__}")
    checks: list[str] = []
    for model in args.drift.split(","):
        print()
        print(f"drift: {model}" + (f" (sigma {NOISE_SIGMA})" if model == "noise" else " (4 pairs)"))
        print("| GPUs / nodes | load | policy | plan ms (median) | balancedness | drift balancedness "
              "(mean) | slots moved per drift window | slots moved by the first plan |")
        print("|---|---|---|---|---|---|---|---|")
        for gpus, nodes in sizes:
            for kind in ("lognormal=0.5", "lognormal=1.0", "zipf=1.1"):
                load = loads(kind, seed=gpus)
                windows = drift(model, load, args.windows, seed=gpus + 1)
                rows = {}
                for policy in policies:
                    row = rows[policy] = run(load, windows, gpus, PlannerSpec(policy, GROUPS, nodes))
                    ms = f"{row['ms']:.1f}" + (f" ({row['first_ms']:.0f})" if policy == "stable" else "")
                    print(f"| {gpus} / {nodes} | {kind} | {policy} | {ms} | {row['balance']:.4f} | "
                          f"{statistics.mean(row['drift_balance']):.4f} | {row['moved']:.0f} of {L * P} | "
                          f"{row['first_moved']} |")
                if "stable" in rows and "deepseek" in rows:
                    checks.append(check(model, gpus, nodes, kind, rows["stable"], rows["deepseek"]))
    print()
    print("checks (goals of issue 4):")
    for line in checks:
        print("  " + line)


if __name__ == "__main__":
    main()
