"""Phase 3 of the ``stable`` policy: the repair chain, a local search from the current placement.

At each step every layer whose max GPU load is above the ceiling makes one change for its most
loaded ("hot") GPU: a forced extra replica of an expert heavier per replica than anything in the
reference, else the best of swapping a slot of the hot GPU with a lighter slot elsewhere (2 slots)
or turning a spare replica elsewhere into one more replica of an expert of the hot GPU (1 slot).
Each change is checked exactly and every state keeps every expert present; the states a layer
passes through are its options for the choice (:mod:`.choice`).

This is the planner's hot loop (a few dozen steps over all layers still going, each step one
:func:`best_changes`): it is written as few, large tensor operations, some of them in place,
because on a CPU at a few layers each operation costs about as much as its arithmetic.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from eplb.placement.load import mean_over_peak, sum_per_gpu

#: Local-search steps per layer before the reference plan is used as the fallback.
DEFAULT_STEPS = 24
#: A local-search swap lands on one of this many least-loaded GPUs...
LIGHT_GPUS = 16
#: ...or on any GPU when a GPU has at most this many slots (with few slots per GPU the best
#: target is a light slot, often on a GPU that is not among the lightest).
ALL_TARGETS_UP_TO = 4
#: A replica-splitting move takes its slot from one of this many cheapest donors.
DONORS = 32


class Change(NamedTuple):
    """One change per layer (see :func:`best_changes`); all ``[T, 1]``.

    act: bool, a change helps or is forced; forced: bool, it must be made; swap: bool, two slots
    change; hot_slot: a slot on the most loaded GPU; slot: the slot that takes ``expert`` (a swap
    also gives ``hot_slot`` the old expert of ``slot``); peak: the max GPU load before the change.
    """

    act: torch.Tensor
    forced: torch.Tensor
    swap: torch.Tensor
    hot_slot: torch.Tensor
    slot: torch.Tensor
    expert: torch.Tensor
    peak: torch.Tensor


class OpenLayers(NamedTuple):
    """The layers a repair chain still works on, one row each (``T`` rows).

    load: ``[T, E]`` float64; ref_counts: ``[T, E]`` the reference's replica counts (float64);
    ceiling: ``[T, 1, 1]`` the max GPU load at which a layer is done; limit: ``[T, 1]`` the
    reference's heaviest replica; current: ``[T, P]`` the served placement; phys2log: ``[T, P]``
    the chain's state; counts: ``[T, E]`` its replica counts (float64, whole numbers); share:
    ``[T, E]`` ``load / counts``; slot_share: ``[T, P]`` the share of each slot's expert;
    gpu_load: ``[T, G]``; peak: ``[T, 1]`` its max; hot_gpu: ``[T]`` the (first) GPU at the max;
    changed: ``[T, P]`` bool, ``phys2log != current``.
    """

    load: torch.Tensor
    ref_counts: torch.Tensor
    ceiling: torch.Tensor
    limit: torch.Tensor
    current: torch.Tensor
    phys2log: torch.Tensor
    counts: torch.Tensor
    share: torch.Tensor
    slot_share: torch.Tensor
    gpu_load: torch.Tensor
    peak: torch.Tensor
    hot_gpu: torch.Tensor
    changed: torch.Tensor


#: The rank of a candidate that is not taken (a 0-d tensor, for ``torch.where(..., out=)``).
NO_RANK = torch.tensor(float("-inf"), dtype=torch.float64)
#: The least load shed (relative to the peak) that counts as a change (a 0-d tensor).
TINY = torch.tensor(1e-9, dtype=torch.float64)
#: Infinite load and -1.0 (0-d tensors: cheaper in ``torch.where`` than Python numbers).
NO_LOAD = torch.tensor(float("inf"), dtype=torch.float64)
MINUS_ONE = torch.tensor(-1.0, dtype=torch.float64)


@functools.lru_cache(maxsize=32)
def lanes(n: int) -> torch.Tensor:
    """``arange(n)``, made once (read-only)."""
    return torch.arange(n)


@functools.lru_cache(maxsize=32)
def gpu_slots(num_gpus: int, per_gpu: int) -> torch.Tensor:
    """``[G, S]``: the slots of each GPU, made once (read-only)."""
    return torch.arange(num_gpus * per_gpu).view(num_gpus, per_gpu)


@functools.lru_cache(maxsize=32)
def slot_gpu(num_gpus: int, per_gpu: int) -> torch.Tensor:
    """``[P]``: the GPU of each slot, made once (read-only)."""
    return torch.arange(num_gpus).repeat_interleave(per_gpu)


@functools.lru_cache(maxsize=32)
def row_column(rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows * columns]`` each: the row and the column of each flat index, made once
    (read-only; a lookup is cheaper than an integer division)."""
    flat = torch.arange(rows * columns)
    return flat // columns, flat % columns


def best_changes(open_layers: OpenLayers) -> Change:
    """For each layer, one change for its most loaded GPU ``h``: the new expert of slot ``slot``,
    and for a swap the new expert of slot ``hot_slot`` on ``h``.

    First, a replica that must move: an expert on ``h`` whose load per replica exceeds ``limit``
    (the reference's heaviest replica) cannot fit the reference way, so it takes a slot of the
    expert with a spare replica (more than ``ref_counts``) that is cheapest to give up, on the
    most loaded GPU holding that expert (forced: 1 slot).

    Otherwise the best of these candidates: swap a slot of ``h`` with a lighter slot on one of the
    ``LIGHT_GPUS`` least loaded GPUs (any GPU with at most ``ALL_TARGETS_UP_TO`` slots per GPU;
    2 slots change, counts unchanged), or turn a slot of one of the ``DONORS`` cheapest spare
    replicas elsewhere into one more replica of an expert on ``h`` (a split: 1 slot). A candidate
    is scored by the highest load among the GPUs it touches (for a split, the other GPUs holding
    the expert that gives up a replica are charged with its heavier share: an upper bound). Those
    that bring all of them under ``ceiling`` rank first, 1-slot ones before 2-slot ones, then by
    load shed; the rest by load shed per slot changed. A candidate's slots are counted net of the
    chain so far (:func:`cost_bias`: a slot changed before costs nothing more, one given back its
    current expert saves one). The caller checks the chosen change exactly.

    Shapes: ``T`` layers, ``S`` slots per GPU, ``C`` swap targets, ``W`` spare replicas listed,
    ``M`` donors. Candidates are ``[T, S, C + M]``: each slot of ``h`` times the ``C`` swap
    targets, then the ``M`` donor slots. Two ``[T, S, C + M]`` float64 buffers are filled in place:
    ``candidate_load`` (the max load of the GPUs a candidate touches, then, in the same memory, the
    load it sheds) and ``rank``.

    Args:
        open_layers: the layers (:class:`OpenLayers`).
    Returns:
        the :class:`Change` of each layer.
    """
    layers, slots = open_layers.phys2log.shape
    num_gpus = open_layers.gpu_load.shape[1]
    experts = open_layers.load.shape[1]
    per_gpu = slots // num_gpus
    inf = float("inf")
    phys2log, slot_share = open_layers.phys2log, open_layers.slot_share
    gpu_load, peak = open_layers.gpu_load, open_layers.peak
    hot_gpu = open_layers.hot_gpu.unsqueeze(1)  # [T, 1]
    peak_3d = peak.unsqueeze(2)  # [T, 1, 1]
    hot_slots = gpu_slots(num_gpus, per_gpu).index_select(0, open_layers.hot_gpu)  # [T, S]
    hot_experts = phys2log.gather(1, hot_slots)  # [T, S]
    hot_shares = slot_share.gather(1, hot_slots)  # [T, S]

    # Swaps: a hot slot's replica moves to the target slot's GPU and the target's comes back.
    # Targets are the slots of the lightest GPUs (a move must land below the peak; the lightest
    # leave the most room). The hot GPU itself gets an infinite load (never taken); a target of
    # the same expert moves nothing (not taken).
    if per_gpu <= ALL_TARGETS_UP_TO or LIGHT_GPUS >= num_gpus:  # every GPU, in order (no sort)
        target_gpu_load = gpu_load.scatter(1, hot_gpu, inf)  # [T, G]
        target_slots = lanes(slots).expand(layers, -1)  # [T, C = P]
        target_shares, target_experts = slot_share, phys2log
        target_current, target_changed = open_layers.current, open_layers.changed
    else:
        target_gpu_load, light_gpus = gpu_load.topk(LIGHT_GPUS, dim=1, largest=False)  # [T, K]
        target_gpu_load = target_gpu_load.masked_fill(light_gpus == hot_gpu, inf)
        target_slots = (light_gpus.unsqueeze(2) * per_gpu + lanes(per_gpu)).view(layers, -1)  # [T, C]
        target_shares = slot_share.gather(1, target_slots)
        target_experts = phys2log.gather(1, target_slots)
        target_current = open_layers.current.gather(1, target_slots)
        target_changed = open_layers.changed.gather(1, target_slots)
    num_targets = target_slots.shape[1]
    num_spare = max(1, min(slots, 2 * (slots - experts)))  # spare replicas listed
    num_donors = min(num_spare, DONORS)
    num_candidates = num_targets + num_donors
    candidate_load = torch.empty(layers, per_gpu, num_candidates, dtype=torch.float64)
    swap_load = candidate_load.narrow(2, 0, num_targets)  # [T, S, C]
    moved = hot_shares.unsqueeze(2) - target_shares.unsqueeze(1)  # [T, S, C] load sent away
    # the target's GPU after the swap (targets come GPU by GPU, S slots each)...
    torch.add(target_gpu_load.view(layers, 1, -1, 1), moved.view(layers, per_gpu, -1, per_gpu),
              out=swap_load.view(layers, per_gpu, -1, per_gpu))
    # ...and the hot GPU after it; a swap with moved <= 0 touches at least the peak (sheds nothing)
    torch.maximum(torch.sub(peak_3d, moved, out=moved), swap_load, out=swap_load)

    # Splits: a slot off h whose expert a has a spare replica becomes one more replica of a hot
    # expert b; a's other holders take its heavier share. Donors are those cheapest to give up,
    # from the slots of experts with more than one replica (at most 2 (P - E), listed in slot order
    # from column 1, column 0 taking the others; then padded with a hot slot, which never gives up
    # its replica: inf).
    counts = open_layers.counts
    share_one_fewer = open_layers.load / (counts - 1).clamp_(min=1)  # [T, E]
    has_spare = counts.gather(1, phys2log) > 1  # [T, P]
    spare_slots = hot_slots.narrow(1, 0, 1).expand(-1, num_spare + 1).clone().scatter_(
        1, has_spare.cumsum(dim=1).mul_(has_spare), lanes(slots).expand(layers, -1)
    ).narrow(1, 1, num_spare)  # [T, W]
    spare_experts = phys2log.gather(1, spare_slots)  # [T, W]
    spare_gpus = slot_gpu(num_gpus, per_gpu).take(spare_slots)
    spare_gpu_load = gpu_load.gather(1, spare_gpus)
    spare_shares = slot_share.gather(1, spare_slots)
    # the other GPUs holding the donor's expert, each with its heavier share
    other_gpu_load = other_holder(spare_slots, spare_experts, spare_gpu_load, share_one_fewer)
    other_gpu_load += share_one_fewer.gather(1, spare_experts) - spare_shares
    other_gpu_load.masked_fill_(spare_gpus == hot_gpu, inf)
    donor_gpu_after = spare_gpu_load - spare_shares  # before it takes the hot expert
    donor_pick = torch.maximum(other_gpu_load, donor_gpu_after).topk(
        num_donors, dim=1, largest=False).indices  # [T, M]
    donor_slots = spare_slots.gather(1, donor_pick)
    split_share = open_layers.load.gather(1, hot_experts) / (counts.gather(1, hot_experts) + 1)  # [T, S]
    split_load = candidate_load.narrow(2, num_targets, num_donors)  # [T, S, M]
    torch.maximum(torch.maximum((peak - (hot_shares - split_share)).unsqueeze(2),
                                donor_gpu_after.gather(1, donor_pick).unsqueeze(1)
                                + split_share.unsqueeze(2)),
                  other_gpu_load.gather(1, donor_pick).unsqueeze(1), out=split_load)
    # (an expert giving a replica to itself changes nothing: not taken)
    split_load.masked_fill_(hot_experts.unsqueeze(2) == spare_experts.gather(1, donor_pick).unsqueeze(1),
                            inf)

    # Rank: a change that brings every GPU it touches under the ceiling first, fewer slots first,
    # then more load shed (bias + shed, bias = 10 - net slots); otherwise the load shed per slot
    # changed (at least a quarter of a slot).
    under_ceiling = candidate_load <= open_layers.ceiling
    shed = torch.sub(peak_3d, candidate_load, out=candidate_load).div_(peak_3d.clamp(min=1e-300))  # <= 1
    sheds_some = shed > TINY
    bias = cost_bias(hot_experts, open_layers.current.gather(1, hot_slots),
                     open_layers.changed.gather(1, hot_slots), target_experts, target_current,
                     target_changed, open_layers.current.gather(1, donor_slots),
                     open_layers.changed.gather(1, donor_slots))
    rank_under = bias.to(torch.float64)
    rank = (10 - bias).to(torch.float64).clamp_(min=0.25)  # net slots changed, at least 1/4
    rank = torch.div(shed, rank, out=rank)
    rank = torch.where(under_ceiling, rank_under.add_(shed), rank, out=rank)
    rank = torch.where(sheds_some, rank, NO_RANK, out=rank)
    best_rank, best = rank.view(layers, -1).max(dim=1, keepdim=True)  # [T, 1]
    hot_index, candidate = (part.take(best) for part in row_column(per_gpu, num_candidates))
    gain = shed.view(layers, -1).gather(1, best) * peak
    swap = candidate < num_targets
    act = (best_rank > NO_RANK) & (gain > peak * 1e-9)
    hot_slot = hot_slots.gather(1, hot_index)
    slot = torch.cat([target_slots, donor_slots], dim=1).gather(1, candidate)
    expert = hot_experts.gather(1, hot_index)

    # The forced replica overrides.
    excess, heaviest = (hot_shares - open_layers.limit).max(dim=1, keepdim=True)
    forced = excess > open_layers.limit * 1e-9
    if not bool(forced.any()):
        return Change(act, forced, swap, hot_slot, slot, expert, peak)
    grow = hot_experts.gather(1, heaviest)
    giver_share, giver = torch.where(counts > open_layers.ref_counts, share_one_fewer,
                                     NO_LOAD).min(dim=1, keepdim=True)
    forced &= (giver_share < NO_LOAD) & (giver != grow)
    # (the giver has a spare replica, so all of its slots are listed: take the one on its most
    # loaded GPU)
    forced_slot = spare_slots.gather(1, torch.where(spare_experts == giver, spare_gpu_load, MINUS_ONE)
                                     .argmax(dim=1, keepdim=True))
    return Change(act | forced, forced, swap > forced, hot_slot, torch.where(forced, forced_slot, slot),
                  torch.where(forced, grow, expert), peak)


def cost_bias(source_expert: torch.Tensor, source_current: torch.Tensor, source_changed: torch.Tensor,
              target_expert: torch.Tensor, target_current: torch.Tensor, target_changed: torch.Tensor,
              donor_current: torch.Tensor, donor_changed: torch.Tensor) -> torch.Tensor:
    """``10 -`` the net slots changed by each candidate of :func:`best_changes`, as int8.

    A swap of source slot ``s`` with target slot ``t`` sets ``s`` to ``t``'s expert and ``t`` to
    ``s``'s; a split sets donor slot ``t`` to ``s``'s expert. Counted against the current
    placement, net of the chain so far: a swap changes 2 slots, less each one changed before
    (``changed``), less each one given back its current expert; a split changes 1, less the same
    for its donor slot. So a swap with a slot changed earlier (closing a cycle) costs 1, not 2.
    (int8 and ``10 -``: the ranking adds the bias to the load shed as is, one small buffer.)

    Args:
        source_expert, source_current, source_changed: ``[T, S]`` the hot GPU's slots: their
            experts in the chain's state and in the current placement, and whether they differ.
        target_expert, target_current, target_changed: ``[T, C]`` the same for the swap targets.
        donor_current, donor_changed: ``[T, M]`` for the donor slots (their experts in the state
            are not needed).
    Returns:
        ``[T, S, C + M]`` int8 (8..12).
    """
    layers, per_gpu = source_expert.shape
    num_targets, num_donors = target_current.shape[1], donor_current.shape[1]
    bias = torch.empty(layers, per_gpu, num_targets + num_donors, dtype=torch.int8)
    swap, split = bias.narrow(2, 0, num_targets), bias.narrow(2, num_targets, num_donors)
    torch.add(source_changed.view(torch.int8).unsqueeze(2),
              (target_changed.view(torch.int8) + 8).unsqueeze(1), out=swap)
    swap += target_expert.unsqueeze(1) == source_current.unsqueeze(2)
    swap += source_expert.unsqueeze(2) == target_current.unsqueeze(1)
    torch.add((donor_changed.view(torch.int8) + 9).unsqueeze(1),
              source_expert.unsqueeze(2) == donor_current.unsqueeze(1), out=split)
    return bias


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
                 ref_counts: torch.Tensor, limit: torch.Tensor) -> Chain:
    """Local search from ``current``. At each step, every layer whose max GPU load is above its
    ``ceiling`` makes the change :func:`best_changes` names if it is forced, or truly lowers the
    layer's max GPU load (or leaves fewer GPUs at that max); a layer with no such change stops,
    and so does one that reaches its ceiling. Stops after ``steps`` steps, when no layer is left,
    or once the mean balancedness of the layers' last states reaches ``goal``. Each step works on
    the layers still going only.

    Args:
        load: ``[L, E]`` float64; current: ``[L, P]`` int64; counts: ``[L, E]`` its replica counts;
        gpu_load: ``[L, G]`` its GPU loads; ceiling: ``[L]`` max GPU load at which a layer is done;
        ref_counts: ``[L, E]`` the reference's replica counts; limit: ``[L]`` its heaviest
        replica (``load / ref_counts``, max per layer).
    Returns:
        the :class:`Chain`: each layer's states in order, one per step it made a change.
    """
    layers, num_gpus = gpu_load.shape
    mean = load.sum(dim=1) / num_gpus  # [L] mean GPU load
    peak = gpu_load.max(dim=1).values
    first = mean_over_peak(mean, peak).tolist()
    chain = Chain(current, [[layer] for layer in range(layers)], [[s] for s in first],
                  [[0] for _ in range(layers)])
    last = first[:]
    ceilings = ceiling.tolist()
    going = (peak > ceiling).nonzero().squeeze(1)
    ids = going.tolist()  # the layers still going
    peaks = [first_peak for first_peak, c in zip(peak.tolist(), ceilings) if first_peak > c]
    # (counts as float64 from here: whole numbers, so every share is the same, without the
    # int-to-float promotion in each division)
    t_load, t_counts, t_current = load[going], counts[going].to(torch.float64), current[going]
    t_share = t_load / t_counts.clamp(min=1)
    t_gpu = gpu_load[going]
    t_max = t_gpu.max(dim=1)
    t_mean = mean[going]
    open_layers = OpenLayers(t_load, ref_counts[going].to(torch.float64), ceiling[going].view(-1, 1, 1),
                              limit[going].unsqueeze(1), t_current, t_current, t_counts, t_share,
                              t_share.gather(1, t_current), t_gpu, t_max.values.unsqueeze(1),
                              t_max.indices, torch.zeros_like(t_current, dtype=torch.bool))
    found, offset = [current], layers
    for _ in range(steps):
        if not ids or math.fsum(last) / layers >= goal:
            break
        change = best_changes(open_layers)
        swap, slot, expert = change.swap, change.slot, change.expert
        gone = open_layers.phys2log.gather(1, slot)  # [T, 1] the expert the slot gives up
        new_p2l = open_layers.phys2log.scatter(1, torch.where(swap, change.hot_slot, slot), gone)
        new_p2l.scatter_(1, slot, expert)
        split = (~swap).to(torch.float64)
        new_counts = open_layers.counts.scatter_add(1, gone, -split).scatter_add_(1, expert, split)
        new_share = open_layers.load / new_counts.clamp(min=1)
        new_slot = new_share.gather(1, new_p2l)
        new_gpu = sum_per_gpu(new_slot, num_gpus)
        new_max = new_gpu.max(dim=1)
        new_peak = new_max.values.tolist()
        changed = new_p2l != open_layers.current
        # progress: a lower max, or as high a max on fewer GPUs (a twin of the hot GPU remains);
        # a forced replica may raise the max for a step
        acts = change.act.view(-1).tolist()
        keep = [act and (forced or new < old) for act, forced, new, old
                in zip(acts, change.forced.view(-1).tolist(), new_peak, peaks)]
        level = [act and new == old for act, new, old in zip(acts, new_peak, peaks)]
        if any(level):
            fewer = ((new_gpu >= change.peak).sum(dim=1)
                     < (open_layers.gpu_load >= change.peak).sum(dim=1))
            keep = [k or (lv and f) for k, lv, f in zip(keep, level, fewer.tolist())]
        scores = mean_over_peak(t_mean, new_max.values).tolist()
        moved = changed.sum(dim=1).tolist()
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
        if not stay:
            break
        if len(stay) == len(ids):
            open_layers = open_layers._replace(
                phys2log=new_p2l, counts=new_counts, share=new_share, slot_share=new_slot,
                gpu_load=new_gpu, peak=new_max.values.unsqueeze(1), hot_gpu=new_max.indices,
                changed=changed)
            peaks = new_peak
            continue
        ids = [ids[i] for i in stay]
        peaks = [new_peak[i] for i in stay]
        at = torch.tensor(stay, dtype=torch.int64)
        t_mean = t_mean.index_select(0, at)
        new_gpu = new_gpu.index_select(0, at)
        new_max = new_gpu.max(dim=1)  # (the same as selecting its rows)
        open_layers = OpenLayers(*(t.index_select(0, at) for t in (
            open_layers.load, open_layers.ref_counts, open_layers.ceiling, open_layers.limit,
            open_layers.current, new_p2l, new_counts, new_share, new_slot)),
            new_gpu, new_max.values.unsqueeze(1), new_max.indices, changed.index_select(0, at))
    return chain._replace(states=torch.cat(found))
