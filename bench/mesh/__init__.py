"""A mesh of real sidecars over real (user-space) latency: each node's ``eplb-sidecar`` and its
workers in a network namespace of their own, the followers reaching the leader through a relay
that adds delay, jitter and TCP-like loss. ``run.py`` is the script; see its docstring.

- :mod:`mesh.relay`: the latency relay (stdlib only; its docstring states the network model).
- :mod:`mesh.netns`: namespaces and veth pairs, links down and up, cleanup.
- :mod:`mesh.node`: one node's workers (WorkerHook threads, no-op copies) and their report.
- :mod:`mesh.cluster`: the processes in their namespaces, and ending them by pid.
- :mod:`mesh.scenarios`: the scenarios, their measurements and consistency checks.
"""
