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
   preferring changes that bring every GPU they touch under the ceiling. Each change is checked
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

import heapq

import torch

from eplb.coordinator.policy_deepseek import balanced_packing

#: How far below the from-scratch plan's balancedness the stable plan may stay (absolute).
DEFAULT_TOLERANCE = 0.003
#: A layer's repair stops once its max GPU load is within this fraction of the reference's.
SLACK = 0.002
#: Local-search steps per layer before the reference plan is used as the fallback.
DEFAULT_STEPS = 12
#: A local-search move lands on one of this many least-loaded GPUs.
LIGHT_GPUS = 16
#: A replica-splitting move takes its slot from one of this many cheapest donors.
DONORS = 32


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
    order = per_replica.argsort(dim=1, descending=True, stable=True)  # [L, E]
    ends = counts.gather(1, order).cumsum(dim=1)  # [L, E]
    position = torch.arange(num_physical).expand(layers, -1).contiguous()
    replica_expert = order.gather(1, torch.searchsorted(ends, position, right=True))  # [L, P]
    replica_load = per_replica.gather(1, replica_expert)  # [L, P], descending
    gpu_load = torch.zeros(layers, num_gpus, dtype=torch.float64)
    phys2log = torch.empty(layers, num_physical, dtype=torch.int64)
    for r in range(per_gpu):
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
    slot_load = (load / counts.clamp(min=1)).gather(1, phys2log)
    return slot_load.view(phys2log.shape[0], num_gpus, -1).sum(dim=2)


def layer_balancedness(load: torch.Tensor, gpu_load: torch.Tensor) -> torch.Tensor:
    """Mean over max GPU load per layer (1.0 for an idle layer), as
    :func:`eplb.placement.balancedness`. ``load: [L, E]``, ``gpu_load: [L, G]`` -> ``[L]``."""
    peak = gpu_load.max(dim=1).values
    mean = load.sum(dim=1) / gpu_load.shape[1]
    return torch.where(peak > 0, mean / peak.clamp(min=1e-300), torch.ones_like(peak))


def best_moves(load: torch.Tensor, phys2log: torch.Tensor, counts: torch.Tensor,
               gpu_load: torch.Tensor, ceiling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    """For each layer, the best single change for its most loaded GPU ``g``.

    Candidates: swap a slot of ``g`` with a lighter slot on one of the ``LIGHT_GPUS`` least
    loaded GPUs (2 slots change, counts unchanged), or turn a slot of one of the ``DONORS``
    cheapest spare replicas elsewhere into one more replica of an expert on ``g`` (1 slot). A
    change is scored by the highest load among the GPUs it touches (for a split, the other GPUs
    holding the expert that gives up a replica are charged with its heavier share: an upper
    bound). Changes that bring all of those under ``ceiling`` rank first, 1-slot ones before
    2-slot ones, then by load shed; otherwise by load shed per slot changed. The caller checks
    the chosen change exactly.

    Args:
        load: ``[L, E]`` float64; phys2log: ``[L, P]``; counts: ``[L, E]``;
        gpu_load: ``[L, G]`` the placement's GPU loads; ceiling: ``[L]``.
    Returns:
        gain ``[L]`` (load shed from ``g`` per slot changed, 0 when nothing helps), is_swap
        ``[L]`` bool, source ``[L]`` (a slot on ``g``) and target ``[L]`` (the other slot).
    """
    layers, slots = phys2log.shape
    num_gpus = gpu_load.shape[1]
    per_gpu = slots // num_gpus
    peak, hot = gpu_load.max(dim=1)  # [L]
    slot_gpu = torch.arange(slots) // per_gpu  # [P]
    per_replica = load / counts.clamp(min=1)
    x_all = per_replica.gather(1, phys2log)  # [L, P]
    load_all = load.gather(1, phys2log)
    count_all = counts.gather(1, phys2log)
    gpu_all = gpu_load[:, slot_gpu]  # [L, P]
    # the most loaded other GPU holding each slot's expert: top two holder loads per expert
    first = torch.zeros_like(per_replica).scatter_reduce_(1, phys2log, gpu_all, "amax")
    first_at = first.gather(1, phys2log)  # [L, P]
    top_slot = gpu_all >= first_at
    second = torch.zeros_like(per_replica).scatter_reduce_(
        1, phys2log, gpu_all.masked_fill(top_slot, 0.0), "amax").gather(1, phys2log)
    tied = torch.zeros_like(per_replica).scatter_add_(1, phys2log, top_slot.double()).gather(1, phys2log)
    other_holder = torch.where(top_slot & (tied < 2), second, first_at)  # [L, P]

    # Targets: the slots of the lightest GPUs only (a move must land below the peak; the
    # lightest leave the most room), which keeps each step small.
    light = gpu_load.topk(min(num_gpus, LIGHT_GPUS), dim=1, largest=False).indices  # [L, K]
    target = (light[:, :, None] * per_gpu + torch.arange(per_gpu)).reshape(layers, -1)  # [L, C]
    x = x_all.gather(1, target)  # [L, C]
    expert = phys2log.gather(1, target)
    target_gpu_load = gpu_all.gather(1, target)
    source = hot[:, None] * per_gpu + torch.arange(per_gpu)  # [L, S]
    xs = x_all.gather(1, source)  # [L, S]
    es = phys2log.gather(1, source)  # [L, S]
    off_hot = (light != hot[:, None]).repeat_interleave(per_gpu, dim=1)[:, None, :]  # [L, 1, C]
    other_expert = es[:, :, None] != expert[:, None, :]  # [L, S, C]
    never = torch.tensor(float("-inf"), dtype=torch.float64)

    # Moves are ranked by the load of the GPUs they touch (not by the layer's new max, which
    # other hot GPUs may pin): the best local fix first, so the next step starts from a low base.
    # swaps: d moves from the hot GPU to the target slot's GPU
    d = xs[:, :, None] - x[:, None, :]  # [L, S, C]
    swapped = torch.maximum(peak[:, None, None] - d, target_gpu_load[:, None, :] + d)
    swap_ok = off_hot & other_expert & (d > 0)

    # splits: a slot off g whose expert a has a spare replica becomes one more replica of b = es;
    # a's other holders take its heavier share. Donors: those cheapest to give up.
    raise_all = load_all / (count_all - 1).clamp(min=1) - x_all  # [L, P]
    give_up = torch.maximum(other_holder + raise_all, gpu_all - x_all)
    give_up = give_up.masked_fill((count_all < 2) | (slot_gpu == hot[:, None]), float("inf"))
    donor = give_up.topk(min(slots, DONORS), dim=1, largest=False).indices  # [L, M]
    x_d = x_all.gather(1, donor)
    holders = other_holder.gather(1, donor) + raise_all.gather(1, donor)  # [L, M]
    new_share = load.gather(1, es) / (counts.gather(1, es) + 1)  # [L, S]
    hot_after = peak[:, None] - (xs - new_share)  # [L, S]
    split = torch.maximum(torch.maximum(hot_after[:, :, None],
                                        (gpu_all.gather(1, donor) - x_d)[:, None, :] + new_share[:, :, None]),
                          holders[:, None, :])  # [L, S, M]
    split_ok = (give_up.gather(1, donor) < float("inf"))[:, None, :] & \
        (es[:, :, None] != phys2log.gather(1, donor)[:, None, :])

    # Rank: a move that brings every GPU it touches under the ceiling first, fewer slots first,
    # then lower touched load; otherwise the load shed per slot changed.
    touched = torch.cat([swapped.view(layers, -1), split.view(layers, -1)], dim=1)  # [L, S*(C+M)]
    ok = torch.cat([swap_ok.view(layers, -1), split_ok.view(layers, -1)], dim=1)
    n_swap = swapped[0].numel()
    cost = torch.ones_like(touched)
    cost[:, :n_swap] = 2.0
    shed = (peak[:, None] - touched) / peak.clamp(min=1e-300)[:, None]  # <= 1
    rank = torch.where(touched <= ceiling[:, None], 4.0 - cost + shed, shed / cost)
    rank = torch.where(ok & (shed > 1e-9), rank, never)
    best, index = rank.max(dim=1)
    chosen = index[:, None]
    gain = torch.where(best > never, shed.gather(1, chosen).squeeze(1) * peak
                       / cost.gather(1, chosen).squeeze(1), torch.zeros_like(peak))
    is_swap = index < n_swap
    width, donors = target.shape[1], donor.shape[1]
    swap_at, split_at = index.clamp(max=n_swap - 1), (index - n_swap).clamp(min=0)
    src = source.gather(1, torch.where(is_swap, swap_at // width, split_at // donors)[:, None]).squeeze(1)
    dst = torch.where(is_swap, target.gather(1, (swap_at % width)[:, None]).squeeze(1),
                      donor.gather(1, (split_at % donors)[:, None]).squeeze(1))
    return gain, is_swap, src, dst


def needed_replica(load: torch.Tensor, phys2log: torch.Tensor, counts: torch.Tensor,
                   gpu_load: torch.Tensor, ref_counts: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """The replica each layer must move first: an expert on the most loaded GPU whose load per
    replica exceeds the reference's heaviest replica cannot fit the reference way, so it takes a slot of an
    expert that has more replicas than the reference gives it (one slot changes; the slot is on
    the most loaded GPU that holds the donor).

    Args:
        load: ``[L, E]``; phys2log: ``[L, P]``; counts: ``[L, E]``; gpu_load: ``[L, G]``;
        ref_counts: ``[L, E]`` the reference's replica counts.
    Returns:
        expert ``[L]`` (the one that gains a replica, -1 where none must) and slot ``[L]``.
    """
    layers, slots = phys2log.shape
    per_gpu = slots // gpu_load.shape[1]
    limit = (load / ref_counts).max(dim=1).values  # [L]
    hot = gpu_load.argmax(dim=1, keepdim=True) * per_gpu + torch.arange(per_gpu)  # [L, S]
    on_hot = phys2log.gather(1, hot)
    excess, at = ((load / counts).gather(1, on_hot) - limit[:, None]).max(dim=1)
    expert = on_hot.gather(1, at[:, None]).squeeze(1)
    spare = counts > ref_counts
    donor = torch.where(spare, load / (counts - 1).clamp(min=1), torch.full_like(load, float("inf")))
    donor_load, donor_expert = donor.min(dim=1)
    needed = (excess > limit * 1e-9) & (donor_load < float("inf")) & (donor_expert != expert)
    slot_gpu = torch.arange(slots) // per_gpu
    on = torch.where(phys2log == donor_expert[:, None], gpu_load[:, slot_gpu],
                     torch.full_like(phys2log, -1.0, dtype=torch.float64))
    return torch.where(needed, expert, torch.full_like(expert, -1)), on.argmax(dim=1)


def repair_chain(load: torch.Tensor, current: torch.Tensor, num_gpus: int, steps: int,
                 goal: float, ceiling: torch.Tensor,
                 ref_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local search from ``current``. At each step, every layer whose max GPU load is above its
    ``ceiling`` makes one change: the replica :func:`needed_replica` names if there is one, else
    :func:`best_moves`' change if it truly lowers the layer's max GPU load (or leaves fewer GPUs
    at that max); a layer with no such change stops. Stops after ``steps`` steps, when no layer
    changes, or once the last state's mean balancedness reaches ``goal``. Each step works on the
    layers still above their ceiling only.

    Args:
        load: ``[L, E]`` float64; current: ``[L, P]`` int64; num_gpus: ``G``;
        ceiling: ``[L]`` max GPU load at which a layer is done; ref_counts: ``[L, E]``.
    Returns:
        states ``[K + 1, L, P]`` (state 0 is ``current``), balancedness ``[K + 1, L]`` and slots
        changed against ``current`` ``[K + 1, L]``.
    """
    phys2log = current.clone()
    counts = counts_of(phys2log, load.shape[1])
    gpu_load = gpu_load_of(load, phys2log, counts, num_gpus)
    peak = gpu_load.max(dim=1).values
    live = peak > ceiling
    states, scores = [phys2log.clone()], [layer_balancedness(load, gpu_load)]
    for _ in range(steps):
        if float(scores[-1].mean()) >= goal or not bool(live.any()):
            break
        todo = live.nonzero().flatten()
        t_load, t_p2l, t_counts, t_gpu = load[todo], phys2log[todo], counts[todo], gpu_load[todo]
        t_peak = peak[todo]
        gain, is_swap, src, dst = best_moves(t_load, t_p2l, t_counts, t_gpu, ceiling[todo])
        grow, slot = needed_replica(t_load, t_p2l, t_counts, t_gpu, ref_counts[todo])
        forced = grow >= 0
        act = (gain > t_peak * 1e-9) | forced
        is_swap = is_swap & ~forced
        dst = torch.where(forced, slot, dst)
        a = t_p2l.gather(1, dst[:, None])  # [T, 1]
        b = torch.where(forced[:, None], grow[:, None], t_p2l.gather(1, src[:, None]))
        swap, split = (act & is_swap)[:, None], (act & ~is_swap)[:, None]
        new_p2l = t_p2l.scatter(1, src[:, None], torch.where(swap, a, t_p2l.gather(1, src[:, None])))
        new_p2l.scatter_(1, dst[:, None], torch.where(act[:, None], b, a))
        new_counts = t_counts.scatter_add(1, a, -split.long()).scatter_add_(1, b, split.long())
        new_load = gpu_load_of(t_load, new_p2l, new_counts, num_gpus)
        new_peak = new_load.max(dim=1).values
        # progress: a lower max, or as high a max on fewer GPUs (a twin of the hot GPU remains);
        # a forced replica may raise the max for a step
        fewer = (new_load >= t_peak[:, None]).sum(dim=1) < (t_gpu >= t_peak[:, None]).sum(dim=1)
        keep = act & (forced | (new_peak < t_peak) | ((new_peak <= t_peak) & fewer))
        done = todo[keep]
        phys2log[done], counts[done] = new_p2l[keep], new_counts[keep]
        gpu_load[done], peak[done] = new_load[keep], new_peak[keep]
        live[todo[~keep]] = False  # no change that helps (or the bound was loose): stop there
        live[done] = peak[done] > ceiling[done]
        score = scores[-1].clone()
        score[done] = layer_balancedness(load[done], new_load[keep])
        states.append(phys2log.clone())
        scores.append(score)
    stacked = torch.stack(states)
    return stacked, torch.stack(scores), (stacked != current).sum(dim=2)


def align_to_current(plan: torch.Tensor, current: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Renumber ``plan``'s GPUs and order each GPU's slots so that as many slots as possible keep
    their current expert. GPUs are matched greedily by shared experts (each plan GPU proposes to
    the current GPU it shares most with; a contested GPU takes the proposer sharing most; three
    rounds; the rest paired in order); within a GPU, experts that stay keep their slot. Shared
    experts are counted over (plan slot, current slot) pairs of the same expert, so the work
    grows with the slots, not with GPUs squared.

    Args:
        plan: ``[L, P]``; current: ``[L, P]``; num_gpus: ``G``.
    Returns:
        ``[L, P]``: the same GPU contents as ``plan``, GPUs permuted, slots reordered.
    """
    layers, slots = plan.shape
    per_gpu = slots // num_gpus
    plan_copy, cur_copy = copy_index(plan, num_gpus), copy_index(current, num_gpus)
    values, order = current.sort(dim=1, stable=True)
    left = torch.searchsorted(values, plan)  # [L, P]: current slots of each plan slot's expert
    right = torch.searchsorted(values, plan, right=True)
    width = max(1, int((right - left).max()))
    at = left[:, :, None] + torch.arange(width)  # [L, P, W]
    at_slot = order.gather(1, at.clamp(max=slots - 1).view(layers, -1)).view(at.shape)
    # the k-th copy of an expert on a plan GPU pairs with the k-th copy on a current GPU, so
    # a pair of GPUs shares the size of their multisets' intersection
    held = (at < right[:, :, None]) & (cur_copy.gather(1, at_slot.view(layers, -1)).view(at.shape)
                                       == plan_copy[:, :, None])
    plan_gpu = (torch.arange(slots) // per_gpu)[None, :, None]
    layer = torch.arange(layers)[:, None, None]
    key = ((layer * num_gpus + plan_gpu) * num_gpus + at_slot // per_gpu)[held]
    pair, shared = torch.unique(key, return_counts=True)  # (layer, plan GPU, current GPU), count
    plan_id, cur_id = pair // num_gpus, (pair // (num_gpus * num_gpus)) * num_gpus + pair % num_gpus
    # bids: more shared first, then the same GPU number, then the lower plan GPU, then the lower
    # current GPU; unique per plan GPU and per current GPU
    plan_gpu_id, cur_gpu_id = plan_id % num_gpus, pair % num_gpus
    bid = ((shared * 2 + (plan_gpu_id == cur_gpu_id).long()) * num_gpus
           + (num_gpus - 1 - plan_gpu_id)) * num_gpus + (num_gpus - 1 - cur_gpu_id)
    match = torch.full((layers * num_gpus,), -1, dtype=torch.int64)  # plan GPU -> current GPU
    taken = torch.zeros(layers * num_gpus, dtype=torch.bool)  # current GPU matched
    none = torch.full((layers * num_gpus,), -1, dtype=torch.int64)
    for _ in range(3):
        free = (match[plan_id] < 0) & ~taken[cur_id]
        if not bool(free.any()):
            break
        offer = torch.where(free, bid, -1)
        propose = free & (offer == none.scatter_reduce(0, plan_id, offer, "amax")[plan_id])
        offer = torch.where(propose, bid, -1)
        won = propose & (offer == none.scatter_reduce(0, cur_id, offer, "amax")[cur_id])
        match[plan_id[won]] = pair[won] % num_gpus
        taken[cur_id[won]] = True
    match, taken = match.view(layers, num_gpus), taken.view(layers, num_gpus)
    # pair the rest in order
    left_plan = (match < 0).to(torch.int8).argsort(dim=1, descending=True, stable=True)
    left_cur = (~taken).to(torch.int8).argsort(dim=1, descending=True, stable=True)
    first = torch.arange(num_gpus) < (match < 0).sum(dim=1, keepdim=True)  # [L, G]
    match.scatter_(1, left_plan, torch.where(first, left_cur, match.gather(1, left_plan)))
    # contents of plan GPU i go to current GPU match[i]
    contents = torch.empty(layers, num_gpus, per_gpu, dtype=plan.dtype)
    contents.scatter_(1, match[:, :, None].expand(-1, -1, per_gpu), plan.view(layers, num_gpus, per_gpu))
    return keep_slots(contents, current.view(layers, num_gpus, per_gpu)).view(layers, slots)


def copy_index(phys2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Which copy of its expert on its GPU each slot holds (0 for the first, 1 for a second...).

    ``phys2log: [L, P]`` -> ``[L, P]`` int64.
    """
    layers, slots = phys2log.shape
    on_gpu = phys2log.view(layers, num_gpus, -1)  # [L, G, S]
    same = on_gpu[:, :, :, None] == on_gpu[:, :, None, :]  # [L, G, S, S]
    earlier = torch.ones(same.shape[-1], same.shape[-1], dtype=torch.bool).tril(-1)
    return (same & earlier).sum(dim=3).view(layers, slots)


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
                     tolerance: float = DEFAULT_TOLERANCE, steps: int = DEFAULT_STEPS) -> torch.Tensor:
    """The stable policy (see the module docstring).

    Args:
        load: ``[L, E]`` expert loads over a window.
        num_physical: ``P``; num_gpus: ``G``, dividing ``P``.
        current: ``[L, P]`` the placement served now, or None: then the plan is the from-scratch
            reference (:func:`plan_from_scratch`) and ``max_moves`` does not apply.
        max_moves: at most this many slots change (0: no cap).
        tolerance: how far below the reference's mean balancedness the plan may stay.
        steps: local-search steps per layer.
    Returns:
        phys2log ``[L, P]`` int64 with every expert present in every layer. When the current
        placement already reaches the target it is returned unchanged (no slot moves).
    """
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
    states, scores, moves = repair_chain(load, current, num_gpus, steps, goal,
                                         ref_load.max(dim=1).values * (1 + SLACK), ref_counts)
    if float(scores[0].mean()) >= goal - 1e-12:  # (the slack absorbs summation-order rounding)
        return current.clone()
    layer_scores, layer_moves = scores.T.tolist(), moves.T.tolist()
    # layers whose chain stays above the ceiling
    short = (scores.max(dim=0).values * (1 + SLACK) < ref_score * (1 - 1e-9)).nonzero().flatten()
    aligned = None
    if float(scores.max(dim=0).values.mean()) < goal:  # offer the aligned reference there
        aligned = align_to_current(reference[short], current[short], num_gpus)
        for layer, moved in zip(short.tolist(), (aligned != current[short]).sum(dim=1).tolist()):
            layer_scores[layer].append(float(ref_score[layer]))
            layer_moves[layer].append(moved)
    chosen = torch.tensor(choose_states(layer_scores, layer_moves, goal * layers, max_moves))
    rows = torch.arange(layers)
    last = states.shape[0]
    out = states[chosen.clamp(max=last - 1), rows]
    if aligned is not None:
        use = chosen[short] == last
        out[short[use]] = aligned[use]
    return out
