"""The copy executor on real processes over gloo (CPU), checked bit for bit.

Each spawned run starts one process per rank, forms one gloo group over TCP on 127.0.0.1 and runs
many cases in it. Every child reports to the parent through a queue; the parent waits with a
deadline and fails on any error, missing report, bad exit code or hang (and kills what is left).
"""

from __future__ import annotations

import queue
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.placement.rules import validate_placement
from eplb.worker_hook.copy_exec import CopyError, CopyExecutor
from eplb.placement.copy_plan import changed_layers, chunk_layers, plan_copies

RUN_DEADLINE_S = 90.0  # a whole spawned run, start-up included; far above the normal few seconds

# Weight tensors of one expert: (shape without the slot dim, dtype, integer view for bit checks).
TENSORS = [((3, 5), torch.float32, torch.int32), ((7,), torch.bfloat16, torch.int16),
           ((4,), torch.int8, torch.int8)]


# --- weights ---------------------------------------------------------------------------------

def expert_weights(layer: int, expert: int) -> list[torch.Tensor]:
    """The tensors of ``expert`` in ``layer``: values that name both, plus a per-element pattern
    (float32 ``[3, 5]``, raw random bits as bfloat16 ``[7]`` (NaNs included), int8 ``[4]``)."""
    gen = torch.Generator().manual_seed(layer * 100_003 + expert)
    f32 = ((layer * 1000 + expert) * 16 + torch.arange(15, dtype=torch.float32)).reshape(3, 5)
    bf16 = torch.randint(-32768, 32768, (7,), generator=gen, dtype=torch.int32).to(
        torch.int16).view(torch.bfloat16)
    i8 = torch.randint(-128, 128, (4,), generator=gen, dtype=torch.int32).to(torch.int8)
    return [f32, bf16, i8]


def make_weights(row_major: torch.Tensor, rank: int, num_gpus: int) -> list[list[torch.Tensor]]:
    """This rank's ``weights[l][k]`` (``[S, ...]``) filled from placement ``[L, P]``.

    The bfloat16 tensor is a transposed view, so its slots are strided (not contiguous).
    """
    layers, physical = row_major.shape
    slots = physical // num_gpus
    weights = []
    for layer in range(layers):
        f32 = torch.empty(slots, 3, 5, dtype=torch.float32)
        bf16 = torch.empty(7, slots, dtype=torch.bfloat16).t()
        i8 = torch.empty(slots, 4, dtype=torch.int8)
        for local in range(slots):
            expert = int(row_major[layer, rank * slots + local])
            for tensor, value in zip((f32, bf16, i8), expert_weights(layer, expert)):
                tensor[local].copy_(value)
        weights.append([f32, bf16, i8])
    return weights


def mismatches(weights: list[list[torch.Tensor]], placement: torch.Tensor, rank: int,
               num_gpus: int) -> list[str]:
    """Slots whose bits differ from the expert ``placement`` ``[L, P]`` puts there."""
    slots = placement.shape[1] // num_gpus
    bad = []
    for layer, tensors in enumerate(weights):
        for local in range(slots):
            expert = int(placement[layer, rank * slots + local])
            for k, (tensor, want) in enumerate(zip(tensors, expert_weights(layer, expert))):
                as_int = TENSORS[k][2]
                if not torch.equal(tensor[local].view(as_int), want.view(as_int)):
                    bad.append(f"layer {layer} slot {local} tensor {k}: want expert {expert}")
    return bad


# --- placements ------------------------------------------------------------------------------

def random_row(rng: random.Random, num_experts: int, num_physical: int) -> list[int]:
    row = list(range(num_experts)) + [rng.randrange(num_experts)
                                      for _ in range(num_physical - num_experts)]
    rng.shuffle(row)
    return row


def transition_rows(kind: str, rng: random.Random, num_gpus: int, slots: int,
                    num_experts: int) -> tuple[list[int], list[int]]:
    """One layer's ``(old, new)`` rows ``[P]`` of a named kind of change."""
    physical = num_gpus * slots
    old = random_row(rng, num_experts, physical)
    new = list(old)
    if kind == "swap":  # two slots on different ranks exchange experts
        a = rng.randrange(slots)
        b = slots * rng.randrange(1, num_gpus) + rng.randrange(slots)
        new[a], new[b] = old[b], old[a]
    elif kind == "ring":  # every rank takes its neighbour's experts: a cycle through all ranks
        new = old[slots:] + old[:slots]
    elif kind == "local_cycle":  # experts rotate among the slots of each rank
        new = [old[r * slots + (i + 1) % slots] for r in range(num_gpus) for i in range(slots)]
    elif kind == "shuffle":
        rng.shuffle(new)
    elif kind == "replicas":  # redundant replicas removed and others added
        seen: set[int] = set()
        for p, expert in enumerate(old):
            if expert in seen:
                new[p] = rng.randrange(num_experts)
            seen.add(expert)
    elif kind == "everywhere":  # expert 0 only on rank 0 before, on every rank after
        others = list(range(1, num_experts))
        rng.shuffle(others)
        old = [0] + others[:slots - 1]
        rest = others[slots - 1:]
        for _ in range(1, num_gpus):
            mine = rest[:slots - 1]
            rest = rest[slots - 1:]
            old += mine + [rng.choice(others)]  # last slot: a spare replica of some expert
        new = [0 if p >= slots and p % slots == slots - 1 else e for p, e in enumerate(old)]
    elif kind == "fresh":
        new = random_row(rng, num_experts, physical)
    elif kind != "same":
        raise ValueError(kind)
    return old, new


def make_cases(num_gpus: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(old, new)`` pairs of ``[L, P]`` placements; every kind of change appears."""
    rng = random.Random(seed)
    slots = 3
    num_experts = num_gpus * slots - (num_gpus - 1)  # room for "everywhere"
    groups = [["swap", "ring", "same", "replicas"], ["everywhere", "local_cycle", "fresh", "shuffle"],
              ["fresh", "fresh", "ring", "everywhere"], ["shuffle", "replicas", "swap", "same"]]
    cases = []
    for kinds in groups:
        rows = [transition_rows(kind, rng, num_gpus, slots, num_experts) for kind in kinds]
        old = torch.tensor([r[0] for r in rows])
        new = torch.tensor([r[1] for r in rows])
        for placement in (old, new):
            validate_placement(placement, num_experts, num_gpus * slots, num_gpus)
        cases.append((old, new))
    return cases


# --- process harness -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_root() -> str:
    """The ``sys.path`` entry under which this file imports as ``__name__``.

    Spawned children unpickle the jobs below by module name; pytest's importlib mode names this
    module after its path (``tests.worker_hook.test_copy_gloo``), which a child can only import
    with that root on its path.
    """
    root = Path(__file__).resolve().parent
    for _ in range(__name__.count(".")):
        root = root.parent
    return str(root)


def _child(rank: int, world_size: int, port: int, results: Any,
           job: Callable[[int, int, dict], str], payload: dict) -> None:
    """Entry point of a spawned rank: join the group, run ``job``, report to the parent."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=30))
        try:
            detail = job(rank, world_size, payload)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, detail))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def spawn_ranks(world_size: int, job: Callable[[int, int, dict], str],
                payload: dict | None = None, ctx: Any = None) -> dict[int, str]:
    """Run ``job`` on ``world_size`` spawned ranks; return each rank's report or fail the test."""
    ctx = ctx or mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, results, job, payload or {}),
                         daemon=True) for r in range(world_size)]
    reports: dict[int, tuple[bool, str]] = {}
    deadline = time.monotonic() + RUN_DEADLINE_S
    root = import_root()
    added = root not in sys.path
    try:
        if added:
            sys.path.insert(0, root)  # a spawned child copies the parent's sys.path at start()
        try:
            for proc in procs:
                proc.start()
        finally:
            if added:
                sys.path.remove(root)
        while len(reports) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, detail = results.get(timeout=0.5)
            except queue.Empty:
                if not any(proc.is_alive() for proc in procs):
                    break  # every child is gone; a missing report will never come
                continue
            reports[rank] = (ok, detail)
        for proc in procs:
            proc.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    failed = {r: d for r, (ok, d) in reports.items() if not ok}
    assert not failed, "\n".join(f"rank {r} failed:\n{d}" for r, d in sorted(failed.items()))
    missing = sorted(set(range(world_size)) - set(reports))
    assert not missing, (f"ranks {missing} never reported (exit codes "
                         f"{[procs[r].exitcode for r in missing]}; deadline {RUN_DEADLINE_S}s)")
    codes = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    assert not codes, f"ranks exited badly: {codes}"
    return {r: d for r, (_, d) in reports.items()}


# --- jobs run inside the ranks -----------------------------------------------------------------

def job_copy_cases(rank: int, world_size: int, payload: dict) -> str:
    """Copy every case's ``old -> new`` in chunks and check every slot bit for bit."""
    rpn = payload["ranks_per_node"]
    moved = 0
    for i, (old, new) in enumerate(payload["cases"]):
        weights = make_weights(old, rank, world_size)
        assert not mismatches(weights, old, rank, world_size)
        # Odd cases: small batches force several batches per layer (3 tensors per expert).
        # Cases 0, 1 mod 4: one expert per piece; else one piece per peer and batch.
        executor = CopyExecutor(rank, world_size, weights, rpn,
                                max_ops_per_batch=3 if i % 2 else 256, timeout_s=20.0,
                                piece_bytes=1 if i % 4 < 2 else 0)
        if i % 2:
            chunks = chunk_layers(changed_layers(old, new), bytes_per_layer=1, bytes_per_chunk=3)
        else:
            chunks = chunk_layers(list(range(old.shape[0])), layers_per_chunk=2)  # incl. unchanged
        ahead = payload.get("start_ahead", False)
        if ahead and chunks:
            executor.start(0, chunks[0], old, new)
        for epoch, chunk in enumerate(chunks):
            # Cases 1, 2 mod 4 prepare the chunk ahead (case 2 for the wrong placement, which
            # the copy must notice and plan again); the others plan and pack inside the call.
            # With start_ahead the chunk's transfers were issued one "step" before, as the hook
            # does: each chunk starts right after the previous one landed.
            if ahead:
                stats = executor(0, chunk, old, new)
                assert stats.started_layers == len(chunk)
                if epoch + 1 < len(chunks):
                    nxt = chunks[epoch + 1]
                    if i % 4 == 1:
                        executor.prefetch(0, nxt, old, new)
                    elif i % 4 == 2:
                        executor.prefetch(0, nxt, new, old)
                    executor.start(0, nxt, old, new)
                expected_prefetched = len(chunk) if i % 4 == 1 and epoch else 0
            else:
                if i % 4 == 1:
                    executor.prefetch(epoch, chunk, old, new)
                elif i % 4 == 2:
                    executor.prefetch(epoch, chunk, new, old)
                stats = executor(epoch, chunk, old, new)
                assert stats.started_layers == 0
                expected_prefetched = len(chunk) if i % 4 == 1 else 0
            assert stats.prefetched_layers == expected_prefetched
            layer_stats = [p.stats(executor.bytes_per_expert)
                           for p in plan_copies(old, new, chunk, world_size, rpn)]
            assert stats.bytes_received == sum(s.bytes_received[rank] for s in layer_stats)
            assert stats.bytes_sent == sum(s.bytes_sent[rank] for s in layer_stats)
            assert stats.local_copies == sum(s.local_copies[rank] for s in layer_stats)
            # One isend and one irecv per peer, batch and piece: the experts travel packed.
            plans = plan_copies(old, new, chunk, world_size, rpn)
            per_piece = executor.experts_per_piece
            assert stats.p2p_ops == sum(
                -(-sum(op.peer == peer and op.kind == kind for op in ops) // per_piece)
                for p in plans for batch in p.batches(executor.transfers_per_batch)
                for ops in [p.ops_for(rank, batch)] for peer, kind in {(o.peer, o.kind)
                                                                        for o in ops})
            moved += stats.bytes_received
        bad = mismatches(weights, new, rank, world_size)
        assert not bad, f"case {i}: {bad[:5]}"
    return f"received {moved} bytes"


def job_start_misuse(rank: int, world_size: int, payload: dict) -> str:
    """Transfers started for one placement are never landed for another, and abandoned ones
    change nothing; afterwards the executor still copies correctly."""
    old, new = payload["cases"][0]
    weights = make_weights(old, rank, world_size)
    executor = CopyExecutor(rank, world_size, weights, 2, timeout_s=20.0)
    layers = changed_layers(old, new)
    executor.start(1, layers, old, new)
    with pytest.raises(CopyError, match="started for other placements"):
        executor(1, layers, new, old)
    assert not mismatches(weights, old, rank, world_size)
    executor.start(2, layers, old, new)
    with pytest.raises(CopyError, match="still in flight"):
        executor.start(3, layers, old, new)
    executor.abandon()
    assert not mismatches(weights, old, rank, world_size)
    executor.start(4, layers, old, new)
    stats = executor(4, layers, old, new)
    assert stats.started_layers == len(layers)
    bad = mismatches(weights, new, rank, world_size)
    assert not bad, bad[:5]
    return "ok"


def job_absent_peer(rank: int, world_size: int, payload: dict) -> str:
    """Rank 1 never joins the copy; rank 0 must raise CopyError naming it within the timeout."""
    old = torch.tensor([[0, 1]])
    new = torch.tensor([[1, 0]])
    if rank == 1:
        # Stay in the group (so the failure is a timeout, not a closed socket) until rank 0 is done.
        assert payload["done"].wait(timeout=30), "rank 0 never finished"
        return "skipped the copy"
    executor = CopyExecutor(rank, world_size, make_weights(old, rank, world_size), 2,
                            timeout_s=1.0)
    start = time.monotonic()
    try:
        if payload.get("start_ahead"):
            executor.start(7, [0], old, new)  # returns at once: nothing is waited for here
            assert time.monotonic() - start < 0.5
        executor(7, [0], old, new)
    except CopyError as err:
        elapsed = time.monotonic() - start
        assert (err.epoch, err.layer, err.peer) == (7, 0, 1), (err.epoch, err.layer, err.peer)
        assert "epoch 7" in str(err) and "layer 0" in str(err) and "peer rank 1" in str(err)
        assert 0.5 <= elapsed < 10.0, elapsed
        return f"CopyError after {elapsed:.2f}s: {err}"
    finally:
        payload["done"].set()
    raise AssertionError("the copy with an absent peer returned")


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("world_size", "ranks_per_node", "seed"), [(4, 4, 1), (8, 4, 2)])
def test_copies_are_bit_exact(world_size: int, ranks_per_node: int, seed: int) -> None:
    cases = make_cases(world_size, seed)
    reports = spawn_ranks(world_size, job_copy_cases,
                          {"cases": cases, "ranks_per_node": ranks_per_node})
    assert len(reports) == world_size


def test_copies_started_a_step_ahead_are_bit_exact() -> None:
    cases = make_cases(4, 3)
    reports = spawn_ranks(4, job_copy_cases,
                          {"cases": cases, "ranks_per_node": 2, "start_ahead": True})
    assert len(reports) == 4


def test_started_transfers_are_not_landed_for_other_placements() -> None:
    reports = spawn_ranks(4, job_start_misuse, {"cases": make_cases(4, 5)})
    assert list(reports.values()) == ["ok"] * 4


@pytest.mark.parametrize("start_ahead", [False, True])
def test_absent_peer_raises_copy_error_within_timeout(start_ahead: bool) -> None:
    ctx = mp.get_context("spawn")
    reports = spawn_ranks(2, job_absent_peer, {"done": ctx.Event(), "start_ahead": start_ahead},
                          ctx=ctx)
    assert reports[0].startswith("CopyError")


def test_cycle_inside_one_rank_needs_no_process_group() -> None:
    # G = 1: only local copies (staged cycle), so no torch.distributed call is made.
    old = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 3]])
    weights = make_weights(old, 0, 1)
    stats = CopyExecutor(0, 1, weights, 1)(3, [0, 1], old, new)
    assert not mismatches(weights, new, 0, 1)
    assert (stats.local_copies, stats.p2p_ops, stats.bytes_sent) == (3, 0, 0)
    assert stats.staged_bytes == 3 * (15 * 4 + 7 * 2 + 4)


def test_bad_input_and_staging_budget_raise_copy_error_before_any_transfer() -> None:
    old = torch.tensor([[0, 1, 2, 3]])
    weights = make_weights(old, 0, 1)
    executor = CopyExecutor(0, 1, weights, 1, bytes_budget=10)
    with pytest.raises(CopyError, match="epoch 5"):
        executor(5, [0], old, torch.tensor([[0, 1, 2]]))
    with pytest.raises(CopyError, match="layer 0.*budget"):
        executor(5, [0], old, torch.tensor([[1, 0, 2, 3]]))
    assert not mismatches(weights, old, 0, 1)  # nothing was touched
