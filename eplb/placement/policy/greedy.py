"""The ``greedy`` policy: replica counts by
:func:`~eplb.placement.policy.replicate.replicate_heaviest`, then replicas onto GPUs heaviest first, each to the least-loaded GPU that still has a free slot.
One global pass per layer, from scratch (the current placement is not looked at).
"""

from __future__ import annotations

import heapq

import torch

from eplb.placement.policy.replicate import replicate_heaviest


def pack_replicas(load: torch.Tensor, replicas: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Place replicas on GPUs: heaviest replica first, to the least-loaded GPU with a free slot.

    Args:
        load: ``[L, E]``; replicas: ``[L, E]`` replica counts, rows summing to ``P``.
        num_gpus: ``G``, with ``P % G == 0``.
    Returns:
        phys2log ``[L, P]`` int64; GPU ``g`` holds slots ``[g * P/G, (g+1) * P/G)``.
    """
    layers, experts = load.shape
    num_physical = int(replicas[0].sum())
    per_gpu = num_physical // num_gpus
    phys2log = torch.empty(layers, num_physical, dtype=torch.int64)
    for layer in range(layers):
        per_replica = (load[layer].to(torch.float64) / replicas[layer]).tolist()
        items = [(-per_replica[e], e) for e in range(experts) for _ in range(int(replicas[layer, e]))]
        items.sort()
        heap = [(0.0, g) for g in range(num_gpus)]  # (gpu load, gpu)
        filled = [0] * num_gpus
        for neg_load, expert in items:
            gpu_load, gpu = heapq.heappop(heap)
            phys2log[layer, gpu * per_gpu + filled[gpu]] = expert
            filled[gpu] += 1
            if filled[gpu] < per_gpu:
                heapq.heappush(heap, (gpu_load - neg_load, gpu))
    return phys2log


def rebalance_greedy(load: torch.Tensor, num_physical: int, num_gpus: int) -> torch.Tensor:
    """The greedy policy.

    Args:
        load: ``[L, E]`` expert loads; num_physical: ``P``; num_gpus: ``G``, dividing ``P``.
    Returns:
        phys2log ``[L, P]`` int64.
    """
    counts = replicate_heaviest(load.to(torch.float64), num_physical).counts
    return pack_replicas(load, counts, num_gpus)
