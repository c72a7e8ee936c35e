"""The `stable` placement policy: balance as well as a from-scratch plan, moving few experts.

Pure, layer-vectorized tensor functions. With loads ``w: [L, E]``, the current placement
``current: [L, P]`` and ``G`` GPUs of ``S = P / G`` slots:

1. **Reference.** Plan from scratch (:func:`plan_from_scratch`: replica counts by highest load
   per replica, then replicas heaviest first, each to the lightest GPU with room; the global form
   of the ``deepseek`` policy) and note its balancedness per layer, ``b_ref: [L]``, and its max GPU
   load per layer. The target is ``mean(b_ref) - tolerance`` (balancedness as
   :func:`eplb.placement.overall_balancedness`: mean GPU load / max, averaged over layers).
2. **Keep.** If the current placement already reaches the target, it is the plan (no move).
3. **Repair chain.** A local search from the current placement, one change per layer and step,
   in every layer whose max GPU load is above the reference's (times ``1 + SLACK``): first give
   a replica to an expert of the hottest GPU that is heavier per replica than any replica of the
   reference, taking the slot of an expert that has more replicas than the reference gives it
   (1 slot); otherwise swap a slot of the hottest GPU with a slot of a light GPU (2 slots), or
   turn a spare replica elsewhere into one more replica of an expert of the hottest GPU (1 slot),
   preferring changes that bring every GPU they touch under the ceiling. A change costs the slots
   it changes net of the chain's earlier changes (a swap with a slot the chain already changed
   costs 1, so two steps can close a 3-cycle that fixes two hot GPUs with 3 slots). With at most
   ``ALL_TARGETS_UP_TO`` slots per GPU a swap may land on any GPU. Each change is checked
   exactly; every state keeps every expert present. Each layer gets a chain of valid states.
4. **Fallback.** Where a chain stops short, the reference plan itself is an option for that
   layer, aligned to the current placement (its GPUs matched to the current GPUs by shared
   experts, experts kept in their old slots within a GPU).
5. **Choice.** Per layer, pick one state (current, a point of the chain, or the aligned
   reference) so that the mean balancedness reaches the target with the fewest slots changed:
   increments taken in order of balancedness gained per slot moved, never more than
   ``max_moves`` slots changed in total when a cap is given (then the target may be missed).

"Moved" means a slot whose logical expert changes (``phys2log != current``).
"""

from __future__ import annotations

import functools
import heapq
import math
from typing import NamedTuple

import torch

from eplb.coordinator.policy_deepseek import balanced_packing

#: How far below the from-scratch plan's balancedness the stable plan may stay (absolute).
DEFAULT_TOLERANCE = 0.003
#: A layer's repair stops once its max GPU load is within this fraction of the reference's.
SLACK = 0.002
#: Local-search steps per layer before the reference plan is used as the fallback.
DEFAULT_STEPS = 24
#: A local-search swap lands on one of this many least-loaded GPUs...
LIGHT_GPUS = 16
#: ...or on any GPU when a GPU has at most this many slots (with few slots per GPU the best
#: target is a light slot, often on a GPU that is not among the lightest).
ALL_TARGETS_UP_TO = 4
#: A replica-splitting move takes its slot from one of this many cheapest donors.
DONORS = 32
#: Rank candidate changes by the slots they change net of earlier chain steps.
NET_COST = True


def replicate_greedy(load: torch.Tensor, num_physical: int) -> torch.Tensor:
    """Replica counts: one each, then one more at a time to the highest load per replica.

    The ``m``-th extra replica of expert ``e`` is given when ``load[e] / m`` is the highest load
    per replica left, so the extras are the ``P - E`` largest of ``load[e] / m`` (``m >= 1``):
    one top-k instead of ``P - E`` sequential steps. Only the ``P - E`` heaviest experts can get
    one (each of them offers a key at least as large as any other expert's load), so the keys
    come from those alone.

    Args:
        load: ``[L, E]`` float64 loads.
        num_physical: ``P >= E``.
    Returns:
        ``[L, E]`` int64 counts, each row summing to ``P``.
    """
    layers, experts = load.shape
    extra = num_physical - experts
    counts = torch.ones(layers, experts, dtype=torch.int64)
    if extra == 0:
        return counts
    if extra > experts:  # every expert is a candidate, and one may take all the extras
        heavy, depth = load, extra
        candidates = torch.arange(experts).expand(layers, -1)
    else:
        heavy, candidates = load.topk(extra, dim=1)  # [L, extra], heaviest first
        # no expert gets more extras than the heaviest load over the extra-th largest allows
        depth, kth = extra, heavy[:, -1]
        if bool((kth > 0).all()):
            depth = min(extra, int(float((heavy[:, 0] / kth).max())) + 1)
    keys = (heavy[:, :, None] / torch.arange(1, depth + 1, dtype=load.dtype)).reshape(layers, -1)
    chosen = candidates.gather(1, keys.topk(extra, dim=1).indices // depth)  # [L, extra] experts
    return counts.scatter_add_(1, chosen, torch.ones_like(chosen))


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
    """The reference plan: :func:`replicate_greedy`, then replicas to GPUs heaviest first, each to
    the lightest GPU with room. With two slots per GPU that is :func:`pack_in_rounds` (the same
    assignment, cheaper); with more it is DeepSeek's :func:`balanced_packing` (as the global
    form of the ``deepseek`` policy).

    Args:
        load: ``[L, E]``; num_physical: ``P``; num_gpus: ``G``.
    Returns:
        phys2log ``[L, P]`` int64.
    """
    load = load.to(torch.float64)
    counts = replicate_greedy(load, num_physical)
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


def counts_of(phys2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Replicas per expert. ``phys2log: [L, P]`` -> ``[L, E]`` int64."""
    counts = torch.zeros(phys2log.shape[0], num_experts, dtype=torch.int64)
    return counts.scatter_add_(1, phys2log, torch.ones_like(phys2log))


def gpu_load_of(load: torch.Tensor, phys2log: torch.Tensor, counts: torch.Tensor,
                num_gpus: int) -> torch.Tensor:
    """Load per GPU, each expert's load split evenly over its replicas.

    Args:
        load: ``[L, E]`` float64; phys2log: ``[L, P]``; counts: ``[L, E]`` its replica counts.
    Returns:
        ``[L, G]`` float64.
    """
    return gpu_load_from((load / counts.clamp(min=1)).gather(1, phys2log), num_gpus)


def gpu_load_from(slot_load: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load per GPU from each slot's load. ``slot_load: [L, P]`` float64 -> ``[L, G]``."""
    if slot_load.shape[1] == 2 * num_gpus:  # the same sum (of two), without a slow short reduction
        return slot_load[:, 0::2] + slot_load[:, 1::2]
    return slot_load.view(slot_load.shape[0], num_gpus, -1).sum(dim=2)


def layer_balancedness(load: torch.Tensor, gpu_load: torch.Tensor) -> torch.Tensor:
    """Mean over max GPU load per layer (1.0 for an idle layer), as
    :func:`eplb.placement.balancedness`. ``load: [L, E]``, ``gpu_load: [L, G]`` -> ``[L]``."""
    return balancedness(load.sum(dim=1) / gpu_load.shape[1], gpu_load.max(dim=1).values)


def balancedness(mean: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """``mean / peak`` GPU load per layer, 1.0 where ``peak`` is 0. ``[L]``, ``[L]`` -> ``[L]``."""
    return torch.where(peak > 0, mean / peak.clamp(min=1e-300), torch.ones_like(peak))


class Change(NamedTuple):
    """One change per layer (see :func:`best_changes`); all ``[L]``.

    act: bool, a change helps or is forced; forced: bool, it must be made; swap: bool, two slots
    change; src: a slot on the most loaded GPU; dst: the slot that takes ``expert`` (a swap also
    gives ``src`` the old expert of ``dst``); peak: the max GPU load before the change.
    """

    act: torch.Tensor
    forced: torch.Tensor
    swap: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    expert: torch.Tensor
    peak: torch.Tensor


@functools.lru_cache(maxsize=32)
def lanes(n: int) -> torch.Tensor:
    """``arange(n)``, made once (read-only)."""
    return torch.arange(n)


@functools.lru_cache(maxsize=32)
def slot_costs(swaps: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots changed by each candidate (``swaps`` 2-slot ones, then ``splits`` 1-slot ones) and the
    rank offset of a candidate under the ceiling (``4 - cost``); both ``[swaps + splits]``
    float64, made once (read-only)."""
    cost = torch.ones(swaps + splits, dtype=torch.float64)
    cost[:swaps] = 2.0
    return cost, 4.0 - cost


def best_changes(load: torch.Tensor, phys2log: torch.Tensor, counts: torch.Tensor,
                 per_replica: torch.Tensor, gpu_load: torch.Tensor, peak: torch.Tensor,
                 hot: torch.Tensor, ceiling: torch.Tensor, limit: torch.Tensor,
                 ref_counts: torch.Tensor, current: torch.Tensor | None = None) -> Change:
    """For each layer, one change for its most loaded GPU ``g``: the new expert of slot ``dst``,
    and for a swap the new expert of slot ``src`` on ``g``.

    First, a replica that must move: an expert on ``g`` whose load per replica exceeds
    ``limit`` (the reference's heaviest replica) cannot fit the reference way, so it takes a slot
    of the expert with a spare replica (more than ``ref_counts``) that is cheapest to give up, on
    the most loaded GPU holding that expert (forced: 1 slot).

    Otherwise the best of these candidates: swap a slot of ``g`` with a lighter slot on one of the
    ``LIGHT_GPUS`` least loaded GPUs (2 slots change, counts unchanged), or turn a slot of one of
    the ``DONORS`` cheapest spare replicas elsewhere into one more replica of an expert on ``g``
    (1 slot). A candidate is scored by the highest load among the GPUs it touches (for a split,
    the other GPUs holding the expert that gives up a replica are charged with its heavier share:
    an upper bound). Those that bring all of them under ``ceiling`` rank first, 1-slot ones
    before 2-slot ones, then by load shed; the rest by load shed per slot changed. With
    ``current`` given, a candidate's slots are counted net of the chain so far
    (:func:`net_costs`: a slot changed before costs nothing more, one given back its current
    expert saves one). The caller checks the chosen change exactly.

    Args:
        load: ``[L, E]`` float64; phys2log: ``[L, P]``; counts: ``[L, E]`` its replica counts
        as float64 (whole numbers); per_replica: ``[L, E]`` ``load / counts.clamp(min=1)``;
        gpu_load: ``[L, G]`` its GPU loads; peak, hot: ``[L]`` float64 and int64, the max of
        ``gpu_load`` per layer and its (first) GPU; ceiling: ``[L]``; limit: ``[L]``;
        ref_counts: ``[L, E]`` the reference's replica counts (float64); current: ``[L, P]``
        the served placement, or None to count 2 slots per swap and 1 per split.
    Returns:
        the :class:`Change` of each layer.
    """
    layers, slots = phys2log.shape
    num_gpus = gpu_load.shape[1]
    per_gpu = slots // num_gpus
    inf = float("inf")
    peak, hot = peak[:, None], hot[:, None]  # [L, 1]
    peak3 = peak.unsqueeze(2)
    one_less = load / (counts - 1).clamp_(min=1)  # [L, E] the share with one replica fewer
    source = hot * per_gpu + lanes(per_gpu)  # [L, S] the slots of g
    es = phys2log.gather(1, source)
    xs = per_replica.gather(1, es)

    # Swaps: d moves from g to the target slot's GPU. Targets are the slots of the lightest GPUs
    # (a move must land below the peak; the lightest leave the most room). A target on g itself
    # gets d = -inf, one of the same expert d = 0: neither is taken.
    if per_gpu <= ALL_TARGETS_UP_TO or LIGHT_GPUS >= num_gpus:  # every GPU, in order (no sort)
        light_load, light = gpu_load, lanes(num_gpus).expand(layers, -1)
    else:
        light_load, light = gpu_load.topk(LIGHT_GPUS, dim=1, largest=False)  # [L, K]
    target = (light.unsqueeze(2) * per_gpu + lanes(per_gpu)).view(layers, -1)  # [L, C]
    x = per_replica.gather(1, phys2log.gather(1, target))
    x.view(layers, -1, per_gpu).masked_fill_((light == hot).unsqueeze(2), inf)
    d = xs.unsqueeze(2) - x.unsqueeze(1)  # [L, S, C]
    room = (light_load[:, None, :, None] + d.view(layers, per_gpu, -1, per_gpu)).view(d.shape)
    swapped = torch.maximum(peak3 - d, room)

    # Splits: a slot off g whose expert a has a spare replica becomes one more replica of b = es;
    # a's other holders take its heavier share. Donors: those cheapest to give up, from the slots
    # of experts with more than one replica (at most 2 (P - E), listed in slot order, then
    # padded with a slot of g, which never gives up its replica: inf).
    multi = counts.gather(1, phys2log) > 1  # [L, P]
    width = max(1, min(slots, 2 * (slots - load.shape[1])))
    at = multi.cumsum(dim=1).sub_(1).masked_fill_(~multi, width)
    spare = source[:, :1].expand(-1, width + 1).clone().scatter_(
        1, at, lanes(slots).expand(layers, -1))[:, :width]  # [L, W] slots
    spare_expert = phys2log.gather(1, spare)
    spare_gpu = spare // per_gpu
    spare_load = gpu_load.gather(1, spare_gpu)
    holders = other_holder(spare, spare_expert, spare_load, per_replica) \
        + (one_less - per_replica).gather(1, spare_expert)
    holders.masked_fill_(spare_gpu == hot, inf)
    left = spare_load - per_replica.gather(1, spare_expert)
    pick = torch.maximum(holders, left).topk(min(width, DONORS), dim=1, largest=False).indices
    new_share = (load / (counts + 1)).gather(1, es)  # [L, S]
    split = torch.maximum(torch.maximum((peak - (xs - new_share)).unsqueeze(2),
                                        left.gather(1, pick).unsqueeze(1) + new_share.unsqueeze(2)),
                          holders.gather(1, pick).unsqueeze(1))  # [L, S, M]
    split_ok = es.unsqueeze(2) != spare_expert.gather(1, pick).unsqueeze(1)

    # Rank: a change that brings every GPU it touches under the ceiling first, fewer slots first,
    # then lower touched load; otherwise the load shed per slot changed. Candidates [L, S, C + M].
    width = target.shape[1]
    touched = torch.cat([swapped, split], dim=2)
    if current is None:
        cost, first = slot_costs(width, touched.shape[2] - width)
        shed = (peak3 - touched) / peak3.clamp(min=1e-300)  # <= 1
        rank = torch.where(touched <= ceiling[:, None, None], first + shed, shed / cost)
    else:
        cost = net_costs(phys2log, current, source, target, spare.gather(1, pick), es)
        shed = (peak3 - touched) / peak3.clamp(min=1e-300)  # <= 1
        rank = torch.where(touched <= ceiling[:, None, None], 10.0 - cost + shed,
                           shed / cost.clamp(min=0.25))
    rank = torch.where(torch.cat([d > 0, split_ok], dim=2) & (shed > 1e-9), rank, -inf)
    best, index = rank.view(layers, -1).max(dim=1, keepdim=True)  # [L, 1]
    row, column = index // touched.shape[2], index % touched.shape[2]
    peak = peak.squeeze(1)
    if current is None:
        gain = shed.view(layers, -1).gather(1, index).squeeze(1) * peak / cost[column.squeeze(1)]
    else:
        gain = shed.view(layers, -1).gather(1, index).squeeze(1) * peak
    act = (best.squeeze(1) > -inf) & (gain > peak * 1e-9)
    swap = (column < width).squeeze(1)
    src = source.gather(1, row).squeeze(1)
    dst = torch.cat([target, spare.gather(1, pick)], dim=1).gather(1, column).squeeze(1)
    new_expert = es.gather(1, row).squeeze(1)

    # The forced replica overrides.
    excess, at = (xs - limit[:, None]).max(dim=1)
    forced = excess > limit * 1e-9
    if not bool(forced.any()):
        return Change(act, forced, swap, src, dst, new_expert, peak)
    grow = es.gather(1, at[:, None]).squeeze(1)
    donor_load, donor_expert = torch.where(counts > ref_counts, one_less, inf).min(dim=1)
    forced &= (donor_load < inf) & (donor_expert != grow)
    # (a donor has a spare replica, so all of its slots are listed)
    forced_slot = spare.gather(1, torch.where(spare_expert == donor_expert[:, None], spare_load, -1.0)
                               .argmax(dim=1, keepdim=True)).squeeze(1)
    return Change(act | forced, forced, swap & ~forced, src, torch.where(forced, forced_slot, dst),
                  torch.where(forced, grow, new_expert), peak)


def net_costs(phys2log: torch.Tensor, current: torch.Tensor, source: torch.Tensor,
              target: torch.Tensor, donor: torch.Tensor, es: torch.Tensor) -> torch.Tensor:
    """Slots changed against ``current`` after each candidate of :func:`best_changes`, minus before.

    A swap of source slot ``s`` (expert ``es``) with target slot ``t`` (expert ``et``) sets
    ``s`` to ``et`` and ``t`` to ``es``; a split sets donor slot ``t`` to ``es``. A slot that the
    chain changed before costs nothing more when it changes again, and one given back its current
    expert saves one: so a swap with a slot changed earlier (a cycle) costs 1, not 2.

    Args:
        phys2log: ``[L, P]`` the chain's state; current: ``[L, P]`` the served placement;
        source: ``[L, S]`` slots of the hot GPU; target: ``[L, C]`` swap targets; donor:
        ``[L, M]`` split slots; es: ``[L, S]`` the experts of ``source``.
    Returns:
        ``[L, S, C + M]`` float64 (whole numbers from -2 to 2).
    """
    cur_s, cur_t, cur_d = current.gather(1, source), current.gather(1, target), current.gather(1, donor)
    et, ed = phys2log.gather(1, target), phys2log.gather(1, donor)
    # 2 slots, less those already changed, less those given back their current expert
    before = (es != cur_s).to(torch.float64).unsqueeze(2) + (et != cur_t).to(torch.float64).unsqueeze(1)
    back = (et.unsqueeze(1) == cur_s.unsqueeze(2)).to(torch.float64)
    back += es.unsqueeze(2) == cur_t.unsqueeze(1)
    swap = (2.0 - before).sub_(back)
    split = (ed != cur_d).to(torch.float64).unsqueeze(1).sub(1.0).neg_() \
        - (es.unsqueeze(2) == cur_d.unsqueeze(1)).to(torch.float64)
    return torch.cat([swap, split], dim=2)


def other_holder(slot: torch.Tensor, expert: torch.Tensor, gpu: torch.Tensor,
                 like: torch.Tensor) -> torch.Tensor:
    """For each listed slot, the highest GPU load among the other listed slots of its expert (0 if
    none). A slot may be listed more than once; its copies do not count as other slots.

    Args:
        slot: ``[L, W]`` slot ids; expert: ``[L, W]`` their experts; gpu: ``[L, W]`` their GPU
        loads (>= 0); like: any ``[L, E]`` float64 tensor (the scatter base).
    Returns:
        ``[L, W]`` float64.
    """
    # (a base of zeros changes no max, the loads being >= 0, and is faster than include_self=False)
    top = torch.zeros_like(like).scatter_reduce_(1, expert, gpu, "amax").gather(1, expert)
    # one slot per expert at its top load ("the" top slot): the others see the top load
    first = torch.where(gpu >= top, slot, -1)
    first = first.new_full(like.shape, -1).scatter_reduce_(1, expert, first, "amax").gather(1, expert)
    is_first = first == slot
    second = torch.zeros_like(like).scatter_reduce_(1, expert, gpu.masked_fill(is_first, 0.0),
                                                    "amax").gather(1, expert)
    return torch.where(is_first, second, top)


def score_of(mean: list[float], peak: list[float]) -> list[float]:
    """:func:`balancedness` on Python floats (the same arithmetic), for a few layers."""
    return [m / max(p, 1e-300) if p > 0 else 1.0 for m, p in zip(mean, peak)]


class Chain(NamedTuple):
    """A repair chain as options per layer (option 0 is the current placement).

    states: ``[N, P]`` placements, rows ``0 .. L - 1`` the current one; rows: per layer, the row of
    ``states`` for each option; scores: per layer, each option's balancedness; moves: per layer,
    each option's slots changed against the current placement.
    """

    states: torch.Tensor
    rows: list[list[int]]
    scores: list[list[float]]
    moves: list[list[int]]


def repair_chain(load: torch.Tensor, current: torch.Tensor, counts: torch.Tensor,
                 gpu_load: torch.Tensor, steps: int, goal: float, ceiling: torch.Tensor,
                 ref_counts: torch.Tensor) -> Chain:
    """Local search from ``current``. At each step, every layer whose max GPU load is above its
    ``ceiling`` makes the change :func:`best_changes` names if it is forced, or truly lowers the
    layer's max GPU load (or leaves fewer GPUs at that max); a layer with no such change stops,
    and so does one that reaches its ceiling. Stops after ``steps`` steps, when no layer is left,
    or once the mean balancedness of the layers' last states reaches ``goal``. Each step works on
    the layers still going only.

    Args:
        load: ``[L, E]`` float64; current: ``[L, P]`` int64; counts: ``[L, E]`` its replica counts;
        gpu_load: ``[L, G]`` its GPU loads; ceiling: ``[L]`` max GPU load at which a layer is done;
        ref_counts: ``[L, E]`` the reference's replica counts.
    Returns:
        the :class:`Chain`: each layer's states in order, one per step it made a change.
    """
    layers, num_gpus = gpu_load.shape
    mean = (load.sum(dim=1) / num_gpus).tolist()
    limit = (load / ref_counts).max(dim=1).values  # the reference's heaviest replica
    peak = gpu_load.max(dim=1).values
    first = score_of(mean, peak.tolist())
    chain = Chain(current, [[layer] for layer in range(layers)], [[s] for s in first],
                  [[0] for _ in range(layers)])
    last = first[:]
    ceilings = ceiling.tolist()
    going = (peak > ceiling).nonzero().squeeze(1)
    ids = going.tolist()  # the layers still going
    # per layer going: load, placement, counts, GPU loads, (ceiling, limit), reference counts and
    # the current placement (to count slots moved)
    # (counts as float64 from here: whole numbers, so every share is the same, without the
    # int-to-float promotion in each division)
    t_load, t_counts = load[going], counts[going].to(torch.float64)
    t_max = gpu_load[going].max(dim=1)
    state = [t_load, current[going], t_counts, t_load / t_counts.clamp(min=1), gpu_load[going],
             t_max.values, t_max.indices, torch.stack([ceiling, limit], dim=1)[going],
             ref_counts[going].to(torch.float64), current[going]]
    found, offset = [current], layers
    for _ in range(steps):
        if not ids or math.fsum(last) / layers >= goal:
            break
        t_load, t_p2l, t_counts, t_share, t_gpu, t_peak, t_hot, t_bounds, t_ref, t_current = state
        t_ceiling, t_limit = t_bounds.unbind(dim=1)
        change = best_changes(t_load, t_p2l, t_counts, t_share, t_gpu, t_peak, t_hot, t_ceiling,
                              t_limit, t_ref, t_current if NET_COST else None)
        swap, src, dst, expert, t_peak = change.swap, change.src, change.dst, change.expert, change.peak
        gone = t_p2l.gather(1, dst[:, None])  # [T, 1] the expert dst gives up
        new_p2l = t_p2l.scatter(1, torch.where(swap, src, dst)[:, None], gone)
        new_p2l.scatter_(1, dst[:, None], expert[:, None])
        split = (~swap).to(torch.float64)[:, None]
        new_counts = t_counts.scatter_add(1, gone, -split).scatter_add_(1, expert[:, None], split)
        new_share = t_load / new_counts.clamp(min=1)
        new_gpu = gpu_load_from(new_share.gather(1, new_p2l), num_gpus)
        new_max = new_gpu.max(dim=1)
        new_peak = new_max.values.tolist()
        # progress: a lower max, or as high a max on fewer GPUs (a twin of the hot GPU remains);
        # a forced replica may raise the max for a step
        old_peak, acts = t_peak.tolist(), change.act.tolist()
        keep = [act and (forced or new < old)
                for act, forced, new, old in zip(acts, change.forced.tolist(), new_peak, old_peak)]
        level = [act and new == old for act, new, old in zip(acts, new_peak, old_peak)]
        if any(level):
            fewer = (new_gpu >= t_peak[:, None]).sum(dim=1) < (t_gpu >= t_peak[:, None]).sum(dim=1)
            keep = [k or (lv and f) for k, lv, f in zip(keep, level, fewer.tolist())]
        scores = score_of([mean[layer] for layer in ids], new_peak)
        moved = (new_p2l != t_current).sum(dim=1).tolist()
        stay = []
        for i, (layer, kept) in enumerate(zip(ids, keep)):
            if kept:
                chain.rows[layer].append(offset + i)
                chain.scores[layer].append(scores[i])
                chain.moves[layer].append(moved[i])
                last[layer] = scores[i]
                if new_peak[i] > ceilings[layer]:
                    stay.append(i)
        found.append(new_p2l)
        offset += len(ids)
        state = [t_load, new_p2l, new_counts, new_share, new_gpu, new_max.values, new_max.indices,
                 t_bounds, t_ref, t_current]
        if len(stay) < len(ids):
            ids = [ids[i] for i in stay]
            at = torch.tensor(stay, dtype=torch.int64)
            state = [t.index_select(0, at) for t in state]
    return chain._replace(states=torch.cat(found))


def align_to_current(plan: torch.Tensor, current: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """:func:`match_gpus`, then :func:`keep_slots`: the aligned plan ``[L, P]``."""
    contents, _ = match_gpus(plan, current, num_gpus)
    layers, slots = plan.shape
    return keep_slots(contents, current.view(layers, num_gpus, -1)).view(layers, slots)


def match_gpus(plan: torch.Tensor, current: torch.Tensor,
               num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber ``plan``'s GPUs and order each GPU's slots so that as many slots as possible keep
    their current expert. GPUs are matched greedily by shared experts (each plan GPU proposes to
    the current GPU it shares most with; a contested GPU takes the proposer sharing most; three
    rounds; the rest paired in order); within a GPU, experts that stay keep their slot. Shared
    experts are counted over (plan slot, current slot) pairs of the same expert, so the work
    grows with the slots, not with GPUs squared.

    Args:
        plan: ``[L, P]``; current: ``[L, P]``; num_gpus: ``G``.
    Returns:
        ``[L, G, S]``: the contents of each current GPU's match (``plan``'s GPUs permuted; order
        the slots with :func:`keep_slots`), and ``[L]`` the slots that :func:`keep_slots` will
        change (``P`` minus the experts each matched pair of GPUs shares).
    """
    layers, slots = plan.shape
    per_gpu = slots // num_gpus
    plan_copy, cur_copy = copy_index(plan, num_gpus), copy_index(current, num_gpus)
    order = current.sort(dim=1, stable=True).indices  # current slots by expert
    # the current slots of each plan slot's expert: order[left : left + count] (expert ids < P)
    held_by = counts_of(current, slots)
    left = (held_by.cumsum(dim=1) - held_by).gather(1, plan)  # [L, P]
    many = held_by.gather(1, plan).flatten()  # [L * P]
    # one entry per (plan slot, current slot of its expert): plan slot ``one`` (flat), its
    # ``within``-th current slot ``at_slot`` (flat)
    one = torch.repeat_interleave(many)
    within = torch.arange(one.shape[0]) - (many.cumsum(dim=0) - many).index_select(0, one)
    row = torch.div(one, slots, rounding_mode="floor")
    at_slot = order.flatten().index_select(0, left.flatten().index_select(0, one) + within
                                           + row * slots) + row * slots
    # the k-th copy of an expert on a plan GPU pairs with the k-th copy on a current GPU, so
    # a pair of GPUs shares the size of their multisets' intersection
    held = cur_copy.flatten().index_select(0, at_slot) == plan_copy.flatten().index_select(0, one)
    # (layer, plan GPU, current GPU) = (one // P, one % P // S, at_slot % P // S)
    key = ((one // per_gpu) * num_gpus + (at_slot % slots) // per_gpu)[held]
    pair, shared = torch.unique(key, return_counts=True)  # (layer, plan GPU, current GPU), count
    plan_id, cur_id = pair // num_gpus, (pair // (num_gpus * num_gpus)) * num_gpus + pair % num_gpus
    # bids: more shared first, then the same GPU number, then the lower plan GPU, then the lower
    # current GPU; unique per plan GPU and per current GPU
    plan_gpu_id, cur_gpu_id = plan_id % num_gpus, pair % num_gpus
    bid = ((shared * 2 + (plan_gpu_id == cur_gpu_id).long()) * num_gpus
           + (num_gpus - 1 - plan_gpu_id)) * num_gpus + (num_gpus - 1 - cur_gpu_id)
    none = torch.full((layers * num_gpus,), -1, dtype=torch.int64)
    match = none.clone()  # plan GPU -> current GPU, -1 while unmatched
    taken = none.clone()  # current GPU -> plan GPU, -1 while free
    for _ in range(3):
        free = (match.gather(0, plan_id) < 0) & (taken.gather(0, cur_id) < 0)
        if not bool(free.any()):
            break
        offer = torch.where(free, bid, -1)
        propose = free & (offer == none.scatter_reduce(0, plan_id, offer, "amax").gather(0, plan_id))
        offer = torch.where(propose, bid, -1)
        won = propose & (offer == none.scatter_reduce(0, cur_id, offer, "amax").gather(0, cur_id))
        # at most one win per plan GPU and per current GPU; the others offer -1
        match.scatter_reduce_(0, plan_id, torch.where(won, cur_gpu_id, -1), "amax")
        taken.scatter_reduce_(0, cur_id, torch.where(won, plan_gpu_id, -1), "amax")
    match, taken = match.view(layers, num_gpus), taken.view(layers, num_gpus)
    # pair the rest in order
    left_plan = (match < 0).to(torch.int8).argsort(dim=1, descending=True, stable=True)
    left_cur = (taken < 0).to(torch.int8).argsort(dim=1, descending=True, stable=True)
    first = torch.arange(num_gpus) < (match < 0).sum(dim=1, keepdim=True)  # [L, G]
    match.scatter_(1, left_plan, torch.where(first, left_cur, match.gather(1, left_plan)))
    # contents of plan GPU i go to current GPU match[i]
    contents = torch.empty(layers, num_gpus, per_gpu, dtype=plan.dtype)
    contents.scatter_(1, match[:, :, None].expand(-1, -1, per_gpu), plan.view(layers, num_gpus, per_gpu))
    # slots that keep their expert: per matched pair of GPUs, the experts they share
    matched = match.view(-1).gather(0, plan_id) == cur_gpu_id
    kept = torch.zeros(layers, dtype=torch.int64).scatter_add_(
        0, pair // (num_gpus * num_gpus), torch.where(matched, shared, 0))
    return contents, slots - kept


def copy_index(phys2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Which copy of its expert on its GPU each slot holds (0 for the first, 1 for a second...).

    ``phys2log: [L, P]`` -> ``[L, P]`` int64.
    """
    layers, slots = phys2log.shape
    on_gpu = phys2log.view(layers, num_gpus, -1)  # [L, G, S]
    if on_gpu.shape[2] == 2:  # (the same count, without a slow short reduction)
        second = (on_gpu[:, :, 1:] == on_gpu[:, :, :1]).long()
        return torch.cat([torch.zeros_like(second), second], dim=2).view(layers, slots)
    same = on_gpu[:, :, :, None] == on_gpu[:, :, None, :]  # [L, G, S, S]
    return (same & earlier_than(same.shape[-1])).sum(dim=3).view(layers, slots)


@functools.lru_cache(maxsize=32)
def earlier_than(n: int) -> torch.Tensor:
    """``[n, n]`` bool, ``[i, j]`` true where ``j < i``; made once (read-only)."""
    return torch.ones(n, n, dtype=torch.bool).tril(-1)


def keep_slots(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Order each GPU's new experts so those it already holds stay in their slots.

    Args:
        new: ``[L, G, S]`` the experts each GPU will hold (any order); old: ``[L, G, S]`` now.
    Returns:
        ``[L, G, S]``: a permutation of each ``new[l, g]``, equal to ``old`` where possible.
    """
    per_gpu = new.shape[2]
    used = torch.zeros_like(new, dtype=torch.bool)  # new items placed in a kept slot
    kept = torch.zeros_like(old, dtype=torch.bool)
    for s in range(per_gpu):
        same = (new == old[:, :, s:s + 1]) & ~used  # [L, G, S]
        hit = same.any(dim=2)
        first = same.to(torch.int8).argmax(dim=2, keepdim=True)
        used.scatter_(2, first, hit[:, :, None] | used.gather(2, first))
        kept[:, :, s] = hit
    out = torch.where(kept, old, torch.zeros_like(old))
    # the remaining new items, in order, fill the remaining slots in order
    src = (~used).to(torch.int8).argsort(dim=2, descending=True, stable=True)
    dst = (~kept).to(torch.int8).argsort(dim=2, descending=True, stable=True)
    fill = torch.arange(per_gpu) < (~kept).sum(dim=2, keepdim=True)
    values = new.gather(2, src)
    out.scatter_(2, dst, torch.where(fill, values, out.gather(2, dst)))
    return out


def choose_states(scores: list[list[float]], moves: list[list[int]], goal_sum: float,
                  max_moves: int) -> list[int]:
    """Pick one option per layer: reach ``goal_sum`` of balancedness with the fewest moves.

    Each layer's options (option 0 moves nothing) are reduced to their upper hull; increments are
    taken by balancedness gained per slot moved, best first, until the sum reaches ``goal_sum``.
    With ``max_moves > 0`` an increment that would pass the cap is skipped (and that layer's later
    increments with it).

    Args:
        scores: per layer, the balancedness of each option; moves: per layer, its slots changed.
    Returns:
        the chosen option index per layer.
    """
    total = sum(layer[0] for layer in scores)
    heap: list[tuple[float, int, int]] = []
    hulls: list[list[int]] = []
    for layer, (score, move) in enumerate(zip(scores, moves)):
        hull = [0]
        for k in sorted(range(1, len(score)), key=lambda k: (move[k], -score[k])):
            if score[k] <= score[hull[-1]] or move[k] <= move[hull[-1]]:
                continue
            while len(hull) >= 2:  # drop a point under the segment from its neighbours
                a, b = hull[-2], hull[-1]
                if (score[b] - score[a]) * (move[k] - move[a]) <= (score[k] - score[a]) * (move[b] - move[a]):
                    hull.pop()
                else:
                    break
            hull.append(k)
        hulls.append(hull)
        if len(hull) > 1:
            heapq.heappush(heap, (-(score[hull[1]] - score[0]) / (move[hull[1]] - move[0]), layer, 1))
    chosen = [0] * len(scores)
    spent = 0
    while heap and total < goal_sum:
        _, layer, step = heapq.heappop(heap)
        hull, score, move = hulls[layer], scores[layer], moves[layer]
        a, b = hull[step - 1], hull[step]
        cost = move[b] - move[a]
        if max_moves and spent + cost > max_moves:
            continue
        spent += cost
        total += score[b] - score[a]
        chosen[layer] = b
        if step + 1 < len(hull):
            c = hull[step + 1]
            heapq.heappush(heap, (-(score[c] - score[b]) / (move[c] - move[b]), layer, step + 1))
    return chosen


def rebalance_stable(load: torch.Tensor, num_physical: int, num_gpus: int,
                     current: torch.Tensor | None = None, max_moves: int = 0,
                     tolerance: float = DEFAULT_TOLERANCE, steps: int = 0) -> torch.Tensor:
    """The stable policy (see the module docstring).

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
    ref_counts = counts_of(reference, experts)
    ref_load = gpu_load_of(load, reference, ref_counts, num_gpus)
    ref_score = layer_balancedness(load, ref_load)
    goal = float(ref_score.mean()) - tolerance
    counts = counts_of(current, experts)
    gpu_load = gpu_load_of(load, current, counts, num_gpus)
    if float(layer_balancedness(load, gpu_load).mean()) >= goal - 1e-12:  # (the slack absorbs
        return current.clone()  # summation-order rounding)
    chain = repair_chain(load, current, counts, gpu_load, steps, goal,
                         ref_load.max(dim=1).values * (1 + SLACK), ref_counts)
    states = chain.states
    # layers whose chain stays above the ceiling: offer the aligned reference there
    best = [max(scores) for scores in chain.scores]
    if math.fsum(best) / layers < goal:
        short = [layer for layer, (b, r) in enumerate(zip(best, ref_score.tolist()))
                 if b * (1 + SLACK) < r * (1 - 1e-9)]
        if short:
            rows = torch.tensor(short)
            contents, moved = match_gpus(reference[rows], current[rows], num_gpus)
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
