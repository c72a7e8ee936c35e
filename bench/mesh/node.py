"""One node's workers: M :class:`WorkerHook` instances in one process, a decode thread each,
no-op copies, until SIGTERM; then a report of what each rank saw, as JSON.

    python bench/mesh/node.py --node 3 --ranks 24,25,...,31 --world 144 --run-dir DIR \\
        --step-ms 20 --report DIR/report3.json

The report, per rank: the epochs whose COMMIT and ABORT reached it (``commits``, ``aborts``), the
epochs and layers its copy callback ran for (``copies``: [epoch, layers, step]), its failure if
any (``HoldTimeout``/``CopyFailed``), the hash of the placement it serves at the end, and its
last step. The driver checks these against the leader's history: a rank switched layers only
for an epoch it got a COMMIT for and the leader committed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

L, E = 4, 64


def num_physical(world: int) -> int:
    """``P``: slots per layer, a multiple of the world size, at least 2 E."""
    return world * math.ceil(2 * E / world)


def run(args: argparse.Namespace) -> None:
    import torch

    from eplb.placement.rules import placement_hash
    from eplb.proto import Abort, Commit
    from eplb.worker_hook import WorkerHook

    torch.set_num_threads(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ranks = [int(r) for r in args.ranks.split(",")]
    seen: dict[int, dict] = {r: {"commits": [], "aborts": [], "copies": [], "failure": None}
                             for r in ranks}
    lock = threading.Lock()
    hooks: dict[int, WorkerHook] = {}

    def on_event(rank: int):
        def record(msg) -> None:
            if isinstance(msg, (Commit, Abort)):
                with lock:
                    seen[rank]["commits" if isinstance(msg, Commit) else "aborts"].append(msg.epoch)
        return record

    def copy_fn(rank: int):
        def copy(epoch: int, layers: list[int], old, new) -> None:
            with lock:
                seen[rank]["copies"].append([epoch, list(layers), hooks[rank].current_step])
        return copy

    P = num_physical(args.world)
    for r in ranks:
        hooks[r] = WorkerHook(r, args.world, L, E, P, node=args.node, run_dir=args.run_dir,
                              copy_fn=copy_fn(r), on_event=on_event(r),
                              flush_every=args.flush_every,
                              hold_timeout_s=args.hold_timeout)

    def decode(hook: WorkerHook) -> None:
        # Every rank of the mesh runs step k at clock_zero + k * step_ms (or as soon as it can
        # when behind), as an engine's ranks run in lockstep; a node that starts late joins at
        # the step the others are at.
        gen = torch.Generator().manual_seed(hook.rank)
        dt = args.step_ms / 1e3
        step = max(0, int((time.time() - args.clock_zero) / dt))
        try:
            while not stop.is_set():
                hook.on_step(step)
                hot = (step // 10) * 7919 % E  # the hot expert moves: each plan differs
                ids = torch.randint(E, (16, 2), generator=gen)
                ids[:8, 0] = hot
                for layer in range(L):
                    hook.record(layer, ids)
                step += 1
                stop.wait(max(0.0, args.clock_zero + step * dt - time.time()))
        except Exception as exc:  # HoldTimeout, CopyFailed: the rank stops serving
            with lock:
                seen[hook.rank]["failure"] = f"{type(exc).__name__}: {exc}"

    started = time.monotonic()
    for h in hooks.values():
        h.wait_joined(max(1.0, args.join_timeout - (time.monotonic() - started)))
    threads = [threading.Thread(target=decode, args=(h,), daemon=True) for h in hooks.values()]
    for t in threads:
        t.start()
    stop.wait()
    stopped = time.monotonic()
    for t in threads:
        t.join(10)
    report = {}
    for r, h in hooks.items():
        report[r] = {**seen[r], "placement_hash": placement_hash(h.phys2log),
                     "step": h.current_step, "max_on_step_ms": round(h.max_on_step_seconds * 1e3, 3)}
        h.close()
    tmp = args.report.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(args.report)
    print(f"node {args.node}: stopped at {time.time():.3f}, report written "
          f"{time.monotonic() - stopped:.2f} s later", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--ranks", required=True, help="comma-separated global ranks")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--clock-zero", type=float, default=None,
                   help="wall time (time.time()) of step 0, the same for every node (default: "
                        "now)")
    p.add_argument("--hold-timeout", type=float, default=30.0)
    p.add_argument("--flush-every", type=int, default=8, help="steps between counts flushes")
    p.add_argument("--join-timeout", type=float, default=120.0)
    p.add_argument("--report", type=Path, required=True)
    args = p.parse_args(argv)
    if args.clock_zero is None:
        args.clock_zero = time.time()
    run(args)
    # The report is written and every hook closed; skip the interpreter's teardown, which took
    # 15-20 s here after the hooks' close() (the driver then had to SIGKILL the process).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
