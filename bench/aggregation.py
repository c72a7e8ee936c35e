"""Leader-side cost of counts, per worker vs per node (issue 17), on a DeepSeek-V3 shape.

Each flush interval (``--flush-steps`` decode steps) every rank has counted
``flush_steps x batch x top_k`` expert selections per MoE layer over ``[58, 256]`` experts, drawn
from a Zipf-like load (``--zipf``; a per-layer random ranking of experts). Two ways to bring them to
the leader, measured in the same run, on the real code:

* per worker: one COUNTS frame per rank (int64, as the hook sends it); the leader decodes each and
  feeds it to :meth:`LeaderCore.on_message` (window add, progress of the rank);
* per node: one NODE_COUNTS per node (the 8 ranks' sum, narrowest integer type); the leader
  decodes it and takes it as its ``on_peer`` does (``LeaderCore._on_node_counts``: one window
  entry, every rank's progress).

The leader is a real :class:`LeaderCore` holding every rank as a worker, its window one flush
interval long. Printed: frames and bytes per interval, leader CPU per interval (process time,
median over the measured intervals after one warm-up), and the share of one core that is at
``--step-ms`` per step. Also the bytes of a node's frame in other encodings (measured, not used:
see the notes printed), and the follower's cost to sum its ranks (:class:`NodeAggregator`).

    .venv/bin/python bench/aggregation.py --nodes 18 144 1000
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import msgpack
import torch

from eplb.coordinator.aggregate import NodeAggregator, SendUp
from eplb.coordinator.leader import LeaderConfig, LeaderCore, WorkerInfo
from eplb.placement.rules import default_placement
from eplb.proto import Counts, NodeCounts, decode, encode

L, E, P = 58, 256, 288  # DeepSeek-V3: 58 MoE layers, 256 routed experts, 32 redundant slots
TOP_K = 8


def zipf_load(gen: torch.Generator, s: float) -> torch.Tensor:
    """``[L, E]`` selection probabilities: Zipf(s) over a random ranking of experts per layer."""
    weights = torch.arange(1, E + 1, dtype=torch.float64) ** -s
    rows = [weights[torch.randperm(E, generator=gen)] for _ in range(L)]
    probs = torch.stack(rows)
    return probs / probs.sum(dim=1, keepdim=True)


def rank_counts(gen: torch.Generator, probs: torch.Tensor, selections: int) -> torch.Tensor:
    """``[L, E]`` int64: ``selections`` draws per layer."""
    return torch.stack([torch.multinomial(probs[layer], selections, replacement=True,
                                          generator=gen).bincount(minlength=E)
                        for layer in range(L)])


def varint_bytes(values: list[int]) -> int:
    """Bytes of LEB128 varints of non-negative ``values``."""
    return sum(max(1, (v.bit_length() + 6) // 7) for v in values)


def zigzag(values: list[int]) -> list[int]:
    return [2 * v if v >= 0 else -2 * v - 1 for v in values]


def leader_with(workers: int, per_node: int) -> LeaderCore:
    """A LeaderCore with ``workers`` ranks joined (set directly: HELLO's validation is not what
    is measured), its window one flush interval long."""
    core = LeaderCore(LeaderConfig(window_steps=1, interval_steps=1 << 40))
    core.shape, core.world_size = (L, E, P), workers
    core.placement = default_placement(L, E, P)
    core.workers = {r: WorkerInfo(r, r // per_node, 0, 0.0) for r in range(workers)}
    core.members.rank_node = {r: r // per_node for r in range(workers)}
    return core


def measure(nodes: int, per_node: int, intervals: int, flush_steps: int,
            worker_frames: list[list[bytes]], node_frames: list[list[bytes]]) -> dict:
    """Leader CPU seconds per interval, both ways, on fresh cores."""
    workers = nodes * per_node
    out: dict[str, float] = {}
    for way, pool, count in (("worker", worker_frames, workers), ("node", node_frames, nodes)):
        core = leader_with(workers, per_node)
        times = []
        for k in range(intervals + 1):
            frames = pool[k]
            now = float(k)
            started = time.process_time()
            if way == "worker":
                for i in range(count):
                    core.on_message(decode(frames[i % len(frames)]), now)
            else:
                for i in range(count):
                    msg = decode(frames[i % len(frames)])
                    assert core._on_node_counts(msg.node, msg, now) == []
            if k:  # the first interval warms up
                times.append(time.process_time() - started)
        assert len(core._window) == count, (way, len(core._window))
        out[way] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[18, 144, 1000])
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--flush-steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="decode tokens per rank per step")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--intervals", type=int, default=3, help="measured, after one warm-up")
    parser.add_argument("--pool", type=int, default=64,
                        help="distinct rank frames per interval (reused round robin; each has the "
                             "rank of its pool slot)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    probs = zipf_load(gen, args.zipf)
    per_node = args.ranks_per_node
    selections = args.flush_steps * args.batch * TOP_K
    pool = max(args.pool, per_node)
    pool -= pool % per_node

    worker_frames, node_frames = [], []
    node_tensors: list[list[torch.Tensor]] = []
    for k in range(args.intervals + 1):
        lo, hi = k * args.flush_steps, (k + 1) * args.flush_steps
        ranks = [rank_counts(gen, probs, selections) for _ in range(pool)]
        worker_frames.append([encode(Counts(rank=r, from_step=lo, to_step=hi, counts=c))
                              for r, c in enumerate(ranks)])
        sums = [sum(ranks[q * per_node:(q + 1) * per_node]) for q in range(pool // per_node)]
        node_tensors.append(sums)
        node_frames.append([encode(NodeCounts(node=q, ranks=tuple(range(q * per_node, (q + 1) * per_node)),
                                              steps=(hi,) * per_node, from_step=lo, to_step=hi,
                                              counts=s)) for q, s in enumerate(sums)])

    worker_bytes = len(worker_frames[0][0])
    node_bytes = statistics.mean(len(f) for f in node_frames[0])
    node_sum = node_tensors[1][0]
    values = node_sum.flatten().tolist()
    previous = node_tensors[0][0].flatten().tolist()
    wire = msgpack.unpackb(node_frames[0][0], raw=False)["counts"]["dtype"]
    interval_s = args.flush_steps * args.step_ms / 1e3

    print(f"# DeepSeek-V3 counts [{L}, {E}], {per_node} ranks/node, flush every {args.flush_steps} "
          f"steps x {args.batch} tokens x top-{TOP_K}, Zipf s={args.zipf}; a node's sum peaks at "
          f"{int(node_sum.max())} (sent as {wire}); one interval = {interval_s:g} s at "
          f"{args.step_ms:g} ms/step")
    print()
    print("## One node's counts per flush, bytes")
    print("| encoding | bytes | note |")
    print("|---|---:|---|")
    rows = [
        ("8 x COUNTS int64 (per worker, today)", 8 * worker_bytes, "frames as the hook sends them"),
        (f"NODE_COUNTS {wire} (chosen)", node_bytes, "whole frame, msgpack header included"),
        ("raw int64 tensor", node_sum.numel() * 8, ""),
        ("raw int32 tensor", node_sum.numel() * 4, ""),
        ("sparse: uint16 index + int32 value", int((node_sum != 0).sum()) * 6,
         f"{int((node_sum != 0).sum())} of {node_sum.numel()} non-zero: dense"),
        ("varint (LEB128) of the values", varint_bytes(values), "stateless; a byte loop to decode"),
        ("zigzag varint of delta vs the previous flush", varint_bytes(zigzag(
            [a - b for a, b in zip(values, previous)])),
         "stateful: one lost frame corrupts every later sum"),
        ("zlib level 1 of int32", len(zlib.compress(node_sum.to(torch.int32).numpy().tobytes(), 1)),
         ""),
    ]
    for name, nbytes, note in rows:
        print(f"| {name} | {int(nbytes)} | {note} |")

    print()
    print("## Leader per flush interval: per-worker COUNTS vs per-node NODE_COUNTS (same run)")
    print("| nodes x ranks | frames/interval (worker / node) | MB/interval (worker / node) | "
          "leader CPU ms/interval (worker / node) | share of a core (worker / node) | ratio |")
    print("|---|---|---|---|---|---:|")
    for nodes in args.nodes:
        cpu = measure(nodes, per_node, args.intervals, args.flush_steps, worker_frames, node_frames)
        workers = nodes * per_node
        print(f"| {nodes} x {per_node} | {workers} / {nodes} | "
              f"{workers * worker_bytes / 1e6:.1f} / {nodes * node_bytes / 1e6:.1f} | "
              f"{cpu['worker'] * 1e3:.1f} / {cpu['node'] * 1e3:.1f} | "
              f"{100 * cpu['worker'] / interval_s:.1f} % / {100 * cpu['node'] / interval_s:.2f} % | "
              f"{cpu['worker'] / max(cpu['node'], 1e-9):.1f}x |", flush=True)

    print()
    agg = NodeAggregator(0)
    agg.set_joined(range(per_node), 0.0)
    decoded = [[decode(f) for f in frames[:per_node]] for frames in worker_frames]
    times = []
    for k, msgs in enumerate(decoded):
        started = time.process_time()
        out = [o for m in msgs for o in agg.on_worker(m, float(k))]
        times.append(time.process_time() - started)
        assert len(out) == 1 and isinstance(out[0], SendUp)
        started = time.process_time()
        encode(out[0].msg)
        times[-1] += time.process_time() - started
    print(f"Follower: summing {per_node} decoded COUNTS and encoding the NODE_COUNTS takes "
          f"{statistics.median(times[1:]) * 1e3:.2f} ms per interval (median).")


if __name__ == "__main__":
    main()
