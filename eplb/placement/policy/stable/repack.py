"""Phase 4 of the ``stable`` policy, first option: targeted repacking, which brings every GPU of a
layer under a ceiling by changing few slots.

The repair chain (:mod:`.chain`) fixes one hot GPU per step, which suits a drift that disturbs a
few experts. When many experts' loads move a little at once (sampling noise, a slow trend), dozens
of GPUs of a layer are over the ceiling at the same time, and the chain runs out of steps or
cycles. :func:`repack_layer` treats those layers as a
whole instead:

1. **Replica counts.** Each expert gets at least the replicas it needs for its load per replica
   to stay within ``limit``; otherwise an expert keeps its current count, and where that leaves
   more than ``P`` replicas, those whose removal raises the load per replica least are removed.
   Removed replicas leave holes (taken on the most loaded GPUs); added ones join a pool.
2. **Evict.** Each GPU still over the ceiling gives up one replica, the lightest whose removal
   brings it under (else its heaviest, and again): into the pool, leaving a hole.
3. **Place.** Pool replicas, heaviest first, each into the hole that fits it most tightly (a GPU
   never takes a second copy of an expert); where none fits, into the slot of a lighter replica
   ``y`` on a GPU with room for it once ``y`` leaves, ``y`` taking a hole that fits it (a swap);
   where no hole fits ``y`` either, ``y`` goes back to the pool (at most ``DISPLACEMENTS + P / 32`` times,
   then the layer is given up).

Every slot that is not a hole keeps its expert, so the changes are the holes refilled with other
experts. Plain Python on one layer at a time: it runs only for the layers the chain cannot fix.
"""

from __future__ import annotations

import bisect
import heapq

import torch

#: Displacements (a replica sent back to the pool) allowed per layer: ``DISPLACEMENTS + P // 32``.
#: (Layers that were repacked at 144 GPUs on the benchmark's noise drift needed at most 7; a layer
#: that runs out is given up, which costs far more time the longer it runs.)
DISPLACEMENTS = 8


def repack_layers(load: torch.Tensor, current: torch.Tensor, max_pool: dict[int, int],
                  num_gpus: int, ceiling: torch.Tensor, limit: torch.Tensor) -> dict[int, torch.Tensor]:
    """:func:`repack_layer` for the listed layers.

    Args:
        load: ``[L, E]`` float64; current: ``[L, P]`` int64; max_pool: ``{layer: its max_pool}``
        for the layers to repack; ceiling: ``[L]`` the highest GPU load allowed per layer;
        limit: ``[L]`` the highest load per replica allowed per layer.
    Returns:
        ``{layer: [P] int64 placement}`` for the layers where a placement was found.
    """
    found = {}
    for layer, most in max_pool.items():
        plan = repack_layer(load[layer].tolist(), current[layer].tolist(), num_gpus,
                            float(ceiling[layer]), float(limit[layer]), most)
        if plan is not None:
            found[layer] = torch.tensor(plan, dtype=torch.int64)
    return found


def repack_layer(load: list[float], current: list[int], num_gpus: int, ceiling: float,
                 limit: float, max_pool: int | None = None) -> list[int] | None:
    """One layer's placement with every GPU load at most ``ceiling``, or None if not found.

    Args:
        load: ``E`` expert loads (>= 0).
        current: ``P`` the expert of each slot now (GPU ``g`` holds slots ``g*S .. g*S+S-1``).
        num_gpus: ``G``, dividing ``P``.
        ceiling: the highest GPU load allowed.
        limit: the highest load per replica allowed (``<= ceiling``).
        max_pool: give up (None) when more replicas than this must be placed again (each
            usually changes a slot), before the costly part.
    Returns:
        ``P`` experts, every expert present; the slots not changed keep ``current``'s expert.
    """
    slots = len(current)
    experts = len(load)
    per_gpu = slots // num_gpus
    counts = [0] * experts
    for e in current:
        counts[e] += 1
    want = counts_within_limit(load, counts, slots, limit)
    if want is None:
        return None
    share = [load[e] / want[e] for e in range(experts)]
    plan = list(current)
    gpu_load = [0.0] * num_gpus
    for s, e in enumerate(plan):
        gpu_load[s // per_gpu] += share[e]
    holes: list[int] = []
    pool: list[int] = []
    # 1. replica counts: drop surplus replicas from the most loaded GPUs, list the missing ones
    surplus = [counts[e] - want[e] for e in range(experts)]
    for s in sorted(range(slots), key=lambda s: -gpu_load[s // per_gpu]):
        e = plan[s]
        if surplus[e] > 0:
            surplus[e] -= 1
            vacate(plan, gpu_load, holes, s, share[e], per_gpu)
    for e in range(experts):
        pool.extend([e] * max(0, -surplus[e]))
    # 2. evict from GPUs over the ceiling
    for g in range(num_gpus):
        while gpu_load[g] > ceiling:
            mine = [s for s in range(g * per_gpu, (g + 1) * per_gpu) if plan[s] >= 0]
            if not mine:
                return None
            over = gpu_load[g] - ceiling
            enough = [s for s in mine if share[plan[s]] >= over]
            s = (min(enough, key=lambda s: share[plan[s]]) if enough
                 else max(mine, key=lambda s: share[plan[s]]))
            pool.append(plan[s])
            vacate(plan, gpu_load, holes, s, share[plan[s]], per_gpu)
    if max_pool is not None and len(pool) > max_pool:
        return None
    # 3. place the pool, heaviest first
    heap = [(-share[e], e) for e in pool]
    heapq.heapify(heap)
    budget = DISPLACEMENTS + slots // 32  # displacements allowed before giving up
    while heap:
        _, e = heapq.heappop(heap)
        x = share[e]
        hole = tightest_hole(plan, gpu_load, holes, e, x, ceiling, per_gpu, current)
        if hole is not None:
            fill(plan, gpu_load, holes, hole, e, x, per_gpu)
            continue
        swap = swap_for(plan, gpu_load, holes, share, e, x, ceiling, per_gpu)
        if swap is not None:
            at, hole = swap
            y = plan[at]
            vacate(plan, gpu_load, holes, at, share[y], per_gpu)
            fill(plan, gpu_load, holes, at, e, x, per_gpu)
            fill(plan, gpu_load, holes, hole, y, share[y], per_gpu)
            continue
        at = displace_for(plan, gpu_load, share, e, x, ceiling, per_gpu)
        budget -= 1
        if at is None or budget < 0 or not holes:
            return None
        # x takes the slot of a lighter replica y, which goes back to the pool in its place
        y = plan[at]
        plan[at] = e
        gpu_load[at // per_gpu] += x - share[y]
        heapq.heappush(heap, (-share[y], y))
    return plan


def counts_within_limit(load: list[float], counts: list[int], slots: int,
                        limit: float) -> list[int] | None:
    """Replica counts close to ``counts`` with every load per replica at most ``limit``.

    Each expert needs ``ceil(load / limit)`` replicas (at least 1); it keeps more if it has them,
    and while the total is over ``slots`` the replica whose removal leaves the lowest load per
    replica is removed. None if the needed replicas alone exceed ``slots``.
    """
    need = [max(1, needed(w, limit)) for w in load]
    want = [max(n, c) for n, c in zip(need, counts)]
    extra = sum(want) - slots
    if sum(need) > slots:
        return None
    heap = [(load[e] / (want[e] - 1), e) for e in range(len(load)) if want[e] > need[e]]
    heapq.heapify(heap)
    while extra > 0:
        _, e = heapq.heappop(heap)
        want[e] -= 1
        extra -= 1
        if want[e] > need[e]:
            heapq.heappush(heap, (load[e] / (want[e] - 1), e))
    return want


def needed(weight: float, limit: float) -> int:
    """The fewest replicas ``c`` with ``weight / c <= limit`` (float division, as the metric)."""
    if weight <= 0:
        return 1
    if limit <= 0:
        return 1 << 30
    c = max(1, int(weight // limit))
    while weight / c > limit:
        c += 1
    while c > 1 and weight / (c - 1) <= limit:
        c -= 1
    return c


def vacate(plan: list[int], gpu_load: list[float], holes: list[int], s: int, x: float,
           per_gpu: int) -> None:
    """Empty slot ``s`` (its replica weighs ``x``)."""
    plan[s] = -1
    gpu_load[s // per_gpu] -= x
    holes.append(s)


def fill(plan: list[int], gpu_load: list[float], holes: list[int], s: int, e: int, x: float,
         per_gpu: int) -> None:
    """Put expert ``e`` (a replica weighing ``x``) into hole ``s``."""
    holes.remove(s)
    plan[s] = e
    gpu_load[s // per_gpu] += x


def holds(plan: list[int], g: int, e: int, per_gpu: int) -> bool:
    """Whether GPU ``g`` already holds a replica of ``e``."""
    return e in plan[g * per_gpu:(g + 1) * per_gpu]


def tightest_hole(plan: list[int], gpu_load: list[float], holes: list[int], e: int, x: float,
                  ceiling: float, per_gpu: int, current: list[int]) -> int | None:
    """The hole whose GPU has the least room that still takes ``x`` (a hole that held ``e``
    before is taken first: refilling it changes nothing)."""
    best, room_best = None, float("inf")
    for s in holes:
        g = s // per_gpu
        room = ceiling - gpu_load[g] - x
        if room < 0 or holds(plan, g, e, per_gpu):
            continue
        if current[s] == e:
            return s
        if room < room_best:
            best, room_best = s, room
    return best


def displace_for(plan: list[int], gpu_load: list[float], share: list[float], e: int, x: float,
                 ceiling: float, per_gpu: int) -> int | None:
    """The slot of the lightest replica ``y`` lighter than ``x`` whose GPU takes ``x`` once ``y``
    leaves (and holds no ``e``), or None."""
    best, y_best = None, float("inf")
    for at, y in enumerate(plan):
        if y < 0:
            continue
        y_share = share[y]
        if y_share >= x or y_share >= y_best:
            continue
        g = at // per_gpu
        if ceiling - gpu_load[g] + y_share - x >= 0 and not holds(plan, g, e, per_gpu):
            best, y_best = at, y_share
    return best


def swap_for(plan: list[int], gpu_load: list[float], holes: list[int], share: list[float], e: int,
             x: float, ceiling: float, per_gpu: int) -> tuple[int, int] | None:
    """A slot ``at`` whose replica ``y`` can make way for ``x`` and a hole that takes ``y``:
    the pair leaving the least room on ``at``'s GPU, or None."""
    rooms = sorted((ceiling - gpu_load[s // per_gpu], s) for s in holes)
    room_values = [room for room, _ in rooms]
    widest = room_values[-1] if rooms else -1.0
    best, room_best = None, float("inf")
    for at, y in enumerate(plan):
        if y < 0:
            continue
        y_share = share[y]
        if y_share >= x or y_share > widest:
            continue
        g = at // per_gpu
        room = ceiling - gpu_load[g] + y_share - x
        if room < 0 or room >= room_best or holds(plan, g, e, per_gpu):
            continue
        for k in range(bisect.bisect_left(room_values, y_share), len(rooms)):
            hole = rooms[k][1]
            h = hole // per_gpu
            if h != g and not holds(plan, h, y, per_gpu):
                best, room_best = (at, hole), room
                break
    return best
