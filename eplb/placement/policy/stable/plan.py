"""Phases 2, 4 and 5 of the ``stable`` policy put together: :func:`rebalance_stable`.

Keep the current placement when it reaches the target; else run the repair chain
(:mod:`.chain`), offer a targeted repack (:mod:`.repack`) and the aligned reference (:mod:`.align`)
for the layers it leaves short, and choose per layer (:mod:`.choice`).
"""

from __future__ import annotations

import math

import torch

from eplb.placement.load import gpu_loads, mean_over_peak, replica_counts
from eplb.placement.policy.stable.align import keep_slots, match_gpus
from eplb.placement.policy.stable.chain import DEFAULT_STEPS, Chain, repair_chain
from eplb.placement.policy.stable.choice import choose_states
from eplb.placement.policy.stable.reference import plan_from_scratch
from eplb.placement.policy.stable.repack import repack_layers

#: How far below the from-scratch plan's balancedness the stable plan may stay (absolute).
DEFAULT_TOLERANCE = 0.003
#: A layer's repair stops once its max GPU load is within this fraction of the reference's.
SLACK = 0.002
#: A repacked layer is an option only where it changes at most this share of the slots that the
#: aligned reference changes there. A repack that changes nearly as much as the reference tends to
#: leave a layer that needs more moves in later windows. (Measured at 144 GPUs on the benchmark's
#: noise drift, seeds 11, 22 and 33, against no repack: with no bound the moves per drift window
#: fell 42 % for lognormal 0.5 and 4 % for lognormal 1.0; with this bound 40 % and 44 %.)
REPACK_AT_MOST = 0.5


def layer_balancedness(load: torch.Tensor, gpu_load: torch.Tensor) -> torch.Tensor:
    """Mean over max GPU load per layer (1.0 for an idle layer), from GPU loads the caller has.
    The mean is the total load over ``G``, as the chain keeps it
    (:func:`eplb.placement.load.balancedness` averages the GPU loads: the last bit may differ).

    Args:
        load: ``[L, E]`` float64; gpu_load: ``[L, G]``.
    Returns:
        ``[L]`` float64.
    """
    return mean_over_peak(load.sum(dim=1) / gpu_load.shape[1], gpu_load.max(dim=1).values)


def rebalance_stable(load: torch.Tensor, num_physical: int, num_gpus: int,
                     current: torch.Tensor | None = None, max_moves: int = 0,
                     tolerance: float = DEFAULT_TOLERANCE, steps: int = 0) -> torch.Tensor:
    """The stable policy (see :mod:`eplb.placement.policy.stable`).

    Args:
        load: ``[L, E]`` expert loads over a window.
        num_physical: ``P``; num_gpus: ``G``, dividing ``P``.
        current: ``[L, P]`` the placement served now, or None: then the plan is the from-scratch
            reference (:func:`plan_from_scratch`) and ``max_moves`` does not apply.
        max_moves: at most this many slots change (0: no cap).
        tolerance: how far below the reference's mean balancedness the plan may stay.
        steps: local-search steps per layer (0: ``DEFAULT_STEPS``).
    Returns:
        phys2log ``[L, P]`` int64 with every expert present in every layer. When the current
        placement already reaches the target it is returned unchanged (no slot moves).
    """
    # Inference mode runs the same arithmetic with less bookkeeping per tensor operation (the plan
    # is many small ones); the result is copied out as an ordinary tensor.
    with torch.inference_mode():
        plan = stable_plan(load, num_physical, num_gpus, current, max_moves, tolerance,
                           steps or DEFAULT_STEPS)
    return plan.clone()


def stable_plan(load: torch.Tensor, num_physical: int, num_gpus: int, current: torch.Tensor | None,
                max_moves: int, tolerance: float, steps: int) -> torch.Tensor:
    """:func:`rebalance_stable`'s work (same arguments and result)."""
    load = load.to(torch.float64)
    layers, experts = load.shape
    reference = plan_from_scratch(load, num_physical, num_gpus)
    if current is None:
        return reference
    current = current.to(torch.int64)
    ref_counts = replica_counts(reference, experts)
    ref_load = gpu_loads(load, reference, num_gpus, ref_counts)
    ref_score = layer_balancedness(load, ref_load)
    goal = float(ref_score.mean()) - tolerance
    counts = replica_counts(current, experts)
    gpu_load = gpu_loads(load, current, num_gpus, counts)
    if float(layer_balancedness(load, gpu_load).mean()) >= goal - 1e-12:  # (the slack absorbs
        return current.clone()  # summation-order rounding)
    ceiling = ref_load.max(dim=1).values * (1 + SLACK)
    limit = (load / ref_counts).max(dim=1).values  # the reference's heaviest replica
    chain = repair_chain(load, current, counts, gpu_load, steps, goal, ceiling, ref_counts, limit)
    states = chain.states
    # layers whose chain stays above the ceiling: offer a repack and the aligned reference there
    best = [max(scores) for scores in chain.scores]
    if math.fsum(best) / layers < goal:
        short = [layer for layer, (b, r) in enumerate(zip(best, ref_score.tolist()))
                 if b * (1 + SLACK) < r * (1 - 1e-9)]
        if short:
            rows = torch.tensor(short)
            contents, moved = match_gpus(reference[rows], current[rows], num_gpus)
            states = offer_repacks(load, current, dict(zip(short, moved.tolist())), num_gpus,
                                   ceiling, limit, chain, states)
            for i, (layer, m) in enumerate(zip(short, moved.tolist())):
                chain.rows[layer].append(states.shape[0] + i)
                chain.scores[layer].append(float(ref_score[layer]))
                chain.moves[layer].append(m)
    chosen = choose_states(chain.scores, chain.moves, goal * layers, max_moves)
    picks = [rows[k] for rows, k in zip(chain.rows, chosen)]
    found = states.shape[0]
    plan = states[[0 if pick >= found else pick for pick in picks]]
    aligned = [(layer, pick - found) for layer, pick in enumerate(picks) if pick >= found]
    if aligned:  # the slots of the aligned reference are ordered only where it is chosen
        at, of = (torch.tensor(part) for part in zip(*aligned))
        plan[at] = keep_slots(contents[of], current[at].view(len(aligned), num_gpus, -1)).flatten(1)
    return plan


def offer_repacks(load: torch.Tensor, current: torch.Tensor, aligned_moves: dict[int, int],
                  num_gpus: int, ceiling: torch.Tensor, limit: torch.Tensor, chain: Chain,
                  states: torch.Tensor) -> torch.Tensor:
    """Add a :func:`~.repack.repack_layer` plan as an option of each listed layer
    where one is found that changes at most ``REPACK_AT_MOST`` of the slots the aligned
    reference changes there.

    Args:
        load: ``[L, E]`` float64; current: ``[L, P]``; aligned_moves: ``{layer: slots the aligned
        reference changes}``; ceiling: ``[L]`` max GPU load; limit: ``[L]`` max load per replica;
        chain: its ``rows``, ``scores`` and ``moves`` get the new options; states: ``[N, P]``.
    Returns:
        ``states`` with the repacked layers' plans appended (``[N + K, P]``).
    """
    most = {layer: int(REPACK_AT_MOST * moves) for layer, moves in aligned_moves.items()}
    found = repack_layers(load, current, most, num_gpus, ceiling, limit)
    moves = {layer: int((plan != current[layer]).sum()) for layer, plan in found.items()}
    offered = [layer for layer in found if moves[layer] <= REPACK_AT_MOST * aligned_moves[layer]]
    if not offered:
        return states
    plans = torch.stack([found[layer] for layer in offered])  # [K, P]
    rows = torch.tensor(offered)
    scores = layer_balancedness(load[rows], gpu_loads(load[rows], plans, num_gpus))
    for i, (layer, score) in enumerate(zip(offered, scores.tolist())):
        chain.rows[layer].append(states.shape[0] + i)
        chain.scores[layer].append(score)
        chain.moves[layer].append(moves[layer])
    return torch.cat([states, plans])
