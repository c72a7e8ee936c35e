"""``eplbctl plan``: the load formats in, SGLang's placement format out, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from eplb.placement.policy.deepseek import rebalance_deepseek
from eplb.placement.load import balancedness
from eplb.placement.rules import default_placement, validate_placement

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


# ----------------------------------------------------------------- SGLang expert-distribution dumps
#
# SGLang's ``ExpertDistributionRecorder`` (sglang/srt/eplb/expert_distribution.py), in ``per_pass``
# mode, keeps one record per forward pass and ``_DetailAccumulator.dump`` saves, with
# ``torch.save`` into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` as
# ``expert_distribution_recorder_<time>_<rank>.pt``:
#   {"records": [{"forward_pass_id", "rank", "gatherer_key", "global_physical_count": [L, P]}, ...],
#    "last_physical_to_logical_map": [L, P]}
# ``L`` is every decoder layer (``num_hidden_layers``): dense layers never call
# ``on_select_experts``, so their rows stay zero. The tests below drive the real recorder in a
# child interpreter (the imports need stubs, kept out of the pytest process);
# ``_dump_like_sglang`` writes the same layout by hand for when SGLang cannot be imported.

DENSE, MOE, E, P, G = 2, 4, 8, 12, 4  # layers 0-1 dense, 2-5 MoE; 8 experts in 12 slots on 4 GPUs
TOPK = 2


def _served_map() -> torch.Tensor:
    """``[L, P]`` placement being served: experts in an order shifted per layer, 4 replicas last."""
    rows = [(torch.arange(P) + 3 * layer) % E for layer in range(DENSE + MOE)]
    return torch.stack(rows).to(torch.int64)


def _passes(rank: int, num_passes: int = 5, tokens: int = 16) -> list[torch.Tensor]:
    """Per pass, ``[L, tokens, TOPK]`` logical experts picked (-1 in dense layers), skewed."""
    gen = torch.Generator().manual_seed(100 + rank)
    weights = torch.tensor([8.0, 5.0, 3.0] + [1.0] * (E - 3))
    out = []
    for _ in range(num_passes):
        picks = torch.full((DENSE + MOE, tokens, TOPK), -1, dtype=torch.int64)
        for layer in range(DENSE, DENSE + MOE):
            picks[layer] = torch.stack([torch.multinomial(weights.roll(layer), TOPK, generator=gen)
                                        for _ in range(tokens)])
        out.append(picks)
    return out


def _to_physical(picks: torch.Tensor, phys2log: torch.Tensor, token_offset: int) -> torch.Tensor:
    """Logical picks ``[T, K]`` of one layer as physical slots, replicas taken in turn per token."""
    out = torch.empty_like(picks)
    for t in range(picks.shape[0]):
        for k in range(picks.shape[1]):
            slots = (phys2log == picks[t, k]).nonzero().flatten()
            out[t, k] = slots[(t + token_offset) % len(slots)]
    return out


def _true_load(ranks: int) -> torch.Tensor:
    """``[L, E]`` logical selections of every pass of every rank (dense rows zero)."""
    load = torch.zeros(DENSE + MOE, E)
    for rank in range(ranks):
        for picks in _passes(rank):
            for layer in range(DENSE, DENSE + MOE):
                load[layer] += torch.bincount(picks[layer].flatten(), minlength=E)
    return load


def _dump_like_sglang(directory: Path, ranks: int) -> None:
    """Write, without SGLang, what ``_DetailAccumulator.dump`` writes in per_pass mode.

    Layout per sglang/srt/eplb/expert_distribution.py (0.5.23): ``_DetailAccumulator.append`` (the
    record keys), ``_SelectExpertsSinglePassGatherer`` (``global_physical_count``: int32 ``[L, P]``,
    one count per routed token and top-k slot), ``_DetailAccumulator.dump`` and ``_dump_to_file``
    (the dict and the file name).
    """
    phys2log = _served_map()
    for rank in range(ranks):
        records = []
        for pass_id, picks in enumerate(_passes(rank)):
            count = torch.zeros(DENSE + MOE, P, dtype=torch.int32)
            for layer in range(DENSE, DENSE + MOE):
                slots = _to_physical(picks[layer], phys2log[layer], rank).flatten()
                count[layer] = torch.bincount(slots, minlength=P).to(torch.int32)
            records.append(dict(forward_pass_id=pass_id, rank=rank, gatherer_key="primary",
                                global_physical_count=count))
        torch.save(dict(records=records, last_physical_to_logical_map=phys2log),
                   directory / f"expert_distribution_recorder_{time.time()}_{rank}.pt")


def _import_sglang_recorder() -> tuple[Any, Any]:
    """SGLang's real ``expert_distribution`` module; only modules unrelated to it are stubbed.

    Call in a child interpreter only: it edits ``sys.modules``.
    """
    import importlib.util
    import types

    class _Missing(types.ModuleType):
        """A stand-in module: every attribute is a fresh placeholder class."""

        def __getattr__(self, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (Exception,), {})

    def stub(name: str) -> None:
        module = _Missing(name)
        module.__path__ = []
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)

    root = Path(importlib.util.find_spec("sglang").origin).parent
    # sglang/__init__.py patches transformers and loads the frontend language API, neither used
    # by the recorder (and transformers is not installed): a bare package over the real directory
    # loads the real submodules without it.
    package = types.ModuleType("sglang")
    package.__path__ = [str(root)]
    sys.modules["sglang"] = package
    # The model executor's batch type pulls in every model config (transformers); the recorder
    # names ForwardBatch/ForwardMode only in hints and in the ROCm-only MegaMoE branch.
    stub("sglang.srt.model_executor.forward_batch_info")
    # Prometheus collectors (and through them server_args, disaggregation): used only when the
    # balancedness report is on, and it is off here.
    stub("sglang.srt.observability.metrics_collector")
    # sglang.srt.utils.common imports these at module level for GPU kernels, images and HTTP,
    # nothing the recorder runs: stubbed only where they are not installed.
    for names in (["triton", "triton.language"], ["PIL"], ["starlette", "starlette.routing"],
                  ["requests", "requests.exceptions"]):
        if importlib.util.find_spec(names[0]) is None:
            for name in names:
                stub(name)
    from sglang.srt.eplb import expert_distribution, expert_location
    return expert_distribution, expert_location


def _record_with_sglang(directory: Path, ranks: int) -> None:
    """Run SGLang's recorder (``per_pass`` mode) over ``_passes`` and dump one file per rank."""
    import os
    from types import SimpleNamespace

    os.environ["SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"] = str(directory)
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"  # SGLang's switch for running on the CPU
    ed, el = _import_sglang_recorder()
    # The recorder reads its settings from SGLang's published server config, which needs the
    # whole server_args resolution (model configs, transformers); these are the settings it reads.
    moe = SimpleNamespace(expert_distribution_recorder_mode="per_pass", moe_a2a_backend="none",
                          expert_balancedness_report_mode="off", ep_dispatch_algorithm=None)
    exec_ = SimpleNamespace(moe=moe)
    ed.get_exec = el.get_exec = lambda: exec_
    ed.reports_expert_balancedness = lambda: False
    # A ROCm-only switch (False elsewhere) whose import of sglang.srt.layers.moe loads the models.
    ed.megamoe_prefill_only_recorder_enabled = lambda: False
    phys2log = _served_map()
    all_physical = el._compute_logical_to_all_physical_map(phys2log, E, G, moe_ep_rank=None)
    metadata = el.ExpertLocationMetadata._init_raw(ep_size=G, physical_to_logical_map=phys2log,
                                                   logical_to_all_physical_map=all_physical)
    for rank in range(ranks):
        recorder = ed.ExpertDistributionRecorder.init_new(metadata, rank)
        recorder.start_record()
        for pass_id, picks in enumerate(_passes(rank)):
            with recorder.with_forward_pass(pass_id, None):
                for layer in range(DENSE, DENSE + MOE):
                    with recorder.with_current_layer(layer):
                        recorder.on_select_experts(
                            _to_physical(picks[layer], phys2log[layer], rank).to(torch.int32))
        recorder.stop_record()
        recorder.dump_record()
        time.sleep(0.01)  # file names carry time.time()


@pytest.fixture(scope="module")
def sglang_dump_dir(tmp_path_factory) -> Path:
    """Two ranks' dumps written by SGLang's own recorder. SGLang's EPLB modules come with the
    dev setup (requirements-engines.txt); without them this fails rather than skips."""
    directory = tmp_path_factory.mktemp("sglang-dump")
    child = subprocess.run([sys.executable, __file__, "record", str(directory), "2"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, ("SGLang's recorder did not run (./dev test installs SGLang's "
                                   f"EPLB modules, see requirements-engines.txt): {child.stderr}")
    return directory


def _dump_dir(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if kind == "sglang":
        return request.getfixturevalue("sglang_dump_dir")
    _dump_like_sglang(tmp_path, ranks=2)
    return tmp_path


def test_the_hand_built_dump_is_what_sglang_writes(sglang_dump_dir: Path, tmp_path: Path) -> None:
    _dump_like_sglang(tmp_path, ranks=2)
    real = [torch.load(f, weights_only=True) for f in sorted(sglang_dump_dir.glob("*.pt"))]
    ours = [torch.load(f, weights_only=True) for f in sorted(tmp_path.glob("*.pt"))]
    assert len(real) == len(ours) == 2
    for a, b in zip(real, ours):
        assert a.keys() == b.keys() == {"records", "last_physical_to_logical_map"}
        assert torch.equal(a["last_physical_to_logical_map"], b["last_physical_to_logical_map"])
        for ra, rb in zip(a["records"], b["records"], strict=True):
            assert ra.keys() == rb.keys()
            assert ra["global_physical_count"].dtype == rb["global_physical_count"].dtype
            assert all(torch.equal(ra[k], rb[k]) if isinstance(ra[k], torch.Tensor)
                       else ra[k] == rb[k] for k in ra)


@pytest.mark.parametrize("kind", ["sglang", "hand-built"])
def test_an_sglang_per_pass_dump_is_planned_over_its_moe_layers(kind: str, request, tmp_path: Path
                                                                ) -> None:
    directory = _dump_dir(kind, request, tmp_path)
    out = tmp_path / "out" / "p2l.pt"
    out.parent.mkdir()
    result = plan("--load", str(directory), "--num-gpus", str(G), "--output", str(out))
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["layers"] == DENSE + MOE and s["experts"] == E and s["num_physical"] == P
    assert s["moe_layers"] == "2:6" and s["current"] == "the dump's last_physical_to_logical_map"
    assert "4 MoE layers only" in s["balancedness_over"] and "(0:2)" in s["balancedness_over"]
    new = torch.load(out, weights_only=True)["physical_to_logical_map"]
    validate_placement(new, E, P, G, DENSE + MOE)
    served = _served_map()
    assert torch.equal(new[:DENSE], served[:DENSE])  # dense rows kept as served
    per_layer = balancedness(_true_load(ranks=2), served, G)
    assert per_layer[:DENSE].tolist() == [1.0, 1.0]  # an idle layer counts as perfectly balanced
    moe_only, all_layers = float(per_layer[DENSE:].mean()), float(per_layer.mean())
    assert moe_only < all_layers
    assert s["balancedness_before"] == pytest.approx(moe_only)
    after = balancedness(_true_load(ranks=2), new, G)
    assert s["balancedness_after"] == pytest.approx(float(after[DENSE:].mean()))
    assert s["balancedness_after"] > s["balancedness_before"]
    assert s["slots_changed"] == int((new != served).sum()) > 0


def test_one_rank_file_alone_and_two_files_by_name(tmp_path: Path) -> None:
    _dump_like_sglang(tmp_path, ranks=2)
    files = sorted(str(f) for f in tmp_path.glob("*.pt"))
    both = plan("--load", *files, "--num-gpus", str(G))
    whole = plan("--load", str(tmp_path), "--num-gpus", str(G))
    one = plan("--load", files[0], "--num-gpus", str(G))
    assert both.returncode == whole.returncode == one.returncode == 0, both.stderr + one.stderr
    assert json.loads(both.stdout)["balancedness_before"] == json.loads(whole.stdout)[
        "balancedness_before"] != json.loads(one.stdout)["balancedness_before"]
    assert json.loads(both.stdout)["input"] == "SGLang per-pass dump: 10 passes in 2 file(s)"
    (tmp_path / "plain.json").write_text(json.dumps(_true_load(ranks=1).tolist()))
    mixed = plan("--load", files[0], str(tmp_path / "plain.json"), "--num-gpus", str(G))
    assert mixed.returncode == 2 and "one is an SGLang per-pass dump" in mixed.stderr


def test_a_stat_dump_with_dense_layers_is_averaged_over_moe_layers_only(tmp_path: Path) -> None:
    # _StatAccumulator.dump (stat mode) saves {"rank", "logical_count": [buffer, L, E],
    # "average_utilization_rate_over_window"}; L includes the dense layers, zero rows.
    load = _true_load(ranks=1).to(torch.int32)
    torch.save({"rank": 0, "logical_count": torch.stack([load, torch.zeros_like(load)]),
                "average_utilization_rate_over_window": None}, tmp_path / "stat.pt")
    current = _served_map()
    torch.save({"physical_to_logical_map": current}, tmp_path / "cur.pt")
    result = plan("--load", str(tmp_path / "stat.pt"), "--current", str(tmp_path / "cur.pt"),
                  "--num-gpus", str(G), "--policy", "greedy")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    per_layer = balancedness(load, current, G)
    assert s["moe_layers"] == "2:6" and s["num_physical"] == P
    assert s["balancedness_before"] == pytest.approx(float(per_layer[DENSE:].mean()))
    assert s["balancedness_before"] < float(per_layer.mean())


def test_moe_layers_option(tmp_path: Path) -> None:
    _dump_like_sglang(tmp_path, ranks=1)
    auto = plan("--load", str(tmp_path), "--num-gpus", str(G))
    named = plan("--load", str(tmp_path), "--num-gpus", str(G), "--moe-layers", "2,3:")
    assert auto.returncode == named.returncode == 0, named.stderr
    a, n = json.loads(auto.stdout), json.loads(named.stdout)
    assert n["moe_layers"] == "2:6" and n["moe_layers_from"] == "--moe-layers"
    assert a["balancedness_after"] == n["balancedness_after"]
    wider = plan("--load", str(tmp_path), "--num-gpus", str(G), "--moe-layers", "1:6")
    assert wider.returncode == 0 and json.loads(wider.stdout)["moe_layers"] == "1:6"
    assert "1 of the MoE layers routed nothing" in json.loads(wider.stdout)["balancedness_over"]
    for spec, message in [("3:6", "leaves out layers 2, which routed tokens"),
                          ("2:9", "outside 0..5"), ("x", "is not N or A:B")]:
        bad = plan("--load", str(tmp_path), "--num-gpus", str(G), "--moe-layers", spec)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_the_dump_map_is_not_the_current_one_when_the_slots_differ(tmp_path: Path) -> None:
    _dump_like_sglang(tmp_path, ranks=1)
    result = plan("--load", str(tmp_path), "--num-gpus", str(G), "--num-physical", "16")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["current"].startswith("none: the dump's map has 12 slots")
    assert "balancedness_before" not in s and s["num_physical"] == 16


def test_output_into_a_missing_directory_says_what_to_do(tmp_path: Path) -> None:
    _dump_like_sglang(tmp_path, ranks=1)
    out = tmp_path / "no" / "such" / "p2l.pt"
    result = plan("--load", str(tmp_path), "--num-gpus", str(G), "--output", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"directory {out.parent} does not exist" in result.stderr
    assert f"mkdir -p {out.parent}" in result.stderr and not out.parent.exists()
    into_dir = plan("--load", str(tmp_path), "--num-gpus", str(G), "--output", str(tmp_path))
    assert into_dir.returncode == 2 and "file name ending in .pt or .json" in into_dir.stderr


@pytest.mark.parametrize("name, content, message", [
    ("garbage.pt", b"not a torch file", "cannot read"),
    ("missing.pt", None, "no such file"),
    ("load.txt", b"1 2 3", "unknown format '.txt'"),
    ("no-map.pt", {"records": [{"global_physical_count": torch.zeros(2, 4)}]},
     "without 'last_physical_to_logical_map'"),
    ("no-records.pt", {"records": [], "last_physical_to_logical_map": torch.zeros(2, 4).long()},
     "the recorder dumped no forward pass"),
    ("bad-shape.pt", {"records": [{"global_physical_count": torch.ones(2, 3)}],
                      "last_physical_to_logical_map": torch.zeros(2, 4).long()}, "is [2, 3]"),
    ("zeros.json", b"[[0, 0], [0, 0]]", "the load is all zero"),
])
def test_an_unusable_load_names_the_expected_format(tmp_path: Path, name, content, message) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    result = plan("--load", str(path), "--num-physical", "4", "--num-gpus", "2")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if message in ("cannot read", "no such file", "unknown format '.txt'",
                   "without 'last_physical_to_logical_map'"):
        assert "expected a .pt, .json or .npy file" in result.stderr
        assert "global_physical_count" in result.stderr


def test_help_explains_the_sglang_dump_and_moe_layers() -> None:
    result = subprocess.run([sys.executable, "-m", "eplb.ctl", "plan", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for words in ("per_pass", "records", "global_physical_count", "last_physical_to_logical_map",
                  "expert_distribution_recorder_", "--moe-layers", "MoE layers only",
                  "dense layer never routes a token"):
        assert words in result.stdout, words


if __name__ == "__main__":  # python tests/test_offline_plan.py record DIR RANKS (child interpreter)
    _record_with_sglang(Path(sys.argv[2]), int(sys.argv[3]))
