"""Placement math: pure tensor functions, no I/O, no state (DESIGN.md §3).

A placement is ``phys2log: [L, P]``: slot ``p`` of layer ``l`` holds logical expert
``phys2log[l, p]``; GPU ``g`` of ``G`` holds slots ``[g * P/G, (g + 1) * P/G)``.

- :mod:`.rules`: what a valid placement is (invariant I5), the default placement, its hash.
- :mod:`.load`: replicas per expert, load per GPU, balancedness (one function per quantity).
- :mod:`.planner`: :class:`~.planner.PlannerSpec`, :func:`~.planner.plan_placement`,
  :func:`~.planner.plan_rebalance` (the plan and whether it is worth carrying out).
- :mod:`.policy`: the policies (``stable``, ``greedy``, ``deepseek``) and the replica-count rule
  they share.
- :mod:`.copy_plan`: which expert weights move where when the placement changes.

Nothing here is imported from this package's ``__init__``: import the module that holds a name.
"""
