"""The ``stable`` placement policy: balance as well as a from-scratch plan, moving few experts.

Pure, layer-vectorized tensor functions. With loads ``w: [L, E]``, the current placement
``current: [L, P]`` and ``G`` GPUs of ``S = P / G`` slots:

1. **Reference** (:mod:`.reference`). Plan from scratch (replica counts by highest load per
   replica, then replicas heaviest first, each to the lightest GPU with room; the global form of
   the ``deepseek`` policy) and note its balancedness per layer, ``b_ref: [L]``, and its max GPU
   load per layer. The target is ``mean(b_ref) - tolerance`` (balancedness as
   :func:`eplb.placement.load.overall_balancedness`: mean GPU load / max, averaged over layers).
2. **Keep** (:mod:`.plan`). If the current placement already reaches the target, it is the plan (no
   move).
3. **Repair chain** (:mod:`.chain`). A local search from the current placement, one change per
   layer and step, in every layer whose max GPU load is above the reference's (times ``1 +
   SLACK``): first give a replica to an expert of the hottest GPU that is heavier per replica than
   any replica of the reference, taking the slot of an expert that has more replicas than the
   reference gives it (1 slot); otherwise swap a slot of the hottest GPU with a slot of a light GPU
   (2 slots), or turn a spare replica elsewhere into one more replica of an expert of the hottest
   GPU (1 slot), preferring changes that bring every GPU they touch under the ceiling. A change
   costs the slots it changes net of the chain's earlier changes (a swap with a slot the chain
   already changed costs 1, so two steps can close a 3-cycle that fixes two hot GPUs with 3 slots).
   With at most ``ALL_TARGETS_UP_TO`` slots per GPU a swap may land on any GPU. Each change is
   checked exactly; every state keeps every expert present. Each layer gets a chain of valid
   states.
4. **Fallback** (:mod:`.repack`, :mod:`.align`). Where a chain stops short (typically when many
   experts' loads moved a little at once, leaving dozens of GPUs over the ceiling), two more
   options for that layer: a targeted repack (replica counts within the reference's heaviest
   replica, an eviction from each GPU over the ceiling, the evicted replicas placed back by best
   fit or a swap; offered where it changes at most ``REPACK_AT_MOST`` of what the next option
   changes), and the reference plan itself, aligned to the current placement (its GPUs matched to
   the current GPUs by shared experts, experts kept in their old slots within a GPU).
5. **Choice** (:mod:`.choice`). Per layer, pick one state (current, a point of the chain, or the
   aligned reference) so that the mean balancedness reaches the target with the fewest slots
   changed: increments taken in order of balancedness gained per slot moved, never more than
   ``max_moves`` slots changed in total when a cap is given (then the target may be missed).

"Moved" means a slot whose logical expert changes (``phys2log != current``).

:mod:`.plan` puts the phases together (:func:`~.plan.rebalance_stable`, what the planner calls).
"""
