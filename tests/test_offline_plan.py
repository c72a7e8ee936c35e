"""``eplbctl plan``: the load formats in, SGLang's placement format out, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eplb.coordinator.policy_deepseek import rebalance_deepseek
from eplb.placement import default_placement, validate_placement

EXAMPLE = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eplb.ctl", "plan", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("fmt", ["pt-tensor", "pt-sglang-steps", "json", "json-sglang", "npy"])
def test_every_load_format_gives_the_same_plan(tmp_path: Path, fmt: str) -> None:
    load = torch.tensor(EXAMPLE)
    path = tmp_path / f"load.{fmt.split('-')[0]}"
    if fmt == "pt-tensor":
        torch.save(load, path)
    elif fmt == "pt-sglang-steps":  # [steps, L, E] under logical_count: summed over steps
        torch.save({"logical_count": torch.stack([load, torch.zeros_like(load)])}, path)
    elif fmt == "json":
        path.write_text(json.dumps(EXAMPLE))
    elif fmt == "json-sglang":
        path.write_text(json.dumps({"logical_count": EXAMPLE}))
    else:
        numpy = pytest.importorskip("numpy")
        numpy.save(path, numpy.array(EXAMPLE))
    out_pt, out_json = tmp_path / "p2l.pt", tmp_path / "p2l.json"
    result = plan("--load", str(path), "--num-physical", "16", "--num-gpus", "8", "--num-nodes", "2",
                  "--num-groups", "4", "--policy", "deepseek", "--output", str(out_pt))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    expected = rebalance_deepseek(torch.tensor(EXAMPLE), 16, 4, 2, 8)
    saved = torch.load(out_pt, weights_only=True)["physical_to_logical_map"]
    assert torch.equal(saved, expected)
    assert 0 < summary["balancedness_after"] <= 1 and summary["plan_ms"] >= 0
    assert plan("--load", str(path), "--num-physical", "16", "--num-gpus", "8", "--num-nodes", "2",
                "--num-groups", "4", "--policy", "deepseek", "--output", str(out_json)).returncode == 0
    assert json.loads(out_json.read_text())["physical_to_logical_map"] == expected.tolist()


def test_with_the_current_placement_it_reports_before_and_moves(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    load = torch.randn(3, 16, generator=gen).exp() * 100
    torch.save(load, tmp_path / "load.pt")
    current = default_placement(3, 16, 24)
    (tmp_path / "cur.json").write_text(json.dumps({"physical_to_logical_map": current.tolist()}))
    result = plan("--load", str(tmp_path / "load.pt"), "--current", str(tmp_path / "cur.json"),
                  "--num-physical", "24", "--num-gpus", "4", "--bytes-per-expert", "1000",
                  "--output", str(tmp_path / "new.pt"))
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["balancedness_after"] > s["balancedness_before"]
    assert s["slots_changed"] > 0 and s["bytes_moved"] == s["experts_moved"] * 1000
    new = torch.load(tmp_path / "new.pt", weights_only=True)["physical_to_logical_map"]
    validate_placement(new, 16, 24, 4, 3)


def test_stable_is_the_default_and_max_moves_caps_the_slots_changed(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    torch.save(torch.randn(4, 32, generator=gen).exp() * 100, tmp_path / "load.pt")
    current = default_placement(4, 32, 40)
    torch.save(current, tmp_path / "cur.pt")
    common = ["--load", str(tmp_path / "load.pt"), "--current", str(tmp_path / "cur.pt"),
              "--num-physical", "40", "--num-gpus", "8"]
    free = plan(*common, "--output", str(tmp_path / "free.pt"))
    capped = plan(*common, "--max-moves", "3", "--output", str(tmp_path / "capped.pt"))
    assert free.returncode == 0 and capped.returncode == 0, free.stderr + capped.stderr
    s_free, s_capped = json.loads(free.stdout), json.loads(capped.stdout)
    assert s_free["policy"] == "stable" and s_free["slots_changed"] > 3
    assert 0 < s_capped["slots_changed"] <= 3
    assert s_capped["balancedness_after"] > s_capped["balancedness_before"]
    new = torch.load(tmp_path / "capped.pt", weights_only=True)["physical_to_logical_map"]
    assert int((new != current).sum()) == s_capped["slots_changed"]
    validate_placement(new, 32, 40, 8, 4)
    bad = plan(*common, "--max-moves", "-1")
    assert bad.returncode == 2 and "max_moves" in bad.stderr


@pytest.mark.parametrize("content, args, message", [
    ("[[1, -2], [3, 4]]", ["--num-physical", "2", "--num-gpus", "1"], "negative"),
    ("[1, 2, 3]", ["--num-physical", "3", "--num-gpus", "1"], "must be [L, E]"),
    ("{\"other\": 1}", ["--num-physical", "3", "--num-gpus", "1"], "without 'logical_count'"),
    ("not json", ["--num-physical", "3", "--num-gpus", "1"], "cannot read"),
    ("[[1, 2, 3]]", ["--num-physical", "4", "--num-gpus", "3"], "cannot plan"),
    ("[[1, 2, 3]]", ["--num-physical", "3", "--num-gpus", "1", "--output", "x.txt"], ".pt or .json"),
])
def test_bad_input_is_refused_with_a_message_and_nothing_written(tmp_path: Path, content, args,
                                                                 message) -> None:
    (tmp_path / "load.json").write_text(content)
    result = plan("--load", str(tmp_path / "load.json"), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "x.txt").exists()


def test_a_current_placement_that_drops_an_expert_is_refused(tmp_path: Path) -> None:
    (tmp_path / "load.json").write_text("[[1, 2, 3]]")
    (tmp_path / "cur.json").write_text("[[0, 1, 1, 1]]")
    result = plan("--load", str(tmp_path / "load.json"), "--current", str(tmp_path / "cur.json"),
                  "--num-physical", "4", "--num-gpus", "2")
    assert result.returncode == 2 and "no slot for logical experts [2]" in result.stderr
