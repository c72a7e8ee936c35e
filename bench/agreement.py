"""PREPARE -> COMMIT latency of the step agreement, N sidecars x M workers on loopback.

Starts N real ``eplb-sidecar`` processes (node 0 leads) and, per node, one process that runs M
:class:`WorkerHook` instances, each with its own decode thread (``--step-ms`` per step, no-op
copies). Then forces ``--epochs`` rebalances one after another and reads, from the leader's
history, the time from PREPARE sent to COMMIT sent (every PROMISE in) and from PLAN to the last
DONE. Each configuration runs on both paths, one after the other in the same run: ``node``
(the default: each follower answers for its node, counts summed) and ``worker`` (followers
started with ``--per-worker-relay``: every worker frame relayed to the leader as it came). Also
reports the leader sidecar's CPU time per second over the epochs. Prints one table row per
configuration and path.

    .venv/bin/python bench/agreement.py --configs 2x2 4x4 16x8 --epochs 30
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

L, E, P = 4, 64, 128


def node_worker(args: argparse.Namespace) -> None:
    """One node's workers: M hooks, a decode thread each, running until SIGTERM."""
    import torch

    from eplb.worker_hook import WorkerHook

    torch.set_num_threads(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ranks = [int(r) for r in args.ranks.split(",")]
    hooks = [WorkerHook(r, args.world, L, E, P, node=args.node, run_dir=args.run_dir,
                        copy_fn=lambda *a: None, flush_every=8) for r in ranks]

    def decode(hook: WorkerHook) -> None:
        gen = torch.Generator().manual_seed(hook.rank)
        step = 0
        while not stop.is_set():
            hook.on_step(step)
            hot = (step // 10) * 7919 % E  # the hot expert moves, so each plan differs from the last
            ids = torch.randint(E, (16, 2), generator=gen)
            ids[:8, 0] = hot
            for layer in range(L):
                hook.record(layer, ids)
            step += 1
            stop.wait(args.step_ms / 1e3)

    for h in hooks:
        h.wait_joined(120)
    threads = [threading.Thread(target=decode, args=(h,), daemon=True) for h in hooks]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(10)
    for h in hooks:
        h.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_config(nodes: int, workers: int, epochs: int, step_ms: float, per_process: int,
               path: str) -> dict:
    from eplb.control_client import ControlError, control_call
    from eplb.demo.cluster import LocalCluster

    world = nodes * workers
    flags = ["--interval", "100000000", "--window", "50", "--min-gain", "0", "--planner",
             "thread", "--log-level", "WARNING", "--worker-timeout", "10", "--node-timeout", "10"]
    cluster = LocalCluster(nodes, flags + (["--per-worker-relay"] if path == "worker" else []))
    try:
        cluster.start()
        cluster.wait_ready(120)
        for node in range(nodes):
            node_ranks = list(range(node * workers, (node + 1) * workers))
            for i in range(0, workers, per_process):
                ranks = ",".join(map(str, node_ranks[i:i + per_process]))
                cluster.start_worker(["--node-worker", "--node", str(node), "--ranks", ranks,
                                      "--world", str(world), "--run-dir", str(cluster.run_dir(node)),
                                      "--step-ms", str(step_ms)], f"node{node}-{i}.log",
                                     command=[sys.executable, os.path.abspath(__file__)])
        cluster.wait_for(lambda s: len(s["workers"]) == world and s["min_step"] > 100, 300,
                         f"{world} workers joined and stepping")
        ended = 0
        leader_pid = cluster.sidecars[0].pid
        cpu0, t0 = cpu_seconds(leader_pid), time.monotonic()
        for _ in range(epochs):
            try:
                control_call("rebalance", {"force": True}, cluster.run_dir(0))
            except ControlError as exc:
                print(f"  rebalance refused: {exc}", file=sys.stderr)
                continue

            def finished(s: dict) -> bool:
                return (s["epoch_in_flight"] is None and not s["planning"]
                        and len(s["history"]) > ended)

            status = cluster.wait_for(finished, 60, "epoch finished")
            ended = len(status["history"])
        leader_cpu = (cpu_seconds(leader_pid) - cpu0) / (time.monotonic() - t0)
        history = cluster.status()["history"]
    finally:
        cluster.stop()
    committed = [r for r in history if r["outcome"] == "committed"]
    return {"nodes": nodes, "workers": workers, "history": history, "committed": committed,
            "step_ms": step_ms, "path": path, "leader_cpu": leader_cpu}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["2x2", "4x4", "8x8", "16x8"],
                   help="NODESxWORKERS per node")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--paths", nargs="+", default=["node", "worker"], choices=("node", "worker"),
                   help="node: followers answer for their node (the default path); worker: "
                        "followers run with --per-worker-relay")
    p.add_argument("--step-ms", type=float, default=20.0, help="decode step time of each worker")
    p.add_argument("--hooks-per-process", type=int, default=0,
                   help="workers per process (0: all of a node's workers in one process; 1: one "
                        "process per worker, as in a real engine, which needs many cores)")
    p.add_argument("--node-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--node", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ranks", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.node_worker:
        node_worker(args)
        return
    per = ("all of a node's workers in one process" if not args.hooks_per_process
           else f"{args.hooks_per_process} worker(s) per process")
    # The header first and each row as its run ends: a run cut short by a time limit keeps
    # the rows it finished.
    print(f"agreement latency on loopback, {os.cpu_count()} CPU cores, step {args.step_ms:g} ms, "
          f"{per}, L={L} E={E} P={P}; PREPARE->COMMIT = leader sends PREPARE until every PROMISE "
          "is in; leader CPU = the leader sidecar's CPU seconds per second over the epochs "
          "(planning included: epochs are forced back to back)", flush=True)
    print("| sidecars x workers | path | epochs committed/skipped/aborted | PREPARE->COMMIT p50 ms "
          "| p99 ms | max ms | worst hold at S ms | leader CPU % |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for config in args.configs:
        nodes, workers = map(int, config.split("x"))
        for path in args.paths:
            print(f"running {nodes} sidecars x {workers} workers, {path} path ...",
                  file=sys.stderr, flush=True)
            print_row(run_config(nodes, workers, args.epochs, args.step_ms,
                                 args.hooks_per_process or workers, path))


def print_row(r: dict) -> None:
    agree = [c["agreement_ms"] for c in r["committed"] if c["agreement_ms"] is not None]
    holds = [c["max_hold_ms"] for c in r["committed"]]
    outcomes = [h["outcome"] for h in r["history"]]
    print(f"| {r['nodes']} x {r['workers']} | {r['path']} | {outcomes.count('committed')}/"
          f"{outcomes.count('skipped')}/{outcomes.count('aborted')} | {pct(agree, 0.5):.2f} | "
          f"{pct(agree, 0.99):.2f} | {max(agree, default=float('nan')):.2f} | "
          f"{max(holds, default=0.0):.2f} | {100 * r['leader_cpu']:.0f} |", flush=True)

if __name__ == "__main__":
    main()
