"""Replica counts: one replica per expert, then one more at a time to the expert with the highest
load per replica. Every policy (greedy, deepseek, and stable's reference plan) uses this rule.

DeepSeek's ``replicate_experts`` gives the ``P - E`` extras in ``P - E`` sequential steps. Here
the same extras, in the same order, come from one top-k: the ``m``-th extra of expert ``e`` is
given when ``load[e] / m`` is the highest load per replica left, so the extras are the ``P - E``
largest keys ``load[e] / m`` (``m >= 1``), ties going to the lower expert (as ``argmax`` does
step by step), and their order is the order the sequential steps give them in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Replicas(NamedTuple):
    """The result of :func:`replicate_heaviest`, for ``X`` rows of ``n`` experts.

    extra: ``[X, P - n]`` int64, the expert of each extra replica in the order given (DeepSeek's
    ``phy2log[:, n:]``); copy: ``[X, P - n]`` int64, which copy of its expert each extra is (1 for
    the second replica, DeepSeek's ``replica_rank[:, n:]``); counts: ``[X, n]`` int64 replicas per
    expert, rows summing to ``P``.
    """

    extra: torch.Tensor
    copy: torch.Tensor
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
        return Replicas(empty, empty.clone(), counts)
    depth = extra  # the most extras one expert may get
    if extra > experts:  # every expert is a candidate
        candidates = torch.arange(experts).expand(rows, -1)
    else:
        # Only the ``extra`` heaviest experts (ties: the lower first) can get one: each of them
        # offers a key (its load) at least as large as any other expert's. Neither can an expert
        # get more extras than the heaviest load over the ``extra``-th heaviest allows.
        by_load = load.argsort(dim=1, descending=True, stable=True)[:, :extra]
        heavy = load.gather(1, by_load)
        kth = heavy[:, -1].double()
        if bool((kth > 0).all()):
            ratio = float((heavy[:, 0].double() / kth).max())
            if math.isfinite(ratio):  # (+ 2: the keys are rounded in load's dtype)
                depth = min(extra, int(ratio) + 2)
        candidates = by_load.sort(dim=1).values  # in expert order: flat order breaks ties
    divisor = torch.arange(1, depth + 1, dtype=load.dtype)
    keys = (load.gather(1, candidates)[:, :, None] / divisor).flatten(1)  # [X, C * depth]
    picked = top_keys(keys, extra)  # [X, extra] flat indices, in the order given
    expert = candidates.gather(1, torch.div(picked, depth, rounding_mode="floor"))
    copy = picked % depth + 1
    counts.scatter_add_(1, expert, torch.ones_like(expert))
    return Replicas(expert, copy, counts)


def top_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest keys of each row, largest first, ties by lower index (a stable
    descending sort's first ``k``), from one top-k.

    Args:
        keys: ``[X, N]`` floats; k: ``<= N``.
    Returns:
        ``[X, k]`` int64 column indices.
    """
    values = keys.topk(k, dim=1).values
    boundary = values[:, -1:]  # [X, 1] the k-th largest value
    above = keys > boundary  # all taken
    tied = keys == boundary  # the lowest-index ones taken until k
    room = k - above.sum(dim=1, keepdim=True)
    take = above | (tied & (tied.cumsum(dim=1) <= room))
    index = take.nonzero()[:, 1].view(keys.shape[0], k)  # in column order
    order = keys.gather(1, index).argsort(dim=1, descending=True, stable=True)
    return index.gather(1, order)
