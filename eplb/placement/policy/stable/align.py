"""Phase 4 of the ``stable`` policy, second option: the reference plan aligned to the current
placement.

A from-scratch plan numbers its GPUs and orders their slots arbitrarily; served as is it would move
nearly every slot. :func:`match_gpus` renumbers its GPUs to match the current GPUs they share most
experts with, and :func:`keep_slots` keeps the experts that stay on a GPU in their old slots, so
only the slots whose expert really changes are copied.
"""

from __future__ import annotations

import functools

import torch

from eplb.placement.load import replica_counts


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
    held_by = replica_counts(current, slots)
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
