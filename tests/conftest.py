"""Shared fixtures: in-process workers driven by a decode-loop thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from eplb.worker_hook import WorkerHook


class DecodeLoop:
    """One thread stepping every hook in turn (each on_step may hold at S), recording a hot
    expert (``hot(step)``, expert 0 by default) so that plans differ from the default placement.
    Errors are kept for the test."""

    def __init__(self, hooks: list[WorkerHook], hot: Callable[[int], int] = lambda step: 0) -> None:
        self.hooks = hooks
        self.hot = hot
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        step = 0
        try:
            while not self._stop.is_set():
                hot = self.hot(step)
                for hook in self.hooks:
                    hook.on_step(step)
                    hook.record(0, torch.tensor([[hot, hot, hot, 1]]))
                step += 1
                self._stop.wait(0.002)
        except Exception as exc:
            self.errors.append(exc)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture()
def decode_loop() -> Callable[[list[WorkerHook]], DecodeLoop]:
    """``decode_loop(hooks)`` starts a DecodeLoop; it and the hooks stop at teardown."""
    loops: list[DecodeLoop] = []

    def start(hooks: list[WorkerHook], **kwargs) -> DecodeLoop:
        loop = DecodeLoop(hooks, **kwargs)
        loops.append(loop)
        loop.start()
        return loop

    yield start
    for loop in loops:
        loop.stop()
        for hook in loop.hooks:
            hook.close()
