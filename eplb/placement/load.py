"""What a placement does to the load: replicas per expert, load per GPU, balancedness.

One function per quantity; every policy, the planner, the metrics and the benchmarks call these.
An expert's load is split evenly over its replicas (what a router that spreads tokens over the
replicas of an expert gives on average); balancedness is mean GPU load over max GPU load, per
layer, as SGLang and vLLM report it.
"""

from __future__ import annotations

import torch


def replica_counts(phys2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Replicas of each logical expert.

    Args:
        phys2log: ``[L, P]`` integer placement.
        num_experts: ``E``.
    Returns:
        ``[L, E]`` int64.
    """
    counts = torch.zeros(phys2log.shape[0], num_experts, dtype=torch.int64)
    phys2log = phys2log.long()
    return counts.scatter_add_(1, phys2log, torch.ones_like(phys2log))


def gpu_loads(load: torch.Tensor, phys2log: torch.Tensor, num_gpus: int,
              counts: torch.Tensor | None = None) -> torch.Tensor:
    """Load each GPU would see, each expert's load split evenly over its replicas.

    Args:
        load: ``[L, E]`` expert selections (any real dtype; computed in float64).
        phys2log: ``[L, P]`` placement.
        num_gpus: ``G``, dividing ``P``.
        counts: ``[L, E]`` its replica counts (int64, or float64 holding whole numbers), when the
            caller has them; else :func:`replica_counts`.
    Returns:
        ``[L, G]`` float64.
    """
    phys2log = phys2log.long()
    if counts is None:
        counts = replica_counts(phys2log, load.shape[1])
    share = load.to(torch.float64) / counts.clamp(min=1)  # [L, E] load per replica
    return sum_per_gpu(share.gather(1, phys2log), num_gpus)


def sum_per_gpu(slot_load: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load per GPU from each slot's load.

    Args:
        slot_load: ``[L, P]`` float64; GPU ``g`` holds slots ``[g * P/G, (g + 1) * P/G)``.
        num_gpus: ``G``.
    Returns:
        ``[L, G]`` float64.
    """
    if slot_load.shape[1] == 2 * num_gpus:  # the same sum (of two), without a slow short reduction
        return slot_load[:, 0::2] + slot_load[:, 1::2]
    return slot_load.reshape(slot_load.shape[0], num_gpus, -1).sum(dim=2)


def mean_over_peak(mean: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Balancedness from a layer's mean and max GPU load: ``mean / peak``, 1.0 for an idle layer.

    Args:
        mean: ``[L]`` mean GPU load; peak: ``[L]`` max GPU load (float64).
    Returns:
        ``[L]`` float64.
    """
    return torch.where(peak > 0, mean / peak.clamp(min=1e-300), torch.ones_like(peak))


def balancedness(load: torch.Tensor, phys2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Mean GPU load over max GPU load, per layer (1.0 is perfect; an idle layer counts as 1.0).

    Args:
        load: ``[L, E]``; phys2log: ``[L, P]``; num_gpus: ``G``.
    Returns:
        ``[L]`` float64.
    """
    per_gpu = gpu_loads(load, phys2log, num_gpus)
    return mean_over_peak(per_gpu.mean(dim=1), per_gpu.max(dim=1).values)


def overall_balancedness(load: torch.Tensor, phys2log: torch.Tensor, num_gpus: int) -> float:
    """:func:`balancedness` averaged over layers, the single number SGLang and vLLM report."""
    return float(balancedness(load, phys2log, num_gpus).mean())
