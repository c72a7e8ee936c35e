"""bench/copy_gpu.py on CPU (gloo, 4 ranks, tiny shapes): both traffic patterns run, every copy is
checked slot by slot inside the bench (it exits non-zero on a wrong slot), and the placements it
builds move what the pattern says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from copy_gpu import distances, make_placements  # noqa: E402

LAYERS, SLOTS = 3, 9


def test_all_pairs_placement_takes_from_every_other_rank() -> None:
    world = 4
    old, new, full = make_placements(LAYERS, SLOTS, world, 0.4, seed=1, pattern="all-pairs")
    owner = {}  # (layer, expert) -> rank in old
    for layer in range(LAYERS):
        for slot, expert in enumerate(old[layer].tolist()):
            owner[layer, expert] = slot // SLOTS
    for placement, moving in ((new, 4), (full, SLOTS)):
        for layer in range(LAYERS):
            for rank in range(world):
                row = placement[layer, rank * SLOTS:(rank + 1) * SLOTS].tolist()
                sources = sorted((rank - owner[layer, e]) % world for e in row
                                 if owner[layer, e] != rank)
                assert sources == sorted(distances("all-pairs", moving, world))
            # each expert still lives exactly once: the copies are a permutation
            assert sorted(placement[layer].tolist()) == list(range(world * SLOTS))


def test_ring_placement_takes_from_the_previous_rank_only() -> None:
    old, new, _ = make_placements(LAYERS, SLOTS, 4, 0.4, seed=2, pattern="ring")
    for layer in range(LAYERS):
        changed = (new[layer] != old[layer]).nonzero().flatten().tolist()
        assert len(changed) == 4 * 4
        for slot in changed:
            source = old[layer].tolist().index(int(new[layer, slot]))
            assert (slot // SLOTS - source // SLOTS) % 4 == 1


def test_bench_runs_both_patterns_at_four_ranks() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "bench" / "copy_gpu.py"), "--device", "cpu", "--world", "4",
           "--hidden", "32", "--inter", "16", "--layers", "2", "--repeats", "1", "--dtypes", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ring") or
            line.startswith("| all-pairs")]
    # The main table (inline, prefetched) for both patterns, then the sent-ahead table.
    assert [r.split("|")[1].strip() for r in rows] == ["ring", "ring", "all-pairs", "all-pairs",
                                                       "ring", "all-pairs"]
    assert "transfers started a step ahead" in proc.stdout
    assert "all-pairs bf16: the same-bytes ceiling moves" in proc.stdout
