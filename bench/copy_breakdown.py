"""Where a layer's copy time goes on GPU: pack, wire and unpack measured apart, and the wire with
the message cut into pieces, with and without copy kernels running beside it.

    python3 bench/copy_breakdown.py            # 2 GPUs, NCCL; bf16 DeepSeek-V3 experts

Prints one line per measurement (median of --repeats after a warm-up), rank 0's view.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def exchange(pieces_out: list[torch.Tensor], pieces_in: list[torch.Tensor]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    works = []
    for out, into in zip(pieces_out, pieces_in):
        works += dist.batch_isend_irecv([dist.P2POp(dist.isend, out, nxt),
                                         dist.P2POp(dist.irecv, into, prev)])
    for w in works:
        w.wait()


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world, timeout=timedelta(seconds=120), device_id=device)
    dist.all_reduce(torch.ones(1, device=device))
    expert = 3 * 2048 * 7168 * 2
    k = args.experts
    nbytes = k * expert
    src = torch.empty(9 * expert, dtype=torch.uint8, device=device)
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    into = torch.empty_like(out)
    side = torch.cuda.Stream(device)
    res = {}
    res["pack (device copy of the layer's bytes)"] = timed(lambda: out.copy_(src[:nbytes]), device, args.repeats)
    for n in (1, 2, 4, 8, 16):
        if nbytes % n:
            continue
        size = nbytes // n
        outs = list(out.split(size))
        ins = list(into.split(size))
        res[f"wire, {n} piece(s) of {size / 1e6:.0f} MB each way"] = timed(
            lambda: exchange(outs, ins), device, args.repeats)

        def with_copies() -> None:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    src[nbytes:2 * nbytes].copy_(src[:nbytes])
            exchange(outs, ins)
            torch.cuda.current_stream(device).wait_stream(side)
        res[f"wire, {n} piece(s), two layer-sized copies on a side stream"] = timed(
            with_copies, device, args.repeats)
    if rank == 0:
        print(f"{args.world} x {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"{k} bf16 experts ({nbytes / 1e6:.0f} MB) each way")
        for name, t in res.items():
            print(f"{t * 1e3:8.3f} ms  {nbytes / t / 1e9:7.1f} GB/s  {name}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args, port), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
