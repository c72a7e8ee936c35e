"""A worker process for the identity tests: a :class:`WorkerHook` for one rank that joins, says
``joined <pid>`` on stdout and steps until killed (``--once``: closes and exits 0 once joined).
It prints ``copy <epoch>`` for each chunk it copies and ``error <why>`` (exit 3) if it cannot
join."""

from __future__ import annotations

import argparse
import os
import time

import torch

from eplb.worker_hook import HookError, WorkerHook

L, E, P = 2, 4, 6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("run_dir")
    parser.add_argument("--node", type=int, default=0)
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--join-timeout", type=float, default=30.0)
    args = parser.parse_args()
    try:
        hook = WorkerHook(args.rank, args.world, L, E, P, node=args.node, run_dir=args.run_dir,
                          flush_every=2, heartbeat_s=0.2,
                          copy_fn=lambda e, layers, old, new: print(f"copy {e}", flush=True))
        hook.wait_joined(args.join_timeout)
    except HookError as exc:
        print(f"error {exc}", flush=True)
        return 3
    print(f"joined {os.getpid()}", flush=True)
    if args.once:
        hook.close()
        return 0
    step = 0
    while True:
        hook.on_step(step)
        hot = (step // 50) % E
        hook.record(0, torch.tensor([[hot, hot, hot, 1]]))
        step += 1
        time.sleep(0.002)


if __name__ == "__main__":
    raise SystemExit(main())
