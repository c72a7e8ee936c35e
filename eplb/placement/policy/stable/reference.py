"""Phase 1 of the ``stable`` policy: the reference, a plan from scratch.

Replica counts by :func:`~eplb.placement.policy.replicate.replicate_heaviest`, then replicas to
GPUs heaviest first, each to the lightest GPU with room (the global form of the ``deepseek``
policy). Its balancedness is the target the stable plan must reach, its max GPU load the ceiling
a repaired layer must get under, its replica counts and heaviest replica what the repair chain
steers toward.
"""

from __future__ import annotations

import torch

from eplb.placement.policy.deepseek import balanced_packing
from eplb.placement.policy.replicate import replicate_heaviest


def argsort_descending(values: torch.Tensor) -> torch.Tensor:
    """``values.argsort(dim=1, descending=True, stable=True)``, faster for non-negative floats.

    A non-negative float64's bits, read as an int64, order as the float does (``+ 0.0`` turns
    -0.0 into 0.0 first), so a stable ascending sort of the negated bits is the same permutation,
    and sorting int64 is cheaper. Anything else (a negative value, NaN) takes the float sort.

    Args:
        values: ``[L, N]`` float64.
    Returns:
        ``[L, N]`` int64.
    """
    if values.dtype == torch.float64 and bool((values >= 0).all()):
        return (values + 0.0).view(torch.int64).neg_().argsort(dim=1, stable=True)
    return values.argsort(dim=1, descending=True, stable=True)


def pack_in_rounds(load: torch.Tensor, counts: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Deal replicas onto GPUs in ``S`` rounds: each round gives the next ``G`` heaviest replicas,
    heaviest first, to the GPUs from the lightest up, one each.

    Args:
        load: ``[L, E]`` float64; counts: ``[L, E]`` replica counts, rows summing to ``P``.
        num_gpus: ``G``, dividing ``P``.
    Returns:
        phys2log ``[L, P]`` int64; GPU ``g`` holds slots ``[g * S, (g + 1) * S)``.
    """
    layers, _ = load.shape
    num_physical = int(counts[0].sum())
    per_gpu = num_physical // num_gpus
    per_replica = load / counts
    order = argsort_descending(per_replica)  # [L, E]
    # each expert as many times as it has replicas (each row sums to P), heaviest replica first
    replica_expert = order.flatten().repeat_interleave(counts.gather(1, order).flatten())
    replica_expert = replica_expert.view(layers, num_physical)
    replica_load = per_replica.gather(1, replica_expert)  # [L, P], descending
    # round 0: all GPUs are empty, so GPU g takes the g-th heaviest replica
    phys2log = torch.empty(layers, num_physical, dtype=torch.int64)
    phys2log[:, ::per_gpu] = replica_expert[:, :num_gpus]
    gpu_load = replica_load[:, :num_gpus].clone()
    for r in range(1, per_gpu):
        lightest = gpu_load.argsort(dim=1, stable=True)  # [L, G]
        part = slice(r * num_gpus, (r + 1) * num_gpus)
        phys2log.scatter_(1, lightest * per_gpu + r, replica_expert[:, part])
        gpu_load.scatter_add_(1, lightest, replica_load[:, part])
    return phys2log


def plan_from_scratch(load: torch.Tensor, num_physical: int, num_gpus: int) -> torch.Tensor:
    """The reference plan: replica counts by
    :func:`~eplb.placement.policy.replicate.replicate_heaviest`, then replicas to GPUs heaviest
    first, each to the lightest GPU with room. With two slots per GPU that is
    :func:`pack_in_rounds` (the same assignment, cheaper); with more it is DeepSeek's
    :func:`~eplb.placement.policy.deepseek.balanced_packing` (as the global form of the
    ``deepseek`` policy).

    Args:
        load: ``[L, E]``; num_physical: ``P``; num_gpus: ``G``.
    Returns:
        phys2log ``[L, P]`` int64.
    """
    load = load.to(torch.float64)
    counts = replicate_heaviest(load, num_physical).counts
    if num_physical // num_gpus <= 2:
        return pack_in_rounds(load, counts, num_gpus)
    layers = load.shape[0]
    order = (load / counts).argsort(dim=1, descending=True, stable=True)
    ends = counts.gather(1, order).cumsum(dim=1)
    position = torch.arange(num_physical).expand(layers, -1).contiguous()
    replica_expert = order.gather(1, torch.searchsorted(ends, position, right=True))  # [L, P]
    pack, rank = balanced_packing((load / counts).gather(1, replica_expert), num_gpus)
    phys2log = torch.empty_like(replica_expert)
    return phys2log.scatter_(1, pack * (num_physical // num_gpus) + rank, replica_expert)
