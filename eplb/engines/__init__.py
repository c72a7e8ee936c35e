"""Adapters that plug :class:`~eplb.worker_hook.WorkerHook` into real serving engines.

Each adapter takes the engine's own objects (its expert weights, its routing maps, its process
groups), counts what the engine routes, copies weights with a
:class:`~eplb.worker_hook.copy_exec.CopyExecutor` and updates the engine's maps in place, layer by
layer, at the step each layer's weights land. :mod:`eplb.engines.base` holds what they share.
"""
