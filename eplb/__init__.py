"""Expert-rebalance coordinator for expert-parallel MoE inference.

Sub-packages:
- :mod:`eplb.proto`: the msgpack wire protocol (messages, validation, tensors).
- :mod:`eplb.coordinator`: the per-node sidecar daemon, the leader's logic and the planner.
- :mod:`eplb.worker_hook`: what an engine rank imports: counting, hold/commit, copies.
"""

__version__ = "0.1.0"
