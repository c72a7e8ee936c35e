"""Placement planning: pick a policy, plan, and decide whether the plan is worth moving experts.

Pure functions over tensors (no I/O, no state); the sidecar runs :func:`plan_rebalance` in a
process pool, by this module path. Three policies (:mod:`eplb.placement.policy`). ``stable`` (the
default) starts from the placement served now and changes as few slots as it can while reaching
the balancedness of a from-scratch plan (within a small tolerance), optionally under a cap on
slots changed. ``greedy`` gives each redundant slot to the expert with the highest load per
replica, then packs replicas onto GPUs heaviest first, each to the least-loaded GPU that still has
a free slot. ``deepseek`` is DeepSeek's EPLB algorithm. ``greedy`` and ``deepseek`` plan from
scratch and ignore the current placement. Unlike vLLM's one ``rebalance_experts``, the planner
also predicts the gain (balancedness before and after, on the same window) and skips a rebalance
not worth its copies: moving experts costs decode steps, so the decision belongs with the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from eplb.placement.load import overall_balancedness
from eplb.placement.policy.deepseek import rebalance_deepseek
from eplb.placement.policy.greedy import rebalance_greedy
from eplb.placement.policy.stable.plan import rebalance_stable
from eplb.placement.rules import validate_placement

POLICIES = ("stable", "greedy", "deepseek")


@dataclass(frozen=True)
class PlannerSpec:
    """Which policy plans, and the cluster shape it needs.

    ``stable``: keep the current placement where it can, change the fewest slots that reach the
    from-scratch plan's balancedness (:func:`eplb.placement.policy.stable.plan.rebalance_stable`);
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
        phys2log = rebalance_greedy(load, num_physical, num_gpus)
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
