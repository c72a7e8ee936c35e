"""Invariant I3: the decode-loop calls of the hook make no socket call and run no collective on
the calling thread. Checked with a profiler attached to that thread only (sys.setprofile), over
real calls that include the counter snapshots handed to the background thread."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import zmq

from eplb.worker_hook import WorkerHook

FORBIDDEN_FILES = ("/zmq/", "/torch/distributed/", "/socket.py", "/selectors.py")
FORBIDDEN_C_MODULES = ("zmq", "_socket", "select", "torch.distributed", "torch._C._distributed")


class CallRecorder:
    """Collects every Python and C function the profiled thread enters."""

    def __init__(self) -> None:
        self.python: list[str] = []
        self.c: list[str] = []

    def __call__(self, frame, event, arg) -> None:
        if event == "call":
            self.python.append(frame.f_code.co_filename + ":" + frame.f_code.co_name)
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            module = getattr(arg, "__module__", None) or type(owner).__module__ or ""
            self.c.append(f"{module}.{getattr(arg, '__qualname__', arg)}")

    def violations(self) -> list[str]:
        bad = [p for p in self.python if any(f in p for f in FORBIDDEN_FILES)]
        bad += [c for c in self.c if c.startswith(FORBIDDEN_C_MODULES)]
        return bad


def profiled(fn) -> CallRecorder:
    recorder = CallRecorder()
    sys.setprofile(recorder)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return recorder


def decode_loop(hook: WorkerHook, steps: int, layers: int, experts: int) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(experts, (64, 8), generator=gen) for _ in range(layers)]
    for step in range(steps):
        hook.on_step(step)
        for layer in range(layers):
            hook.record(layer, ids[layer])


def test_per_step_calls_make_no_socket_call_and_no_collective(tmp_path: Path) -> None:
    hook = WorkerHook(0, 2, 4, 16, 24, run_dir=tmp_path, flush_every=4)
    try:
        recorder = profiled(lambda: decode_loop(hook, steps=50, layers=4, experts=16))
        assert len(recorder.c) > 100  # the profiler did see the calls
        assert any("index_add_" in c for c in recorder.c)
        assert recorder.violations() == []
        # Snapshots really were taken on this path (4 buffers, so at least 4 of them, whatever the
        # socket thread's pace).
        assert hook._flushed_at >= 16
    finally:
        hook.close()


def test_the_check_catches_a_socket_call_and_a_collective(tmp_path: Path) -> None:
    """The detector itself must be able to fail."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{tmp_path}/nobody.sock")
    try:
        recorder = profiled(lambda: sock.send(b"x", zmq.NOBLOCK))
        assert recorder.violations(), recorder.c
        recorder = profiled(dist.is_initialized)
        assert recorder.violations(), recorder.python
    finally:
        sock.close()
        ctx.term()


def test_counts_recorded_on_the_hot_path_match_what_was_routed(tmp_path: Path) -> None:
    hook = WorkerHook(0, 1, 2, 5, 5, run_dir=tmp_path)
    try:
        hook.record(0, torch.tensor([[0, 1], [1, 4]]))
        hook.record(1, torch.tensor([[3, 3, 3]]))
        hook.add_counts(torch.ones(2, 5, dtype=torch.int64))
        assert hook.counters().tolist() == [[2, 3, 1, 1, 2], [1, 1, 1, 4, 1]]
    finally:
        hook.close()


def test_padding_out_of_range_ids_and_rows_past_num_valid_are_not_counted(tmp_path) -> None:
    hook = WorkerHook(0, 1, 1, 4, 6, run_dir=tmp_path, count_ids="physical")
    try:
        ids = torch.tensor([[0, 5], [-1, 2], [6, -7], [1, 1]], dtype=torch.int32)
        hook.record(0, ids)  # counts 0, 5, 2, 1, 1
        hook.record(0, ids, num_valid=torch.tensor(2))  # rows 0 and 1: 0, 5, 2
        hook.record(0, ids[:, 0], num_valid=torch.tensor(0))  # nothing
        assert hook.counters()[0].tolist() == [2, 2, 2, 0, 0, 2]
    finally:
        hook.close()


def tensors_of(hook: WorkerHook) -> dict[str, int]:
    return {name: value.data_ptr() for name, value in vars(hook).items()
            if isinstance(value, torch.Tensor)}


def test_record_never_replaces_a_buffer_so_captured_graphs_stay_valid(tmp_path: Path) -> None:
    """A CUDA graph captured around record() reads the hook's buffers by address: a call with
    more ids than any before (a prefill) must not allocate a new one in their place."""
    hook = WorkerHook(0, 1, 2, 8, 8, run_dir=tmp_path)
    try:
        hook.record(0, torch.tensor([[1, 2]]))
        before = tensors_of(hook)
        assert {"_counts", "_one"} <= before.keys()
        hook.record(1, torch.randint(0, 8, (32_768, 8)))
        hook.record(0, torch.randint(0, 8, (65_536,)), num_valid=torch.tensor(10))
        assert tensors_of(hook) == before
        assert hook.counters()[1].sum() == 32_768 * 8 and hook.counters()[0].sum() == 12
    finally:
        hook.close()
