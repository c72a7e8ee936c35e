"""Phase 5 of the ``stable`` policy: per layer, one state (the current placement, a point of the
repair chain, a repack, or the aligned reference) so that the mean balancedness reaches the target
with the fewest slots changed, optionally under a cap. Plain Python over a few options per layer.
"""

from __future__ import annotations

import heapq


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
