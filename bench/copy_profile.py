"""Timeline of one prefetched layer copy on GPU (torch.profiler): when the host issues the NCCL
group call, when the NCCL kernel and the unpack copies run, when the call returns. Rank 0's view,
2 GPUs, bf16 DeepSeek-V3 experts, 4 of 9 slots per GPU moving, as in bench/copy_gpu.py.

    python3 bench/copy_profile.py
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.copy_gpu import fill, make_placements  # noqa: E402
from eplb.worker_hook.copy_exec import CopyExecutor  # noqa: E402


def worker(rank: int, port: int) -> None:
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120), device_id=device)
    dist.all_reduce(torch.ones(1, device=device))
    weights = [[torch.empty(9, 4096, 7168, dtype=torch.bfloat16, device=device),
                torch.empty(9, 7168, 2048, dtype=torch.bfloat16, device=device)] for _ in range(4)]
    copier = CopyExecutor(rank, 2, weights, ranks_per_node=2, timeout_s=60.0)
    old, new, _ = make_placements(4, 9, 2, 0.4, 0)
    original = dist.batch_isend_irecv
    stamps: list[float] = []

    def traced(ops):
        stamps.append(time.perf_counter())
        with record_function("batch_isend_irecv"):
            works = original(ops)
        stamps.append(time.perf_counter())
        return works
    dist.batch_isend_irecv = traced
    fill(weights, old, rank)
    # Host phases without the profiler, median of 20 calls: before the group call, inside it,
    # after it (waiting for the wire and the unpack, then polling); the same for one message.
    phases: dict[str, list[tuple[float, float, float]]] = {"ours (prefetched)": [], "one message": []}
    send = torch.empty(4 * 3 * 2048 * 7168 * 2, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    for i in range(40):
        layer = i % 4
        fill(weights, old, rank) if layer == 0 else None
        copier.prefetch(2 + i, [layer], old, new)
        torch.cuda.synchronize()
        dist.barrier()
        stamps.clear()
        t0 = time.perf_counter()
        if i % 2:
            copier(2 + i, [layer], old, new)
            key = "ours (prefetched)"
        else:
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, 1 - rank),
                                             dist.P2POp(dist.irecv, recv, 1 - rank)]):
                w.wait()
            torch.cuda.synchronize()
            key = "one message"
        t1 = time.perf_counter()
        phases[key].append((stamps[0] - t0, stamps[1] - stamps[0], t1 - stamps[1]))
    # Does NCCL's work.wait() block the host while the transfer runs? (it should only order streams)
    waits, totals = [], []
    for _ in range(10):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, 1 - rank),
                                        dist.P2POp(dist.irecv, recv, 1 - rank)])
        t1 = time.perf_counter()
        for w in works:
            w.wait()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        waits.append(t2 - t1)
        totals.append(time.perf_counter() - t0)
    if rank == 0:
        print(f"one message: work.wait() took {sorted(waits)[5] * 1e3:.3f} ms of host time of "
              f"{sorted(totals)[5] * 1e3:.3f} ms in all (medians of 10)")
    if rank == 0:
        for key, rows in phases.items():
            med = [sorted(r[k] for r in rows)[len(rows) // 2] * 1e3 for k in range(3)]
            print(f"{key}: before the group call {med[0]:.3f} ms, inside it {med[1]:.3f} ms, "
                  f"after it {med[2]:.3f} ms (medians of {len(rows)})")
    fill(weights, old, rank)
    for layer in range(3):  # warm-up
        copier.prefetch(1, [layer], old, new)
        torch.cuda.synchronize()
        dist.barrier()
        copier(1, [layer], old, new)
    copier.prefetch(1, [3], old, new)
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("copy_call"):
            t0 = time.perf_counter()
            copier(1, [3], old, new)
            wall = time.perf_counter() - t0
    if rank == 0:
        events = [e for e in prof.events()]
        call = next(e for e in events if e.name == "copy_call")
        base = call.time_range.start
        print(f"wall {wall * 1e3:.3f} ms (perf_counter) on {torch.cuda.get_device_name(device)}")
        rows = []
        for e in events:
            dev = e.device_type == torch.autograd.DeviceType.CUDA
            if e.name in ("copy_call", "batch_isend_irecv") or (dev and ("nccl" in e.name.lower() or "copy" in e.name.lower() or "Memcpy" in e.name)):
                rows.append((e.time_range.start - base, e.time_range.end - base, "GPU" if dev else "CPU", e.name[:70]))
        for start, end, where, name in sorted(rows):
            print(f"{start / 1e3:8.3f} -> {end / 1e3:8.3f} ms  {where}  {name}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(port,), nprocs=2, start_method="spawn")
