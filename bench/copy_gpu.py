"""Copy-engine benchmark: DeepSeek-V3-sized experts moved between GPUs by CopyExecutor.

One process per GPU (NCCL; gloo with --device cpu for a dry run), 2 or more. Per rank and layer: 9+ slots of
w13 ``[S, 2I, H]`` and w2 ``[S, H, I]`` (H=7168, I=2048), in bf16 (88 MB an expert) or as fp8-sized
uint8 bytes (44 MB an expert). Measured in the same run:
  - the NCCL P2P ceiling for the same traffic pattern: one large message per peer each way, all in
    one batch, GB/s received per rank;
  - our copy of a realistic rebalance (``--change`` of each GPU's slots take other GPUs' experts),
    per layer;
  - the "move everything" baseline: every slot of the layer replaced from another GPU.
Patterns (``--patterns``): ``ring``, each GPU takes from the previous one and sends to the next
(with 2 GPUs, an exchange); ``all-pairs``, the moving slots of a GPU take from every other GPU in
turn (slot j from the GPU j % (world - 1) + 1 before it), so every pair of GPUs exchanges at once.
After each copy every slot is checked against the expert it must hold (first and last element).

    python3 bench/copy_gpu.py                # every visible GPU (--world N for fewer)
    python3 bench/copy_gpu.py --device cpu --hidden 64 --inter 32   # dry run with gloo
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eplb.worker_hook.copy_exec import CopyExecutor  # noqa: E402
from eplb.placement.copy_plan import plan_copies  # noqa: E402

def distances(pattern: str, count: int, world: int) -> list[int]:
    """For each of ``count`` moving slots of a rank, how many ranks before it its source is."""
    if pattern == "ring":
        return [1] * count
    return [1 + j % (world - 1) for j in range(count)]


def make_placements(layers: int, slots: int, world: int, change: float, seed: int,
                    pattern: str = "ring") -> tuple[torch.Tensor, ...]:
    """old ``[L, world * S]`` (each expert once); new: on every rank r the j-th of ``change`` of
    its slots takes the expert of the j-th picked slot of rank r - distances[j] (so each rank sends
    and receives the same number of experts); full: every slot j of rank r takes the expert of
    slot j of rank r - distances[j] (all experts move)."""
    gen = torch.Generator().manual_seed(seed)
    old = torch.stack([torch.randperm(world * slots, generator=gen) for _ in range(layers)])
    new = old.clone()
    k = max(1, round(change * slots))
    moving = distances(pattern, k, world)
    for layer in range(layers):
        picked = [torch.randperm(slots, generator=gen)[:k] + r * slots for r in range(world)]
        for r in range(world):
            for j, d in enumerate(moving):
                new[layer, picked[r][j]] = old[layer, picked[(r - d) % world][j]]
    full = old.clone()
    for r in range(world):
        for j, d in enumerate(distances(pattern, slots, world)):
            full[:, r * slots + j] = old[:, ((r - d) % world) * slots + j]
    return old, new, full


def fill(weights: list[list[torch.Tensor]], placement: torch.Tensor, rank: int) -> None:
    """Each slot's tensors hold a value that names (layer, expert), so copies can be checked."""
    slots = weights[0][0].shape[0]
    for layer, tensors in enumerate(weights):
        for s in range(slots):
            expert = int(placement[layer, rank * slots + s])
            for t in tensors:
                t[s].fill_((layer * 31 + expert * 7 + 1) % 120)


def check(weights: list[list[torch.Tensor]], placement: torch.Tensor, rank: int) -> int:
    slots = weights[0][0].shape[0]
    bad = 0
    for layer, tensors in enumerate(weights):
        for s in range(slots):
            want = (layer * 31 + int(placement[layer, rank * slots + s]) * 7 + 1) % 120
            for t in tensors:
                flat = t[s].reshape(-1)
                bad += int(flat[0].item() != want or flat[-1].item() != want)
    return bad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exchange_gbps(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]],
                  device: torch.device, repeats: int) -> float:
    """GB/s received per rank when every (distance d, tensor) of ``sends`` goes to rank + d and
    every one of ``recvs`` comes from rank - d, one isend/irecv per tensor in one batch (median of
    ``repeats`` after a warm-up)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    nbytes = sum(t.numel() * t.element_size() for _, t in recvs)
    times = []
    for i in range(repeats + 1):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        ops = [dist.P2POp(dist.isend, t, (rank + d) % world) for d, t in sends]
        ops += [dist.P2POp(dist.irecv, t, (rank - d) % world) for d, t in recvs]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def ceiling(per_expert: int, moving: list[int], device: torch.device, repeats: int) -> float:
    """GB/s received per rank when the experts of ``moving`` (a source distance per expert) go as
    one large message per peer each way, all at once."""
    sends = []
    for d in sorted(set(moving)):
        t = torch.empty(per_expert * moving.count(d), dtype=torch.uint8, device=device)
        sends.append((d, t))
    return exchange_gbps(sends, [(d, torch.empty_like(t)) for d, t in sends], device, repeats)


def op_pattern_ceiling(shapes: list[tuple[int, ...]], dtype: torch.dtype, moving: list[int],
                       device: torch.device, repeats: int) -> float:
    """GB/s received per rank when the experts of ``moving`` go with one isend/irecv per weight
    tensor, all in one batch: the ceiling for that op pattern."""
    sends = [(d, torch.empty(shape, dtype=dtype, device=device)) for d in moving for shape in shapes]
    return exchange_gbps(sends, [(d, torch.empty_like(t)) for d, t in sends], device, repeats)


def timed_copy(copier: CopyExecutor, weights, old: torch.Tensor, new: torch.Tensor, rank: int,
               device: torch.device, epoch: int, mode: str = "inline") -> list[tuple[float, int, float]]:
    """Copy every layer from old to new, one layer per call (a chunk per step).

    ``mode``: ``inline`` plans, packs and sends inside the timed call; ``prefetch`` first
    prepares the layer with ``copier.prefetch`` outside it (as the hook does during the step
    before); ``start`` first issues the layer's transfers with ``copier.start`` and waits for the
    device (the wire runs during the step before), so the timed call only lands them. The part
    before the call is timed on its own (host call + device until done).
    Returns (seconds of the call, bytes received, seconds before it) per layer."""
    fill(weights, old, rank)
    out = []
    for layer in range(old.shape[0]):
        ahead = 0.0
        if mode != "inline":
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            (copier.prefetch if mode == "prefetch" else copier.start)(epoch, [layer], old, new)
            sync(device)
            ahead = time.perf_counter() - t0
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        stats = copier(epoch, [layer], old, new)
        sync(device)
        out.append((time.perf_counter() - t0, stats.bytes_received, ahead))
        if stats.prefetched_layers != int(mode == "prefetch") or \
                stats.started_layers != int(mode == "start"):
            raise SystemExit(f"rank {rank}: prefetched_layers {stats.prefetched_layers}, "
                             f"started_layers {stats.started_layers} in mode {mode}")
    bad = check(weights, new, rank)
    if bad:
        raise SystemExit(f"rank {rank}: {bad} slot tensors hold the wrong expert after the copy")
    return out


def plan_ms(old: torch.Tensor, new: torch.Tensor, world: int) -> float:
    """Median host time of planning one layer's copies (part of every copy call)."""
    times = []
    for layer in range(old.shape[0]):
        t0 = time.perf_counter()
        plan_copies(old, new, [layer], world, world)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def worker(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world, timeout=timedelta(seconds=120), **kwargs)
    dist.all_reduce(torch.ones(1, device=device))  # the communicator exists before any P2P
    rows = {}
    for pattern, dtype_name in [(p, d) for p in args.patterns for d in args.dtypes]:
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.uint8
        weights = [[torch.empty(args.slots, 2 * args.inter, args.hidden, dtype=dtype, device=device),
                    torch.empty(args.slots, args.hidden, args.inter, dtype=dtype, device=device)]
                   for _ in range(args.layers)]
        per_expert = sum(t[0].numel() * t.element_size() for t in weights[0])
        old, new, full = make_placements(args.layers, args.slots, args.world, args.change, args.seed,
                                         pattern)
        k = max(1, round(args.change * args.slots))
        ceil_full = ceiling(per_expert, distances(pattern, args.slots, args.world), device,
                            args.repeats)
        ceil_same = ceiling(per_expert, distances(pattern, k, args.world), device, args.repeats)
        shapes = [tuple(t.shape[1:]) for t in weights[0]]
        op_ceiling = op_pattern_ceiling(shapes, dtype, distances(pattern, k, args.world), device,
                                        args.repeats)
        variants = {}
        for piece_mb in args.piece_mb:
            for ahead in ("inline", "prefetch", "start"):
                copier = CopyExecutor(rank, args.world, weights, ranks_per_node=args.world,
                                      timeout_s=120.0, piece_bytes=int(piece_mb * 2**20))
                timed_copy(copier, weights, old, new, rank, device, 0, ahead)  # warm-up
                timed_copy(copier, weights, old, full, rank, device, 0, ahead)
                ours, everything = [], []
                for r in range(args.repeats):
                    ours += timed_copy(copier, weights, old, new, rank, device, 1 + 2 * r, ahead)
                    everything += timed_copy(copier, weights, old, full, rank, device, 2 + 2 * r,
                                             ahead)
                variants[(piece_mb, ahead)] = (copier.experts_per_piece, ours, everything)
        rows[(pattern, dtype_name)] = (per_expert, k, ceil_full, ceil_same, op_ceiling, variants,
                            plan_ms(old, new, args.world))
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--world", type=int, default=None,
                   help="ranks (GPUs); default: every visible GPU, or 2 on --device cpu")
    p.add_argument("--slots", type=int, default=9, help="slots per GPU per layer")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--change", type=float, default=0.4, help="share of each GPU's slots that move")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patterns", nargs="+", choices=("ring", "all-pairs"), default=None,
                   help="traffic patterns (module docstring); default: ring, plus all-pairs with "
                        "more than 2 ranks")
    p.add_argument("--piece-mb", type=float, nargs="+", default=[0],
                   help="CopyExecutor piece_bytes to compare, in MiB (0 = one piece per peer)")
    args = p.parse_args()
    if args.world is None:
        args.world = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.patterns is None:
        args.patterns = ["ring", "all-pairs"] if args.world > 2 else ["ring"]
    if args.world < 2 or (args.device == "cuda" and torch.cuda.device_count() < args.world):
        raise SystemExit(f"needs --world >= 2 GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, port, results)) for r in range(args.world)]
    for proc in procs:
        proc.start()
    rows = results.get(timeout=900)
    for proc in procs:
        proc.join(120)
        if proc.exitcode != 0:
            raise SystemExit(f"a rank exited with {proc.exitcode}")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo)"
    print(f"copy engine on {args.world} x {name}, torch {torch.__version__}; H={args.hidden} I={args.inter}, "
          f"{args.slots} slots per GPU, {args.layers} layers, {args.change:.0%} of slots move, "
          f"{args.repeats} repeats; times are rank 0's per layer (one copy call per layer, "
          "synchronized), GB/s = bytes received by the rank / time; ceilings: the same peers and bytes "
          "as one message per peer each way")
    print("| pattern | weights | MB per expert | piece MB (experts) | prefetched | ceiling GB/s: same bytes / "
          "whole layer | ours: experts in per layer | ours ms/layer | ours GB/s | % of same-bytes "
          "ceiling | % of whole-layer ceiling | prefetch ms/layer (before the step) | "
          "move-everything ms/layer | GB/s | % of whole-layer ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes, started = [], []
    for (pattern, dtype_name), (per_expert, k, ceil_full, ceil_same, op_ceiling, variants,
                                p_ms) in rows.items():
        for (piece_mb, ahead), (per_piece, ours, everything) in variants.items():
            o_t = statistics.median(t for t, _, _ in ours)
            o_b = statistics.median(b for _, b, _ in ours)
            o_a = statistics.median(a for _, _, a in ours)
            e_t = statistics.median(t for t, _, _ in everything)
            e_b = statistics.median(b for _, b, _ in everything)
            o_g, e_g = o_b / o_t / 1e9, e_b / e_t / 1e9
            piece = "whole (0)" if not piece_mb else f"{piece_mb:g} ({per_piece})"
            if ahead == "start":
                started.append(f"| {pattern} | {dtype_name} | {piece} | {o_t * 1e3:.2f} | "
                               f"{o_a * 1e3:.2f} | {o_b / o_a / 1e9:.1f} | "
                               f"{100 * o_b / o_a / 1e9 / ceil_same:.0f} % | {e_t * 1e3:.2f} |")
                continue
            print(f"| {pattern} | {dtype_name} | {per_expert / 1e6:.1f} | {piece} | {'yes' if ahead == 'prefetch' else 'no'} | "
                  f"{ceil_same:.1f} / {ceil_full:.1f} | {o_b / per_expert:.0f} | {o_t * 1e3:.2f} | "
                  f"{o_g:.1f} | {100 * o_g / ceil_same:.0f} % | {100 * o_g / ceil_full:.0f} % | "
                  f"{o_a * 1e3:.2f} | {e_t * 1e3:.2f} | {e_g:.1f} | {100 * e_g / ceil_full:.0f} % |")
        peers = len(set(distances(pattern, k, args.world)))
        notes.append(f"{pattern} {dtype_name}: the same-bytes ceiling moves {k * per_expert / 1e6:.0f} MB "
                     f"each way over {peers} peer(s), the whole-layer one {args.slots * per_expert / 1e6:.0f} MB "
                     f"over {len(set(distances(pattern, args.slots, args.world)))}; one isend/irecv per "
                     f"weight tensor ({k} experts each way in one batch) gives {op_ceiling:.1f} GB/s; planning one layer's copies takes {p_ms:.2f} ms of "
                     "host time inside every copy call")
    print("\n".join(notes))
    print("\ntransfers started a step ahead (CopyExecutor.start, as the hook does from chunk 0 on): "
          "the call at the step only lands them (unpack, local copies); before it, the start call "
          "plus waiting for the device, i.e. the wire time that runs beside the previous step")
    print("| pattern | weights | piece MB (experts) | at the step: ms/layer | before the step: start "
          "until the wire is done ms/layer | GB/s of that | % of same-bytes ceiling | "
          "move-everything at the step ms/layer |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(started))

if __name__ == "__main__":
    main()
