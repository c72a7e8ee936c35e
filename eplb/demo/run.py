"""``eplbctl demo``: 2 sidecars (as if 2 nodes) x 2 workers on this machine, a synthetic decode
loop with skewed, drifting expert load, real rebalances, and a summary computed from what the
processes measured."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from eplb.control_client import ControlError
from eplb.demo.cluster import LocalCluster, free_port


@dataclass(frozen=True)
class DemoOptions:
    nodes: int = 2
    workers_per_node: int = 2
    steps: int = 2000
    layers: int = 4
    experts: int = 16
    physical: int = 24
    interval: int = 300
    window: int = 300
    step_ms: float = 2.0
    drift_every: int = 400
    seed: int = 1
    keep: bool = False
    timeout_s: float = 300.0


def run_demo(opts: DemoOptions, out=sys.stdout) -> int:
    """Run the demo; print progress and the summary to ``out``. Returns a process exit code."""
    world = opts.nodes * opts.workers_per_node
    if opts.physical % world:
        print(f"eplbctl demo: --physical {opts.physical} must be divisible by the {world} workers",
              file=out)
        return 2
    if opts.physical < opts.experts:
        print(f"eplbctl demo: --physical must be >= --experts ({opts.experts})", file=out)
        return 2
    cluster = LocalCluster(opts.nodes, ["--interval", str(opts.interval), "--window", str(opts.window),
                                        "--min-gain", "0.02", "--log-level", "INFO"])
    print(f"eplb demo: {opts.nodes} sidecars x {opts.workers_per_node} workers, {opts.layers} MoE "
          f"layers, {opts.experts} experts in {opts.physical} slots, {opts.steps} steps "
          f"(rebalance every {opts.interval} steps); logs in {cluster.log_dir}", file=out, flush=True)
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    results: list[dict[str, Any]] = []
    status: dict[str, Any] = {}
    try:
        cluster.start()
        cluster.wait_ready(60.0)
        for rank in range(world):
            node = rank // opts.workers_per_node
            cluster.start_worker([
                "--rank", str(rank), "--world-size", str(world),
                "--ranks-per-node", str(opts.workers_per_node),
                "--run-dir", str(cluster.run_dir(node)), "--dist-init", dist_init,
                "--steps", str(opts.steps), "--layers", str(opts.layers),
                "--experts", str(opts.experts), "--physical", str(opts.physical),
                "--step-ms", str(opts.step_ms), "--drift-every", str(opts.drift_every),
                "--seed", str(opts.seed),
                "--result", str(cluster.base_dir / f"worker{rank}.json")], f"worker{rank}.log")
        deadline = time.monotonic() + opts.timeout_s
        last_line = ""
        while any(w.poll() is None for w in cluster.workers):
            if time.monotonic() > deadline:
                print(f"eplbctl demo: workers did not finish within {opts.timeout_s:g}s", file=out)
                return 1
            try:
                status = cluster.status(timeout_s=2.0)
                line = _progress_line(status, opts.steps)
                if line != last_line and status.get("workers"):
                    print(line, file=out, flush=True)
                    last_line = line
            except ControlError:
                pass
            time.sleep(0.5)
        try:
            status = cluster.status(timeout_s=5.0)
        except ControlError as exc:
            print(f"eplbctl demo: could not read the leader's final status: {exc}", file=out)
        for rank in range(world):
            path = cluster.base_dir / f"worker{rank}.json"
            results.append(json.loads(path.read_text()) if path.exists()
                           else {"rank": rank, "ok": False, "error": "no result file"})
    finally:
        cluster.stop()
    code = print_summary(status, results, opts, out)
    if code == 0 and not opts.keep:
        shutil.rmtree(cluster.base_dir, ignore_errors=True)
    else:
        print(f"run directory and logs kept in {cluster.base_dir}", file=out)
    return code


def _progress_line(status: dict[str, Any], steps: int) -> str:
    c = status.get("counters", {})
    bal = status.get("balancedness")
    phase = status.get("epoch_in_flight")
    return (f"  step {status.get('min_step', 0):>5}/{steps}  workers {len(status.get('workers', []))}"
            f"/{status.get('world_size') or '?'}  balancedness "
            f"{'-' if bal is None else f'{bal:.3f}'}  epochs: {c.get('committed', 0)} committed, "
            f"{c.get('skipped', 0)} skipped, {c.get('aborted', 0)} aborted"
            + (f"  [epoch {phase['epoch']} {phase['phase']}]" if phase else ""))


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(status: dict[str, Any], results: list[dict[str, Any]], opts: DemoOptions,
                  out) -> int:
    """Print the demo's summary; return 0 only if a rebalance committed and raised balancedness,
    every worker finished and every weight check passed."""
    history = status.get("history", [])
    print("\nrebalances (balancedness = mean GPU load / max GPU load over the window, 1.0 is "
          "perfect):", file=out)
    print(f"  {'epoch':>5}  {'outcome':<10} {'S':>6} {'before':>7} {'planned':>8} {'measured':>9}"
          f" {'moved':>6} {'agree ms':>9} {'hold ms':>8}  reason", file=out)
    for r in history:
        print(f"  {r['epoch'] if r['epoch'] is not None else '-':>5}  {r['outcome']:<10} "
              f"{r['switch_step'] if r['switch_step'] is not None else '-':>6} "
              f"{_fmt(r['balancedness_before']):>7} {_fmt(r['balancedness_predicted']):>8} "
              f"{_fmt(r['balancedness_observed']):>9} {r['experts_moved']:>6} "
              f"{_fmt(r['agreement_ms'], '.2f'):>9} {_fmt(r['max_hold_ms'], '.2f'):>8}  "
              f"{r['reason'][:70]}", file=out)
    c = status.get("counters", {})
    print(f"  committed {c.get('committed', 0)}, skipped {c.get('skipped', 0)}, aborted "
          f"{c.get('aborted', 0)}, failed {c.get('failed', 0)}", file=out)

    ok_workers = [r for r in results if "step_ms" in r]
    failures = [r for r in results if not r.get("ok")]
    for r in failures:
        print(f"  rank {r['rank']} FAILED: {r.get('error') or 'weight mismatch'}", file=out)
    if ok_workers:
        steps_ms = [statistics.median(x) for x in zip(*(r["step_ms"] for r in ok_workers))]
        normal = statistics.median(steps_ms)
        hook_p50 = statistics.median(r["hook_us_p50"] for r in ok_workers)
        hook_p99 = max(r["hook_us_p99"] for r in ok_workers)
        copy_steps = [c for r in ok_workers for c in r["copy_steps"]]
        worst_copy = max((c["ms"] for c in copy_steps), default=0.0)
        worst_hook = max(r["max_on_step_ms"] for r in ok_workers)
        checks = sum(r["weight_checks"] for r in ok_workers)
        mismatches = sum(r["weight_mismatches"] for r in ok_workers)
        first = next((r["switch_step"] for r in history if r["outcome"] == "committed"), None)
        print("\ndecode loop (median over ranks of each step):", file=out)
        print(f"  step time p50 {normal:.2f} ms, p99 {_pct(steps_ms, 0.99):.2f} ms, max "
              f"{max(steps_ms):.2f} ms", file=out)
        if first is not None and first > 50:
            moe = [statistics.median(x) for x in zip(*(r["moe_ms"] for r in ok_workers))]
            before = statistics.mean(moe[:first])
            after = statistics.mean(moe[first:]) if len(moe) > first else None
            print(f"  simulated expert time per step ({opts.step_ms:g} ms x max/mean GPU load): "
                  f"{before:.2f} ms before the first rebalance, {_fmt(after, '.2f')} ms after it "
                  "(the rest of a step is this machine running 6 processes on its cores)", file=out)
        print(f"  hook on_step on steps without a copy: p50 {hook_p50:.1f} us, p99 {hook_p99:.1f} us "
              "(this machine's cores are shared by every process of the demo)", file=out)
        print(f"  worst extra time one step paid inside the hook: {worst_hook:.2f} ms (steps with copy "
              f"work, transfers started or landed: {len(copy_steps)} over all ranks, slowest "
              f"{worst_copy:.2f} ms)", file=out)
        print(f"  weights checked after every layer switch on every rank: {checks} checks, "
              f"{mismatches} mismatched slots", file=out)
    gains = [r for r in history if r["outcome"] == "committed"
             and r["balancedness_before"] is not None and r["balancedness_predicted"] is not None
             and r["balancedness_predicted"] > r["balancedness_before"]]
    if failures or not ok_workers:
        print("\nRESULT: FAILED (see the rank errors above and the logs)", file=out)
        return 1
    if not gains:
        print("\nRESULT: no rebalance committed with a balancedness gain; try more --steps", file=out)
        return 1
    print(f"\nRESULT: ok, {len(gains)} rebalance(s) committed and raised balancedness", file=out)
    return 0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]
