"""The hook's driver over a real ZeroMQ socket, with the test playing the sidecar by hand:
hold at S until the outcome, the hold's time-out, copies at S, and a failing copy."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from eplb.paths import workers_endpoint
from eplb.placement.rules import default_placement, placement_hash
from eplb.proto import (Abort, Commit, Counts, Done, Hello, Heartbeat, OutcomeQuery, Plan, PlanAck,
                        Prepare, Promise,
                        Welcome, decode, encode)
from eplb.worker_hook import CopyFailed, HoldTimeout, HookError, WorkerHook

L, E, P = 3, 4, 8


class ScriptedSidecar:
    """A ROUTER on the hook's endpoint; the test sends and expects messages one by one."""

    def __init__(self, run_dir: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(workers_endpoint(run_dir))

    def expect(self, kind: type, timeout_s: float = 10.0, skip=(Heartbeat, Counts, OutcomeQuery)):
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {kind.__name__} within {timeout_s}s"
            if self.sock.poll(int(remaining * 1000)):
                identity, frame = self.sock.recv_multipart()
                msg = decode(frame)
                if isinstance(msg, skip):
                    continue
                assert isinstance(msg, kind), msg
                self.identity = identity
                return msg

    def send(self, msg) -> None:
        self.sock.send_multipart([self.identity, encode(msg)])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def new_placement() -> torch.Tensor:
    p = default_placement(L, E, P)
    p[1] = torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])  # only layer 1 changes
    return p


@pytest.fixture()
def side(tmp_path: Path):
    s = ScriptedSidecar(tmp_path)
    yield s
    s.close()


def join(side: ScriptedSidecar, tmp_path: Path, **kwargs) -> WorkerHook:
    hook = WorkerHook(0, 2, L, E, P, run_dir=tmp_path, heartbeat_s=0.05, **kwargs)
    hello = side.expect(Hello)
    assert hello.rank == 0 and torch.equal(hello.phys2log, default_placement(L, E, P))
    side.send(Welcome(rank=0, ok=True, error=""))
    hook.wait_joined(5)
    return hook


def promise_at(side: ScriptedSidecar, hook: WorkerHook, switch: int, epoch: int = 1) -> None:
    new = new_placement()
    side.send(Plan(epoch=epoch, phys2log=new, plan_hash=placement_hash(new), layers_per_chunk=1))
    assert side.expect(PlanAck).epoch == epoch
    side.send(Prepare(epoch=epoch, step=switch))
    assert side.expect(Promise).epoch == epoch


def test_hold_at_S_ends_with_the_commit_and_copies_then(side, tmp_path: Path) -> None:
    calls = []
    hook = join(side, tmp_path, copy_fn=lambda e, layers, old, new: calls.append((e, layers)))
    try:
        hook.on_step(1)
        promise_at(side, hook, switch=2)
        released = threading.Event()

        def decode_step() -> None:
            hook.on_step(2)  # holds: the outcome is not known yet
            released.set()

        t = threading.Thread(target=decode_step)
        t.start()
        assert not released.wait(0.3), "on_step(S) returned before the outcome was known"
        assert calls == []
        side.send(Commit(epoch=1, step=2))
        assert released.wait(5)
        t.join(5)
        assert calls == [(1, [1])]
        done = side.expect(Done)
        assert done.ok and done.epoch == 1 and done.hold_seconds >= 0.25
        assert torch.equal(hook.phys2log, new_placement())
    finally:
        hook.close()


def test_a_promised_rank_keeps_asking_for_the_outcome_and_a_late_commit_releases_it(
        side, tmp_path: Path) -> None:
    """The COMMIT was lost (say with a restarting sidecar): the promised rank asks for the outcome
    every heartbeat until the answer comes; a COMMIT it already finished is answered with the
    same DONE again."""
    calls = []
    hook = join(side, tmp_path, copy_fn=lambda e, layers, old, new: calls.append((e, layers)))
    try:
        hook.on_step(1)
        promise_at(side, hook, switch=2)
        for _ in range(3):  # heartbeat_s is 0.05: three questions come well within the timeout
            assert side.expect(OutcomeQuery, skip=(Heartbeat, Counts)) == OutcomeQuery(rank=0,
                                                                                        epoch=1)
        side.send(Commit(epoch=1, step=2))
        hook.on_step(2)
        assert calls == [(1, [1])]
        first = side.expect(Done)
        side.send(Commit(epoch=1, step=2))  # a restarted leader asks again
        again = side.expect(Done)
        assert again == first and first.ok
        assert calls == [(1, [1])], "a repeated COMMIT must not copy again"
    finally:
        hook.close()


def test_an_abort_answering_the_question_releases_the_hold_without_copies(
        side, tmp_path: Path) -> None:
    calls = []
    hook = join(side, tmp_path, copy_fn=lambda e, layers, old, new: calls.append((e, layers)))
    try:
        hook.on_step(1)
        promise_at(side, hook, switch=2)
        side.expect(OutcomeQuery, skip=(Heartbeat, Counts))
        side.send(Abort(epoch=1, reason="not on the leader's record"))
        hook.on_step(2)
        hook.on_step(3)
        assert calls == [] and torch.equal(hook.phys2log, default_placement(L, E, P))
        assert hook.state == "idle"
    finally:
        hook.close()


def test_hold_without_an_outcome_times_out_with_a_typed_error(side, tmp_path: Path) -> None:
    hook = join(side, tmp_path, copy_fn=lambda *a: None, hold_timeout_s=0.5)
    try:
        hook.on_step(1)
        promise_at(side, hook, switch=2)
        started = time.monotonic()
        with pytest.raises(HoldTimeout, match="epoch 1"):
            hook.on_step(2)
        assert 0.45 <= time.monotonic() - started < 5
        with pytest.raises(HoldTimeout):  # and it stays unusable
            hook.on_step(3)
    finally:
        hook.close()


def test_a_failing_copy_reports_done_error_and_stops_the_rank(side, tmp_path: Path) -> None:
    def broken(epoch, layers, old, new):
        raise RuntimeError("NCCL timeout talking to rank 1")

    hook = join(side, tmp_path, copy_fn=broken)
    try:
        hook.on_step(1)
        promise_at(side, hook, switch=3)
        side.send(Commit(epoch=1, step=3))
        hook.on_step(2)  # before S: runs as usual
        with pytest.raises(CopyFailed, match="epoch 1"):
            hook.on_step(3)
        done = side.expect(Done)
        assert not done.ok and "NCCL timeout" in done.error and "layers [1]" in done.error
        assert torch.equal(hook.phys2log, default_placement(L, E, P))  # maps never switched
        with pytest.raises(CopyFailed):
            hook.on_step(4)
    finally:
        hook.close()


def test_counts_reach_the_sidecar_as_deltas_over_step_ranges(side, tmp_path: Path) -> None:
    hook = join(side, tmp_path, flush_every=2)
    try:
        hook.on_step(0)
        hook.record(0, torch.tensor([[1, 1]]))
        hook.on_step(1)
        hook.record(2, torch.tensor([[3]]))
        hook.on_step(2)  # snapshot of steps [0, 2)
        hook.record(0, torch.tensor([[0]]))
        hook.on_step(3)
        hook.on_step(4)  # snapshot of steps [2, 4)
        first = side.expect(Counts, skip=(Heartbeat,))
        second = side.expect(Counts, skip=(Heartbeat,))
        assert (first.from_step, first.to_step) == (0, 2)
        assert first.counts[0].tolist() == [0, 2, 0, 0] and first.counts[2].tolist() == [0, 0, 0, 1]
        assert (second.from_step, second.to_step) == (2, 4)
        assert second.counts.sum() == 1 and second.counts[0, 0] == 1
    finally:
        hook.close()


def test_physical_counts_become_logical_under_the_placement_served_when_counted(
        side, tmp_path: Path) -> None:
    """Slot ids are turned into experts with the map of the steps they were counted in: the
    counts of the steps before a layer switches are cut off at that step and use the old map."""
    hook = join(side, tmp_path, flush_every=1000, count_ids="physical",
                copy_fn=lambda e, layers, old, new: None)
    old, new = default_placement(L, E, P), new_placement()
    slot = 3  # layer 1: expert old[1, 3] before the switch, new[1, 3] after it
    assert old[1, slot] != new[1, slot]
    try:
        hook.on_step(1)
        promise_at(side, hook, switch=3)
        side.send(Commit(epoch=1, step=3))
        hook.record(1, torch.tensor([[slot, -1], [slot, P]]))  # -1 and P: not counted
        hook.on_step(2)
        hook.record(1, torch.tensor([[slot]]))
        hook.on_step(3)  # layer 1 switches here: a snapshot of [0, 3) under the old map first
        before = side.expect(Counts, skip=(Heartbeat, OutcomeQuery))
        hook.record(1, torch.tensor([[slot, slot]]))
        for step in range(4, 1004):
            hook.on_step(step)
        after = side.expect(Counts, skip=(Heartbeat, OutcomeQuery, Done))
        assert (before.from_step, before.to_step) == (0, 3)
        assert before.counts.sum() == 3 and before.counts[1, old[1, slot]] == 3
        assert (after.from_step, after.to_step) == (3, 1003)
        assert after.counts.sum() == 2 and after.counts[1, new[1, slot]] == 2
    finally:
        hook.close()


class RecordingCopier:
    """A CopyEngine of pipeline depth 0 (each chunk copied in one call at its step) that
    prefetches: records the order of the calls the hook makes."""

    pipeline_depth = 0

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[int]]] = []

    def land(self, epoch, layers, old, new) -> None:
        self.calls.append(("copy", epoch, list(layers)))

    def start(self, epoch, layers, old, new) -> None:
        raise AssertionError("depth 0: start is never scheduled")

    def prefetch(self, epoch, layers, old, new) -> None:
        assert torch.equal(old, default_placement(L, E, P)) or layers == [2]
        self.calls.append(("prefetch", epoch, list(layers)))


def test_a_committed_epoch_prefetches_each_chunk_once_before_its_step(side, tmp_path) -> None:
    copier = RecordingCopier()
    committed = threading.Event()
    hook = join(side, tmp_path, copy_fn=copier,
                on_event=lambda msg: isinstance(msg, Commit) and committed.set())
    try:
        hook.on_step(1)
        new = default_placement(L, E, P)
        new[1] = torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])
        new[2] = torch.tensor([1, 0, 3, 2, 1, 0, 3, 2])  # two layers, one per chunk
        side.send(Plan(epoch=4, phys2log=new, plan_hash=placement_hash(new), layers_per_chunk=1))
        assert side.expect(PlanAck).epoch == 4
        side.send(Prepare(epoch=4, step=5))
        assert side.expect(Promise).epoch == 4
        hook.on_step(2)
        assert copier.calls == []  # promised, not committed: nothing is prepared yet
        side.send(Commit(epoch=4, step=5))
        assert committed.wait(5)
        for step in (3, 4):
            hook.on_step(step)
        assert copier.calls == [("prefetch", 4, [1])]
        hook.on_step(5)
        assert copier.calls[1:] == [("copy", 4, [1]), ("prefetch", 4, [2])]
        hook.on_step(6)
        hook.on_step(7)
        assert copier.calls[3:] == [("copy", 4, [2])]
        assert side.expect(Done).ok
        assert torch.equal(hook.phys2log, new)
    finally:
        hook.close()


class StartingCopier(RecordingCopier):
    """A CopyEngine of pipeline depth 1: starts a chunk's transfers a step ahead."""

    pipeline_depth = 1

    def start(self, epoch, layers, old, new) -> None:
        self.calls.append(("start", epoch, list(layers)))


def commit_epoch(side, committed: threading.Event, epoch: int, step: int,
                 layers: dict[int, list[int]]) -> torch.Tensor:
    """Plan (one layer per chunk), prepare and commit ``epoch`` with switch step ``step``, where
    the placement of each layer in ``layers`` becomes the given row; returns the new placement."""
    new = default_placement(L, E, P)
    for layer, row in layers.items():
        new[layer] = torch.tensor(row)
    side.send(Plan(epoch=epoch, phys2log=new, plan_hash=placement_hash(new), layers_per_chunk=1))
    assert side.expect(PlanAck).epoch == epoch
    side.send(Prepare(epoch=epoch, step=step))
    assert side.expect(Promise).epoch == epoch
    side.send(Commit(epoch=epoch, step=step))
    assert committed.wait(5)
    return new


TWO_LAYERS = {1: [3, 2, 1, 0, 0, 1, 2, 3], 2: [1, 0, 3, 2, 1, 0, 3, 2]}  # one chunk each


def test_a_copy_fn_with_start_sends_each_chunk_a_step_before_it_switches(side, tmp_path) -> None:
    copier = StartingCopier()
    committed = threading.Event()
    hook = join(side, tmp_path, copy_fn=copier,
                on_event=lambda msg: isinstance(msg, Commit) and committed.set())
    try:
        hook.on_step(1)
        old = default_placement(L, E, P)
        new = commit_epoch(side, committed, 4, 5, TWO_LAYERS)
        hook.on_step(3)
        assert copier.calls == [("prefetch", 4, [1])]
        hook.on_step(5)  # S: chunk 0 goes out; no layer switches yet
        assert copier.calls[1:] == [("start", 4, [1])]
        assert torch.equal(hook.phys2log, old)
        hook.on_step(6)  # chunk 0 lands and switches, chunk 1 goes out
        assert copier.calls[2:] == [("copy", 4, [1]), ("start", 4, [2])]
        assert torch.equal(hook.phys2log[1], new[1]) and torch.equal(hook.phys2log[2], old[2])
        hook.on_step(7)  # chunk 1 lands; the epoch is done
        assert copier.calls[4:] == [("copy", 4, [2])]
        done = side.expect(Done)
        assert done.ok and done.epoch == 4
        assert torch.equal(hook.phys2log, new)
        hook.on_step(8)
        assert len(copier.calls) == 5  # nothing more
    finally:
        hook.close()


class FailingStart(StartingCopier):
    def start(self, epoch, layers, old, new) -> None:
        raise RuntimeError("NCCL is gone")


def test_a_failed_start_marks_the_rank_unsafe_and_reports_done_error(side, tmp_path) -> None:
    committed = threading.Event()
    hook = join(side, tmp_path, copy_fn=FailingStart(),
                on_event=lambda msg: isinstance(msg, Commit) and committed.set())
    try:
        hook.on_step(1)
        commit_epoch(side, committed, 2, 3, {1: TWO_LAYERS[1]})
        with pytest.raises(CopyFailed, match="NCCL is gone"):
            hook.on_step(3)
        done = side.expect(Done)
        assert not done.ok and "NCCL is gone" in done.error
        with pytest.raises(CopyFailed):
            hook.on_step(4)
    finally:
        hook.close()


class PrefetchOnly:
    """The old duck type: a callable with an optional ``prefetch``, no CopyEngine."""

    def __call__(self, epoch, layers, old, new) -> None:
        pass

    def prefetch(self, epoch, layers, old, new) -> None:
        pass


def test_a_copy_fn_with_prefetch_but_no_copy_engine_is_refused_not_downgraded(tmp_path) -> None:
    """It would silently lose its prefetch (and start) otherwise."""
    with pytest.raises(TypeError, match="PrefetchOnly has prefetch but is no CopyEngine"):
        WorkerHook(0, 1, L, E, P, copy_fn=PrefetchOnly(), run_dir=tmp_path)


def test_a_refusal_for_now_is_followed_by_a_hello_about_each_second(side, tmp_path: Path) -> None:
    hook = WorkerHook(0, 2, L, E, P, run_dir=tmp_path, heartbeat_s=0.05)
    try:
        first = side.expect(Hello)
        identity = side.identity
        assert identity.startswith(b"0.%d." % os.getpid()) and len(identity) > 8  # rank.pid.nonce
        held = "rank 0 is held by another live connection (pid 1)"
        side.send(Welcome(rank=0, ok=False, error=held, retry=True))
        refused_at = time.monotonic()
        second = side.expect(Hello, timeout_s=5)
        assert 0.8 <= time.monotonic() - refused_at < 3 and second.pid == first.pid
        assert side.identity == identity  # the same connection asks again
        side.send(Welcome(rank=0, ok=False, error=held, retry=True))
        with pytest.raises(HookError, match=r"refused for 0.5s, asking each second: rank 0 is held"):
            hook.wait_joined(0.5)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(hook.wait_joined, 10)
            side.expect(Hello, timeout_s=5)  # waiting again asks again
            side.send(Welcome(rank=0, ok=True, error=""))
            waiting.result(10)
    finally:
        hook.close()
