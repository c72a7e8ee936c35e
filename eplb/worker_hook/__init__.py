"""What an engine rank imports: :class:`WorkerHook` counts expert selections, keeps the step
agreement's promise and runs the copies at the agreed step."""

from eplb.worker_hook.hook import CopyFailed, HoldTimeout, HookError, WorkerHook

__all__ = ["WorkerHook", "HookError", "HoldTimeout", "CopyFailed"]
