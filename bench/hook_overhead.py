"""Per-step cost of the worker hook on the decode thread, with no rebalance in flight.

Measures, in one process with a live background thread (a real sidecar is not needed for the
per-step path, which never touches the socket):
  - on_step alone (the once-per-step call; every ``flush_every`` steps it snapshots counters),
  - record() for one MoE layer (topk ids [tokens, k]),
  - a whole step: on_step + record for every layer.
Prints a table of mean / p50 / p99 / max in microseconds. Run: ``.venv/bin/python bench/hook_overhead.py``
(add ``--device cuda`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from eplb.worker_hook import WorkerHook


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, samples_us: list[float]) -> str:
    return (f"| {name:<34} | {statistics.mean(samples_us):8.2f} | {percentile(samples_us, 0.5):8.2f} "
            f"| {percentile(samples_us, 0.99):8.2f} | {max(samples_us):9.2f} |")


def arm_sync_check(device: torch.device) -> None:
    """Turn on torch's sync debug mode after proving that it catches a synchronizing call."""
    if device.type != "cuda":
        raise SystemExit("--check-sync needs --device cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ones(1, device=device).item()
    except RuntimeError:
        print("sync check armed: a deliberate .item() raised under sync_debug_mode('error')")
    else:
        raise SystemExit("sync debug mode did not catch .item(); the check would prove nothing")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--physical", type=int, default=288)
    p.add_argument("--world-size", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128, help="tokens per step on this rank")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--flush-every", type=int, default=64)
    p.add_argument("--check-sync", action="store_true",
                   help="CUDA only: run the measured steps under torch.cuda.set_sync_debug_mode"
                        "('error'), so any device synchronization on the decode thread raises")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    ids = [torch.randint(args.experts, (args.tokens, args.top_k), device=device)
           for _ in range(args.layers)]
    with tempfile.TemporaryDirectory(prefix="eplb-bench-", dir="/tmp") as run_dir:
        hook = WorkerHook(0, args.world_size, args.layers, args.experts, args.physical,
                          device=device, run_dir=run_dir, flush_every=args.flush_every)
        try:
            on_step, on_step_snap, record, whole = [], [], [], []
            if args.check_sync:
                arm_sync_check(device)
            for step in range(args.steps + 200):
                t0 = time.perf_counter()
                hook.on_step(step)
                t1 = time.perf_counter()
                hook.record(0, ids[0])
                t2 = time.perf_counter()
                for layer in range(1, args.layers):
                    hook.record(layer, ids[layer])
                t3 = time.perf_counter()
                if step >= 200:  # warm-up excluded
                    snapshot = step % args.flush_every == 0
                    (on_step_snap if snapshot else on_step).append((t1 - t0) * 1e6)
                    record.append((t2 - t1) * 1e6)
                    whole.append((t3 - t0) * 1e6)
            if args.check_sync:
                torch.cuda.set_sync_debug_mode(0)
                print(f"sync check: {args.steps + 200} steps ran under sync_debug_mode('error') "
                      f"without a device synchronization; hook thread alive: "
                      f"{hook._thread.is_alive()}")
            if device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            hook.close()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"hook overhead on {name}: {args.steps} steps, L={args.layers}, E={args.experts}, "
          f"topk [{args.tokens}, {args.top_k}], counters copied to host every {args.flush_every} steps, "
          f"torch {torch.__version__}")
    print("| call                               | mean us  | p50 us   | p99 us   | max us    |")
    print("|------------------------------------|----------|----------|----------|-----------|")
    print(row("on_step, all steps", on_step + on_step_snap))
    print(row("on_step, steps without a snapshot", on_step))
    print(row(f"on_step, snapshot steps (1 in {args.flush_every})", on_step_snap))
    print(row("record (one layer)", record))
    print(row(f"whole step: on_step + {args.layers} x record", whole))


if __name__ == "__main__":
    main()
