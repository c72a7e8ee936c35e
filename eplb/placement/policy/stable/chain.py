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
4. **Fallback.** Where a chain stops short (typically when many experts' loads moved a little
   at once, leaving dozens of GPUs over the ceiling), two more options for that layer: a
   targeted repack (:mod:`eplb.coordinator.repack`: replica counts within the reference's
   heaviest replica, an eviction from each GPU over the ceiling, the evicted replicas placed
   back by best fit or a swap; offered where it changes at most ``REPACK_AT_MOST`` of what the
   next option changes), and the reference plan itself, aligned to the current placement (its
   GPUs matched to the current GPUs by shared experts, experts kept in their old slots within a
   GPU).
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
from eplb.coordinator.repack import repack_layers

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
#: A repacked layer is an option only where it changes at most this share of the slots that the
#: aligned reference changes there. A repack that changes nearly as much as the reference tends to
#: leave a layer that needs more moves in later windows. (Measured at 144 GPUs on the benchmark's
#: noise drift, seeds 11, 22 and 33, against no repack: with no bound the moves per drift window
#: fell 42 % for lognormal 0.5 and 4 % for lognormal 1.0; with this bound 40 % and 44 %.)
REPACK_AT_MOST = 0.5


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
    """One change per layer (see :func:`best_changes`); all ``[T, 1]``.

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


class Going(NamedTuple):
    """The layers a repair chain still works on, one row each (``T`` rows).

    load: ``[T, E]`` float64; ref: ``[T, E]`` the reference's replica counts (float64); ceiling:
    ``[T, 1, 1]`` the max GPU load at which a layer is done; limit: ``[T, 1]`` the reference's
    heaviest replica; current: ``[T, P]`` the served placement; phys2log: ``[T, P]`` the chain's
    state; counts: ``[T, E]`` its replica counts (float64, whole numbers); share: ``[T, E]``
    ``load / counts``; slot: ``[T, P]`` the share of each slot's expert; gpu: ``[T, G]`` GPU
    loads; peak: ``[T, 1]`` their max; hot: ``[T]`` its (first) GPU; changed: ``[T, P]`` bool,
    ``phys2log != current``.
    """

    load: torch.Tensor
    ref: torch.Tensor
    ceiling: torch.Tensor
    limit: torch.Tensor
    current: torch.Tensor
    phys2log: torch.Tensor
    counts: torch.Tensor
    share: torch.Tensor
    slot: torch.Tensor
    gpu: torch.Tensor
    peak: torch.Tensor
    hot: torch.Tensor
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


def best_changes(g: Going) -> Change:
    """For each layer, one change for its most loaded GPU ``g``: the new expert of slot ``dst``,
    and for a swap the new expert of slot ``src`` on ``g``.

    First, a replica that must move: an expert on ``g`` whose load per replica exceeds
    ``limit`` (the reference's heaviest replica) cannot fit the reference way, so it takes a slot
    of the expert with a spare replica (more than ``ref``) that is cheapest to give up, on
    the most loaded GPU holding that expert (forced: 1 slot).

    Otherwise the best of these candidates: swap a slot of ``g`` with a lighter slot on one of the
    ``LIGHT_GPUS`` least loaded GPUs (any GPU with at most ``ALL_TARGETS_UP_TO`` slots per GPU;
    2 slots change, counts unchanged), or turn a slot of one of the ``DONORS`` cheapest spare
    replicas elsewhere into one more replica of an expert on ``g`` (1 slot). A candidate is scored
    by the highest load among the GPUs it touches (for a split, the other GPUs holding the expert
    that gives up a replica are charged with its heavier share: an upper bound). Those that bring
    all of them under ``ceiling`` rank first, 1-slot ones before 2-slot ones, then by load shed;
    the rest by load shed per slot changed. A candidate's slots are counted net of
    the chain so far (:func:`net_costs`: a slot changed before costs nothing more, one given back
    its current expert saves one). The caller checks the chosen change exactly.

    Candidates are ``[T, S, C + M]``: ``S`` slots of ``g`` times ``C`` swap targets, then ``M``
    donor slots. The work is written out in few, large tensor operations, several of them in
    place into two buffers (the touched load, then the load shed; and whether a candidate is
    valid): on a CPU, at a few layers, each operation costs about as much as its arithmetic.

    Args:
        g: the layers (:class:`Going`).
    Returns:
        the :class:`Change` of each layer.
    """
    layers, slots = g.phys2log.shape
    num_gpus = g.gpu.shape[1]
    experts = g.load.shape[1]
    per_gpu = slots // num_gpus
    inf = float("inf")
    p2l, slot, gpu, peak = g.phys2log, g.slot, g.gpu, g.peak
    hot = g.hot.unsqueeze(1)  # [T, 1]
    peak3 = peak.unsqueeze(2)
    source = gpu_slots(num_gpus, per_gpu).index_select(0, g.hot)  # [T, S] the slots of g
    es, xs = p2l.gather(1, source), slot.gather(1, source)

    # Swaps: d moves from g to the target slot's GPU. Targets are the slots of the lightest GPUs
    # (a move must land below the peak; the lightest leave the most room). The GPU g itself has
    # an infinite room (touched inf: never taken), one slot of the same expert d = 0 (not taken).
    if per_gpu <= ALL_TARGETS_UP_TO or LIGHT_GPUS >= num_gpus:  # every GPU, in order (no sort)
        light_load = gpu.scatter(1, hot, inf)
        target, x, t_expert = lanes(slots).expand(layers, -1), slot, p2l
        t_current, t_changed = g.current, g.changed
    else:
        light_load, light = gpu.topk(LIGHT_GPUS, dim=1, largest=False)  # [T, K]
        light_load = light_load.masked_fill(light == hot, inf)
        target = (light.unsqueeze(2) * per_gpu + lanes(per_gpu)).view(layers, -1)  # [T, C]
        x, t_expert = slot.gather(1, target), p2l.gather(1, target)
        t_current, t_changed = g.current.gather(1, target), g.changed.gather(1, target)
    width = target.shape[1]
    wide = max(1, min(slots, 2 * (slots - experts)))  # spare replicas listed
    donors = min(wide, DONORS)
    total = width + donors
    # (the touched load of every candidate, then its load shed, in one buffer; a swap with d <= 0
    # touches at least the peak: it sheds nothing, so it is not taken)
    touched = torch.empty(layers, per_gpu, total, dtype=torch.float64)
    swapped = touched.narrow(2, 0, width)
    d = xs.unsqueeze(2) - x.unsqueeze(1)  # [T, S, C]
    torch.add(light_load.view(layers, 1, -1, 1), d.view(layers, per_gpu, -1, per_gpu),
              out=swapped.view(layers, per_gpu, -1, per_gpu))  # the room left on the target's GPU
    torch.maximum(torch.sub(peak3, d, out=d), swapped, out=swapped)

    # Splits: a slot off g whose expert a has a spare replica becomes one more replica of b = es;
    # a's other holders take its heavier share. Donors: those cheapest to give up, from the slots
    # of experts with more than one replica (at most 2 (P - E), listed in slot order from column
    # 1, column 0 taking the others; then padded with a slot of g, which never gives up its
    # replica: inf).
    counts = g.counts
    one_less = g.load / (counts - 1).clamp_(min=1)  # [T, E] the share with one replica fewer
    multi = counts.gather(1, p2l) > 1  # [T, P]
    spare = source.narrow(1, 0, 1).expand(-1, wide + 1).clone().scatter_(
        1, multi.cumsum(dim=1).mul_(multi), lanes(slots).expand(layers, -1)).narrow(1, 1, wide)
    spare_expert = p2l.gather(1, spare)  # [T, W]
    spare_gpu = slot_gpu(num_gpus, per_gpu).take(spare)
    spare_load = gpu.gather(1, spare_gpu)
    spare_share = slot.gather(1, spare)
    holders = other_holder(spare, spare_expert, spare_load, one_less)
    holders += one_less.gather(1, spare_expert) - spare_share
    holders.masked_fill_(spare_gpu == hot, inf)
    left = spare_load - spare_share
    pick = torch.maximum(holders, left).topk(donors, dim=1, largest=False).indices  # [T, M]
    donor = spare.gather(1, pick)
    new_share = g.load.gather(1, es) / (counts.gather(1, es) + 1)  # [T, S]
    split = touched.narrow(2, width, donors)
    torch.maximum(torch.maximum((peak - (xs - new_share)).unsqueeze(2),
                                left.gather(1, pick).unsqueeze(1) + new_share.unsqueeze(2)),
                  holders.gather(1, pick).unsqueeze(1), out=split)
    # (an expert giving a replica to itself changes nothing: not taken)
    split.masked_fill_(es.unsqueeze(2) == spare_expert.gather(1, pick).unsqueeze(1), inf)

    # Rank: a change that brings every GPU it touches under the ceiling first, fewer slots first,
    # then more load shed (bias + shed, bias = 10 - cost); otherwise the load shed per slot changed
    # (at least a quarter of a slot).
    under = touched <= g.ceiling
    shed = torch.sub(peak3, touched, out=touched).div_(peak3.clamp(min=1e-300))  # <= 1
    valid = shed > TINY
    bias = cost_bias(es, g.current.gather(1, source), g.changed.gather(1, source), t_expert,
                     t_current, t_changed, g.current.gather(1, donor), g.changed.gather(1, donor))
    top = bias.to(torch.float64)
    per_slot = (10 - bias).to(torch.float64).clamp_(min=0.25)
    rank = torch.div(shed, per_slot, out=per_slot)
    rank = torch.where(under, top.add_(shed), rank, out=rank)
    rank = torch.where(valid, rank, NO_RANK, out=rank)
    best, index = rank.view(layers, -1).max(dim=1, keepdim=True)  # [T, 1]
    row, column = (part.take(index) for part in row_column(per_gpu, total))
    gain = shed.view(layers, -1).gather(1, index) * peak
    swap = column < width
    act = (best > NO_RANK) & (gain > peak * 1e-9)
    src = source.gather(1, row)
    dst = torch.cat([target, donor], dim=1).gather(1, column)
    new_expert = es.gather(1, row)

    # The forced replica overrides.
    excess, at = (xs - g.limit).max(dim=1, keepdim=True)
    forced = excess > g.limit * 1e-9
    if not bool(forced.any()):
        return Change(act, forced, swap, src, dst, new_expert, peak)
    grow = es.gather(1, at)
    donor_load, donor_expert = torch.where(counts > g.ref, one_less, NO_LOAD).min(dim=1, keepdim=True)
    forced &= (donor_load < NO_LOAD) & (donor_expert != grow)
    # (a donor has a spare replica, so all of its slots are listed)
    forced_slot = spare.gather(1, torch.where(spare_expert == donor_expert, spare_load, MINUS_ONE)
                               .argmax(dim=1, keepdim=True))
    return Change(act | forced, forced, swap > forced, src, torch.where(forced, forced_slot, dst),
                  torch.where(forced, grow, new_expert), peak)


def cost_bias(es: torch.Tensor, s_current: torch.Tensor, s_changed: torch.Tensor,
              t_expert: torch.Tensor, t_current: torch.Tensor, t_changed: torch.Tensor,
              d_current: torch.Tensor, d_changed: torch.Tensor) -> torch.Tensor:
    """``10 -`` :func:`net_costs`, as int8, from the candidates' slots.

    A swap changes 2 slots, less each one changed before (``changed``), less each one given back
    its current expert; a split changes 1, less the same for its donor slot.

    Args:
        es, s_current, s_changed: ``[T, S]`` the source slots' experts in the chain's state and
        in the current placement, and whether they differ; t_expert, t_current, t_changed:
        ``[T, C]`` the same for the swap targets; d_current, d_changed: ``[T, M]`` for the donor
        slots (whose experts in the state are not needed).
    Returns:
        ``[T, S, C + M]`` int8 (8..12).
    """
    layers, per_gpu = es.shape
    width, donors = t_current.shape[1], d_current.shape[1]
    bias = torch.empty(layers, per_gpu, width + donors, dtype=torch.int8)
    swap, split = bias.narrow(2, 0, width), bias.narrow(2, width, donors)
    torch.add(s_changed.view(torch.int8).unsqueeze(2), (t_changed.view(torch.int8) + 8).unsqueeze(1),
              out=swap)
    swap += t_expert.unsqueeze(1) == s_current.unsqueeze(2)
    swap += es.unsqueeze(2) == t_current.unsqueeze(1)
    torch.add((d_changed.view(torch.int8) + 9).unsqueeze(1), es.unsqueeze(2) == d_current.unsqueeze(1),
              out=split)
    return bias


def net_costs(phys2log: torch.Tensor, current: torch.Tensor, source: torch.Tensor,
              target: torch.Tensor, donor: torch.Tensor, es: torch.Tensor) -> torch.Tensor:
    """Slots changed against ``current`` after each candidate of :func:`best_changes`, minus before.

    A swap of source slot ``s`` (expert ``es``) with target slot ``t`` (expert ``et``) sets
    ``s`` to ``et`` and ``t`` to ``es``; a split sets donor slot ``t`` to ``es``. A slot that the
    chain changed before costs nothing more when it changes again, and one given back its current
    expert saves one: so a swap with a slot changed earlier (a cycle) costs 1, not 2. (The chain
    uses :func:`cost_bias`, ``10 -`` these.)

    Args:
        phys2log: ``[L, P]`` the chain's state; current: ``[L, P]`` the served placement;
        source: ``[L, S]`` slots of the hot GPU; target: ``[L, C]`` swap targets; donor:
        ``[L, M]`` split slots; es: ``[L, S]`` the experts of ``source``.
    Returns:
        ``[L, S, C + M]`` float64 (whole numbers from -2 to 2).
    """
    changed = phys2log != current
    bias = cost_bias(es, current.gather(1, source), changed.gather(1, source),
                     phys2log.gather(1, target), current.gather(1, target),
                     changed.gather(1, target), current.gather(1, donor), changed.gather(1, donor))
    return 10.0 - bias.to(torch.float64)


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
    mean = (load.sum(dim=1) / num_gpus).tolist()
    peak = gpu_load.max(dim=1).values
    first = score_of(mean, peak.tolist())
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
    g = Going(t_load, ref_counts[going].to(torch.float64), ceiling[going].view(-1, 1, 1),
              limit[going].unsqueeze(1), t_current, t_current, t_counts, t_share,
              t_share.gather(1, t_current), t_gpu, t_max.values.unsqueeze(1), t_max.indices,
              torch.zeros_like(t_current, dtype=torch.bool))
    found, offset = [current], layers
    for _ in range(steps):
        if not ids or math.fsum(last) / layers >= goal:
            break
        change = best_changes(g)
        swap, dst, expert = change.swap, change.dst, change.expert
        gone = g.phys2log.gather(1, dst)  # [T, 1] the expert dst gives up
        new_p2l = g.phys2log.scatter(1, torch.where(swap, change.src, dst), gone)
        new_p2l.scatter_(1, dst, expert)
        split = (~swap).to(torch.float64)
        new_counts = g.counts.scatter_add(1, gone, -split).scatter_add_(1, expert, split)
        new_share = g.load / new_counts.clamp(min=1)
        new_slot = new_share.gather(1, new_p2l)
        new_gpu = gpu_load_from(new_slot, num_gpus)
        new_max = new_gpu.max(dim=1)
        new_peak = new_max.values.tolist()
        changed = new_p2l != g.current
        # progress: a lower max, or as high a max on fewer GPUs (a twin of the hot GPU remains);
        # a forced replica may raise the max for a step
        acts = change.act.view(-1).tolist()
        keep = [act and (forced or new < old) for act, forced, new, old
                in zip(acts, change.forced.view(-1).tolist(), new_peak, peaks)]
        level = [act and new == old for act, new, old in zip(acts, new_peak, peaks)]
        if any(level):
            fewer = (new_gpu >= change.peak).sum(dim=1) < (g.gpu >= change.peak).sum(dim=1)
            keep = [k or (lv and f) for k, lv, f in zip(keep, level, fewer.tolist())]
        scores = score_of([mean[layer] for layer in ids], new_peak)
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
            g = g._replace(phys2log=new_p2l, counts=new_counts, share=new_share, slot=new_slot,
                           gpu=new_gpu, peak=new_max.values.unsqueeze(1), hot=new_max.indices,
                           changed=changed)
            peaks = new_peak
            continue
        ids = [ids[i] for i in stay]
        peaks = [new_peak[i] for i in stay]
        at = torch.tensor(stay, dtype=torch.int64)
        new_gpu = new_gpu.index_select(0, at)
        new_max = new_gpu.max(dim=1)  # (the same as selecting its rows)
        g = Going(*(t.index_select(0, at) for t in (
            g.load, g.ref, g.ceiling, g.limit, g.current, new_p2l, new_counts, new_share,
            new_slot)), new_gpu, new_max.values.unsqueeze(1), new_max.indices,
            changed.index_select(0, at))
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
    """Add a :func:`eplb.coordinator.repack.repack_layer` plan as an option of each listed layer
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
    scores = layer_balancedness(load[rows], gpu_load_of(load[rows], plans,
                                                        counts_of(plans, load.shape[1]), num_gpus))
    for i, (layer, score) in enumerate(zip(offered, scores.tolist())):
        chain.rows[layer].append(states.shape[0] + i)
        chain.scores[layer].append(score)
        chain.moves[layer].append(moves[layer])
    return torch.cat([states, plans])
