"""bench/decode_gpu.py on CPU (gloo, 2 ranks, tiny shapes): every mode runs in one call, the
rebalancing modes rebalance exactly once, and every slot holds its expert afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from decode_engine import Shape, StandInMoE, expert_tags  # noqa: E402

STEPS, WARMUP, TRIGGER, WINDOW, LAYERS, SLOTS, WORLD = 120, 10, 60, 40, 3, 9, 2


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("decode") / "cpu_decode.md"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "bench" / "decode_gpu.py"), "--device", "cpu",
           "--world", str(WORLD), "--hidden", "64", "--inter", "32", "--tokens", "16",
           "--layers", str(LAYERS), "--slots", str(SLOTS), "--steps", str(STEPS),
           "--warmup", str(WARMUP), "--rebalance-at", str(TRIGGER), "--window", str(WINDOW),
           "--ceiling-repeats", "2", "--timeout", "150", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    raw = json.loads(out.with_suffix(".json").read_text())
    return raw, out.read_text(), proc.stdout


def test_every_mode_ran_with_the_same_steps(bench_run) -> None:
    raw, table, stdout = bench_run
    modes = raw["summary"]["modes"]
    assert list(modes) == ["no-rebalance", "stop-the-world", "async", "sidecar", "sidecar-ahead"]
    for name, m in modes.items():
        assert m["steps_measured"] == STEPS - WARMUP, name
        assert all(len(r) == STEPS for r in raw["per_rank_step_ms"][name])
        assert 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"]
    assert "RESULT: ok" in stdout
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert header == ("| | no rebalance | stop-the-world | in-engine async | sidecar (eplb) | "
                      "sidecar, sent a step ahead |")
    assert raw["summary"]["ceiling_gbps"] > 0


def test_rebalancing_modes_rebalance_once_and_move_real_bytes(bench_run) -> None:
    raw, _, _ = bench_run
    modes = raw["summary"]["modes"]
    assert modes["no-rebalance"]["rebalances"] == 0 and modes["no-rebalance"]["chunks"] == 0
    bytes_per_expert = 3 * 64 * 32 * 2
    for name in ("stop-the-world", "async", "sidecar", "sidecar-ahead"):
        m = modes[name]
        assert m["rebalances"] == 1, name
        assert m["bytes_moved"] > 0 and m["bytes_moved"] % bytes_per_expert == 0, name
        assert m["copy_steps"][0] >= TRIGGER, name  # nobody copies before the trigger
        assert m["copy_steps"][-1] < STEPS - WINDOW, name  # done before the "after" window
        assert m["longest_chunk_ms"] > 0
        assert (m.get("copy_gbps") is None) == (name == "sidecar-ahead"), name
    assert all(m["copy_gbps"] > 0 for n, m in modes.items() if n in ("stop-the-world", "async"))
    # Sent ahead: chunk i starts at S + i and lands at S + i + 1 (one start per landing, the
    # start a step earlier, for the same layers).
    for rank_copies, rank_starts in zip(raw["copies"]["sidecar-ahead"], raw["starts"]["sidecar-ahead"]):
        assert [c["started_layers"] for c in rank_copies] == [len(c["layers"]) for c in rank_copies]
        assert [(s["step"] + 1, s["layers"]) for s in rank_starts] == \
            [(c["step"], c["layers"]) for c in rank_copies]
    assert not any(c["started_layers"] for r in raw["copies"]["sidecar"] for c in r)
    # Stop-the-world copies every layer at the trigger step; the others one layer per step.
    assert modes["stop-the-world"]["copy_steps"] == [TRIGGER]
    for name in ("async", "sidecar"):
        steps = modes[name]["copy_steps"]
        assert steps == list(range(steps[0], steps[0] + len(steps))), name
        assert 1 <= len(steps) <= LAYERS
        layers = sorted(l for c in raw["copies"][name][0] for l in c["layers"])
        assert len(layers) == len(set(layers)) == len(steps)  # one layer per chunk
    # A step that copied took at least as long as its copy (slowest rank of each).
    for name in ("stop-the-world", "async", "sidecar"):
        step_ms = [max(r[i] for r in raw["per_rank_step_ms"][name]) for i in range(STEPS)]
        for rank_copies in raw["copies"][name]:
            for c in rank_copies:
                assert step_ms[c["step"]] >= c["seconds"] * 1e3, (name, c)
    for name in ("sidecar", "sidecar-ahead"):
        hook = modes[name]["hook"]
        # Left out per rank: at most one copy step and one prefetch step per layer (+1 start).
        assert hook["steps"] >= WORLD * (STEPS - WARMUP - 2 * LAYERS - 1) and hook["on_step_p50_us"] > 0
        assert modes[name]["placement_matches_leader"]
        assert modes[name]["leader_counters"]["committed"] == 1


def test_weights_hold_their_experts_and_balance_improves(bench_run) -> None:
    raw, _, _ = bench_run
    for name, m in raw["summary"]["modes"].items():
        assert m["mismatched_slots"] == 0, name
        assert m["slots_checked"] == WORLD * LAYERS * SLOTS
        assert m["placements_agree"], name
    modes = raw["summary"]["modes"]
    base = modes["no-rebalance"]["balancedness"]
    for name in ("stop-the-world", "async", "sidecar", "sidecar-ahead"):
        b = modes[name]["balancedness"]
        assert b["before"] == pytest.approx(base["before"])  # same routing in every mode
        assert b["after"] > b["after_if_not_rebalanced"] + 0.02, name
        assert b["after_if_not_rebalanced"] == pytest.approx(base["after"])


def test_verify_catches_a_wrong_slot() -> None:
    """The check the bench relies on fails when a slot holds another expert's weights."""
    shape = Shape(layers=2, experts=6, slots=4, world=2, hidden=8, inter=4, tokens=4, topk=2)
    engine = StandInMoE(shape, 1, torch.device("cpu"), torch.bfloat16, 0, 1.0, 100)
    placement = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1], [5, 4, 3, 2, 1, 0, 5, 4]])
    engine.reset(placement)
    assert engine.verify() == 0
    tags = expert_tags(placement, shape.experts)
    assert len(set(tags[0].tolist()[:6])) == 6  # distinct within a layer
    engine.w2[1][2][3, 1] = engine.w2[1][2][3, 1] * 2  # one element of one slot
    assert engine.verify() == 1
    engine.reset(placement)
    # Serving a placement whose weights were not moved: slots 4 and 5 (rank 1's 0 and 1) swap.
    swapped = placement.clone()
    swapped[0, [4, 5]] = swapped[0, [5, 4]]
    engine.set_layers([0], swapped)
    assert engine.verify() == 2


def test_a_run_past_its_timeout_ends_with_an_error() -> None:
    """A bench that cannot finish in time stops its ranks and says so (it never hangs)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "bench" / "decode_gpu.py"), "--device", "cpu",
           "--world", "2", "--hidden", "64", "--inter", "32", "--tokens", "32", "--layers", "2",
           "--steps", "60", "--warmup", "5", "--rebalance-at", "40", "--window", "20",
           "--modes", "no-rebalance", "--timeout", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode != 0
    assert "did not finish within --timeout 1s" in proc.stderr


def test_a_failing_rank_ends_the_run_with_the_modes_that_finished() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "bench" / "decode_gpu.py"), "--device", "cpu",
           "--world", "2", "--hidden", "64", "--inter", "32", "--tokens", "16", "--layers", "1",
           "--steps", "30", "--warmup", "2", "--rebalance-at", "20", "--window", "10",
           "--ceiling-repeats", "1", "--modes", "no-rebalance", "stop-the-world",
           "--inject-failure", "stop-the-world",
           "--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=REPO)
    assert proc.returncode == 1
    assert "injected failure at the start of mode stop-the-world" in proc.stderr
    assert "PARTIAL RESULTS: only no-rebalance finished" in proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| |"))
    assert header == "| | no rebalance |"
    assert "RESULT: FAILED" in proc.stdout


def test_the_default_gpu_configuration_is_valid() -> None:
    """The GPU run uses the defaults: they must parse, trigger once, and fit an 80 GB card."""
    import decode_gpu

    args = decode_gpu.parse_args(["--device", "cpu", "--world", "2", "--hidden", "7168",
                                  "--inter", "2048", "--ceiling-mb", "512"])
    assert args.experts == (args.slots - 1) * args.world and args.slots >= 9
    assert args.dtype == "bf16" and args.modes == list(decode_gpu.MODES)
    assert args.warmup < args.rebalance_at < args.steps <= 2 * args.rebalance_at
    assert 5 < decode_gpu.memory_estimate_gb(args) < 40
    for world in (4, 8):
        wide = decode_gpu.parse_args(["--device", "cpu", "--world", str(world)])
        assert wide.experts == 8 * world


def test_worst_step_is_taken_while_the_rebalance_runs(bench_run) -> None:
    raw, _, _ = bench_run
    for name in ("stop-the-world", "async", "sidecar"):
        m = raw["summary"]["modes"][name]
        assert TRIGGER <= m["worst_window_step"] <= m["copy_steps"][-1] + 1, name
        assert m["worst_window_ms"] == max(m["steps_ms"][TRIGGER:m["copy_steps"][-1] + 2])
        assert m["worst_window_ms"] >= m["longest_chunk_ms"]


def test_chunked_modes_prefetch_each_chunk_as_the_hook_does(bench_run) -> None:
    """The async mode gets the copy engine's prefetch like the hook gives it to the sidecar mode
    (when the copy engine offers it), so the modes differ in coordination, not in the copier."""
    from eplb.worker_hook.copy_exec import CopyExecutor

    raw, _, _ = bench_run
    modes = raw["summary"]["modes"]
    if not hasattr(CopyExecutor, "prefetch"):
        pytest.skip("this copy engine has no prefetch")
    for name in ("async", "sidecar"):
        # Every chunk but possibly the first (when the agreement lands at its step) is prepared.
        assert modes[name]["chunks_prefetched"] >= modes[name]["chunks"] - 1, name
    assert modes["stop-the-world"]["chunks_prefetched"] == 0
