"""Replica counts: one replica per expert, then one more at a time to the expert with the highest
load per replica. Every policy (greedy, deepseek, and stable's reference plan) uses this rule.

DeepSeek's ``replicate_experts`` gives the ``P - E`` extras in ``P - E`` sequential steps. Here
the same extras, in the same order, come from one top-k: the ``m``-th extra of expert ``e`` is
given when ``load[e] / m`` is the highest load per replica left, so the extras are the ``P - E``
largest keys ``load[e] / m`` (``m >= 1``) in order, equal keys going to the lower expert (as
``argmax`` does step by step; a sort settles ties, only where there are any).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch


class Replicas(NamedTuple):
    """The result of :func:`replicate_heaviest`, for ``X`` rows of ``n`` experts.

    extra: ``[X, P - n]`` int64, the expert of each extra replica in the order given (DeepSeek's
    ``phy2log[:, n:]``); counts: ``[X, n]`` int64 replicas per expert, rows summing to ``P``.
    """

    extra: torch.Tensor
    counts: torch.Tensor


def replicate_heaviest(load: torch.Tensor, num_physical: int) -> Replicas:
    """Give ``num_physical - n`` extra replicas, one at a time, to the expert with the highest load
    per replica (the lowest expert on ties).

    Args:
        load: ``[X, n]`` non-negative floating-point loads; the keys ``load / m`` are computed in
            its dtype (the caller picks float32 or float64).
        num_physical: ``P >= n`` replicas per row.
    Returns:
        the :class:`Replicas`.
    """
    rows, experts = load.shape
    extra = num_physical - experts
    if extra < 0:
        raise ValueError(f"{num_physical} replicas cannot hold {experts} experts")
    counts = torch.ones(rows, experts, dtype=torch.int64)
    if extra == 0:
        empty = torch.empty(rows, 0, dtype=torch.int64)
        return Replicas(empty, counts)
    depth = extra  # the most extras one expert may get
    if extra >= experts:  # every expert is a candidate
        candidates = torch.arange(experts).expand(rows, -1)
        heavy = load
    else:
        # Only the ``extra`` heaviest experts (ties: the lower first) can get one: each of them
        # offers a key (its load) at least as large as any other expert's. Neither can an expert
        # get more extras than the heaviest load over the ``extra``-th heaviest allows.
        heavy, candidates = load.topk(extra + 1, dim=1)  # [X, extra + 1] (one more: to see a tie)
        if bool((heavy[:, extra] == heavy[:, extra - 1]).any()):  # a tie at the boundary:
            candidates = load.argsort(dim=1, descending=True, stable=True)  # the lower expert first
        heavy, candidates = heavy[:, :extra], candidates[:, :extra]  # heaviest first
        kth = heavy[:, -1].double()
        if bool((kth > 0).all()):
            ratio = float((heavy[:, 0].double() / kth).max())
            if math.isfinite(ratio):  # (+ 2: the keys are rounded in load's dtype)
                depth = min(extra, int(ratio) + 2)
    divisor = torch.arange(1, depth + 1, dtype=load.dtype)
    keys = (heavy[:, :, None] / divisor).flatten(1)  # [X, C * depth]: candidate c, depth m
    # (candidates heaviest first: top-k is fastest on keys nearly in order)
    picked = top_keys(keys, extra, lambda: (candidates[:, :, None] * depth
                                            + torch.arange(depth)).flatten(1))
    expert = candidates.gather(1, torch.div(picked, depth, rounding_mode="floor"))
    counts.scatter_add_(1, expert, torch.ones_like(expert))
    return Replicas(expert, counts)


def top_keys(keys: torch.Tensor, k: int, tiebreak: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The ``k`` largest keys of each row, largest first, equal keys by ``tiebreak`` (lower
    first): one top-k, and only where keys tie, a sort.

    Args:
        keys: ``[X, N]`` floats; k: ``<= N``.
        tiebreak: makes ``[X, N]`` int64, distinct within a row (called only on a tie).
    Returns:
        ``[X, k]`` int64 column indices.
    """
    if k < keys.shape[1]:  # one more than k: a tie at the boundary shows
        values, index = keys.topk(k + 1, dim=1)  # largest first, ties in no particular order
    else:
        values, index = keys.sort(dim=1, descending=True)
    if not bool((values[:, 1:] == values[:, :-1]).any()):
        return index[:, :k]  # no two keys tie: top-k's order is the one
    by_tiebreak = tiebreak().argsort(dim=1)
    ordered = keys.gather(1, by_tiebreak).argsort(dim=1, descending=True, stable=True)[:, :k]
    return by_tiebreak.gather(1, ordered)
