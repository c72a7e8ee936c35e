"""Placement planning: pure functions over tensors (no I/O, no state).

Three policies. ``stable`` (the default, :mod:`eplb.coordinator.policy_stable`) starts from the
placement served now and changes as few slots as it can while reaching the balancedness of a
from-scratch plan (within a small tolerance), optionally under a cap on slots changed. ``greedy``
gives each redundant slot to the expert with the highest load per replica, then packs replicas onto
GPUs heaviest first, each to the least-loaded GPU that still has a free slot. ``deepseek`` is
DeepSeek's EPLB algorithm (:mod:`eplb.coordinator.policy_deepseek`). ``greedy`` and ``deepseek``
plan from scratch and ignore the current placement.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import torch

from eplb.coordinator.policy_deepseek import rebalance_deepseek
from eplb.coordinator.policy_stable import rebalance_stable
from eplb.placement import overall_balancedness, validate_placement


def replicate_heaviest(load: torch.Tensor, num_physical: int) -> torch.Tensor:
    """How many replicas each expert gets: one each, then one more to the max load-per-replica.

    Args:
        load: ``[L, E]`` non-negative loads.
        num_physical: ``P >= E`` slots per layer.
    Returns:
        ``[L, E]`` int64 replica counts, each row summing to ``P``.
    """
    layers, experts = load.shape
    replicas = torch.ones(layers, experts, dtype=torch.int64)
    load = load.to(torch.float64)
    rows = torch.arange(layers)
    for _ in range(num_physical - experts):
        heaviest = (load / replicas).argmax(dim=1)  # [L]
        replicas[rows, heaviest] += 1
    return replicas


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


POLICIES = ("stable", "greedy", "deepseek")


@dataclass(frozen=True)
class PlannerSpec:
    """Which policy plans, and the cluster shape it needs.

    ``stable``: keep the current placement where it can, change the fewest slots that reach the
    from-scratch plan's balancedness (:func:`eplb.coordinator.policy_stable.rebalance_stable`);
    without a current placement it plans from scratch.
    ``greedy``: replicate the heaviest experts, pack replicas onto GPUs (one global pass).
    ``deepseek``: DeepSeek's EPLB (groups to nodes, replicas within nodes, replicas to GPUs),
    hierarchical when ``num_groups`` divides among ``num_nodes``, else global.
    ``max_moves``: ``stable`` changes at most this many slots per rebalance (0: no cap); the
    from-scratch policies ignore it.
    """

    policy: str = "stable"
    num_groups: int = 1
    num_nodes: int = 1
    max_moves: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not isinstance(self.max_moves, int) or self.max_moves < 0:
            raise ValueError(f"max_moves must be an integer >= 0 (0: no cap), got {self.max_moves!r}")


def plan_placement(load: torch.Tensor, num_physical: int, num_gpus: int,
                   spec: PlannerSpec = PlannerSpec(),
                   current: torch.Tensor | None = None) -> torch.Tensor:
    """A balanced placement for ``load``.

    Args:
        load: ``[L, E]`` expert selections over a window (summed over ranks).
        num_physical: ``P`` slots per layer; num_gpus: ``G`` with ``P % G == 0``.
        spec: the policy.
        current: ``[L, P]`` the placement served now (used by ``stable``; None: ``stable`` plans
            from scratch and ``max_moves`` does not apply).
    Returns:
        phys2log ``[L, P]`` int64, validated (invariant I5).
    """
    if num_gpus < 1 or num_physical % num_gpus or num_physical < load.shape[1]:
        raise ValueError(f"P={num_physical} slots must be at least E={load.shape[1]} and divisible "
                         f"by G={num_gpus}")
    if current is not None and tuple(current.shape) != (load.shape[0], num_physical):
        raise ValueError(f"current placement is {list(current.shape)}, expected "
                         f"[{load.shape[0]}, {num_physical}]")
    if spec.policy == "stable":
        phys2log = rebalance_stable(load, num_physical, num_gpus, current, spec.max_moves)
    elif spec.policy == "deepseek":
        phys2log = rebalance_deepseek(load, num_physical, spec.num_groups, spec.num_nodes, num_gpus)
    else:
        phys2log = pack_replicas(load, replicate_heaviest(load, num_physical), num_gpus)
    validate_placement(phys2log, load.shape[1], num_physical, num_gpus)
    return phys2log


@dataclass(frozen=True)
class PlanResult:
    """What the leader needs to decide on an epoch.

    ``phys2log`` is ``[L, P]``; balancedness values are predicted from the same window of counts.
    ``skip_reason`` is empty when the plan should be carried out.
    """

    phys2log: torch.Tensor
    balancedness_before: float
    balancedness_after: float
    experts_moved: int
    plan_seconds: float
    skip_reason: str


def plan_rebalance(load: torch.Tensor, current: torch.Tensor, num_gpus: int, min_gain: float,
                   force: bool = False, spec: PlannerSpec = PlannerSpec()) -> PlanResult:
    """Plan from ``load`` and decide whether it is worth moving experts. Runs in an executor.

    Args:
        load: ``[L, E]`` windowed global counts.
        current: ``[L, P]`` the placement served now.
        num_gpus: ``G``.
        min_gain: skip unless predicted balancedness rises by at least this much (absolute).
        force: plan and carry out even when the gain is small.
        spec: the policy.
    """
    started = time.perf_counter()
    phys2log = plan_placement(load, current.shape[1], num_gpus, spec, current)
    before = overall_balancedness(load, current, num_gpus)
    after = overall_balancedness(load, phys2log, num_gpus)
    moved = int((phys2log != current).sum())
    reason = ""
    if moved == 0:
        reason = "the plan equals the current placement"
    elif not force and after - before < min_gain:
        reason = (f"predicted gain {after - before:+.4f} (balancedness {before:.4f} -> {after:.4f}) "
                  f"is below min_gain {min_gain:g}")
    return PlanResult(phys2log=phys2log, balancedness_before=before, balancedness_after=after,
                      experts_moved=moved, plan_seconds=time.perf_counter() - started,
                      skip_reason=reason)
