"""Placement policies: each maps loads ``[L, E]`` (and, for ``stable``, the placement served now)
to a new placement ``[L, P]``; :func:`eplb.placement.planner.plan_placement` picks one by name.

- :mod:`.replicate`: the replica-count rule they share (one more replica to the highest load per
  replica).
- :mod:`.greedy`: that rule, then a heap packing per layer (from scratch).
- :mod:`.deepseek`: DeepSeek's EPLB, hierarchical or global (from scratch).
- :mod:`.stable`: keeps the current placement where it can (the default).
"""
