"""Helpers only the placement tests use (kept out of the production modules).

Imported as ``placement_helpers`` (the test files put this directory on ``sys.path``): a name no
other test directory uses, so two test directories cannot shadow each other's helpers.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from eplb.placement.policy.stable.align import keep_slots, match_gpus
from eplb.placement.policy.stable.chain import cost_bias


@st.composite
def shapes(draw) -> tuple[int, int, int, int]:
    """``(L, E, P, G)``: 1-8 GPUs, 1-24 experts, up to 3 more slots per GPU than needed, 1-4 layers."""
    gpus = draw(st.integers(1, 8))
    experts = draw(st.integers(1, 24))
    per_gpu = draw(st.integers(-(-experts // gpus), -(-experts // gpus) + 3))
    layers = draw(st.integers(1, 4))
    return layers, experts, per_gpu * gpus, gpus


def align_to_current(plan: torch.Tensor, current: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """:func:`match_gpus`, then :func:`keep_slots`: ``plan`` aligned to ``current``, ``[L, P]``."""
    contents, _ = match_gpus(plan, current, num_gpus)
    layers, slots = plan.shape
    return keep_slots(contents, current.view(layers, num_gpus, -1)).view(layers, slots)


def net_costs(phys2log: torch.Tensor, current: torch.Tensor, source: torch.Tensor,
              target: torch.Tensor, donor: torch.Tensor, source_expert: torch.Tensor) -> torch.Tensor:
    """Slots changed against ``current`` after each candidate of
    :func:`~eplb.placement.policy.stable.chain.best_changes`, minus before: ``10 -``
    :func:`~eplb.placement.policy.stable.chain.cost_bias`, from whole placements.

    Args:
        phys2log: ``[L, P]`` the chain's state; current: ``[L, P]`` the served placement;
        source: ``[L, S]`` slots of the hot GPU; target: ``[L, C]`` swap targets; donor:
        ``[L, M]`` split slots; source_expert: ``[L, S]`` the experts of ``source``.
    Returns:
        ``[L, S, C + M]`` float64 (whole numbers from -2 to 2).
    """
    changed = phys2log != current
    bias = cost_bias(source_expert, current.gather(1, source), changed.gather(1, source),
                     phys2log.gather(1, target), current.gather(1, target),
                     changed.gather(1, target), current.gather(1, donor), changed.gather(1, donor))
    return 10.0 - bias.to(torch.float64)
