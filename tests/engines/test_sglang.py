"""The SGLang adapter against SGLang's own code (CPU, gloo; no GPU, no server).

The cluster test runs 2 real sidecars (2 nodes) x 2 worker processes (tests/engines/
sglang_worker.py): each worker holds a tiny model of 2 dense + 3 MoE layers (E=8 logical experts,
P=12 slots over 4 EP ranks) with SGLang's real ExpertLocationMetadata, dispatch and
expert-distribution recorder, and the adapter in it. One rebalance is forced through the sidecar;
every rank then checks its maps, weights, dispatch and counts against SGLang's own functions.
The other tests exercise the pieces in this process. How SGLang is imported here (and which
unrelated modules are stood in for): tests/engines/sglang_env.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # sglang_env, next to this file
import sglang_env  # noqa: E402

try:  # the dev setup installs SGLang's EPLB modules: missing, the tests fail, never skip
    sglang_env.import_sglang()
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"SGLang's EPLB modules cannot be imported ({exc}); ./dev test installs "
                      "them from requirements-engines.txt") from exc

from eplb.demo.cluster import LocalCluster, free_port, wait_until  # noqa: E402
from eplb.engines.sglang import (HOOK_TARGETS, CountingRecorder, SGLangMaps,  # noqa: E402
                                 metadata_builder, per_layer_fields, plugin)

WORLD, WORKERS_PER_NODE = 4, 2
WORKER = Path(__file__).with_name("sglang_worker.py")


# static dispatch (with an a2a backend: per-rank maps, logical_to_rank_dispatch_physical_map) and
# dynamic dispatch (no a2a backend: every replica listed, replica counts in _num_valid).
@pytest.mark.parametrize("counting, dispatch", [("select_experts", "static"), ("stat", "dynamic")])
def test_one_epoch_matches_sglangs_own_maps_weights_dispatch_and_counts(
        tmp_path: Path, counting: str, dispatch: str) -> None:
    base = Path("/tmp") / f"eplbsg-{os.getpid()}-{tmp_path.name[-10:]}"  # short ipc paths
    cluster = LocalCluster(WORLD // WORKERS_PER_NODE,
                           ["--interval", "1000000", "--window", "400", "--planner", "thread",
                            "--worker-timeout", "5", "--node-timeout", "5"], base_dir=base)
    outs = [base / f"out{rank}.json" for rank in range(WORLD)]
    with cluster:
        cluster.start()
        cluster.wait_ready(60.0)
        dist_init = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(WORLD):
            cluster.start_worker(
                ["--rank", str(rank), "--world", str(WORLD),
                 "--ranks-per-node", str(WORKERS_PER_NODE),
                 "--run-dir", str(cluster.run_dir(rank // WORKERS_PER_NODE)),
                 "--dist-init", dist_init, "--out", str(outs[rank]), "--counting", counting,
                 "--dispatch", dispatch],
                f"worker{rank}.log", command=[sys.executable, str(WORKER)])
        try:
            cluster.wait_for(lambda s: len(s["workers"]) == WORLD and s["min_step"] > 20, 60,
                             "all workers joined and stepping")
            record = cluster.commit_once()["history"][-1]
            wait_until(lambda: all(p.exists() for p in outs), 60, "every worker's results")
        except Exception:
            for rank in range(WORLD):
                log = cluster.log_dir / f"worker{rank}.log"
                print(f"--- worker {rank}\n" + (log.read_text()[-3000:] if log.exists() else ""))
            raise
        for worker in cluster.workers:
            worker.wait(30)
    results = [json.loads(p.read_text()) for p in outs]
    for r in results:
        assert r["ok"], (r.get("error"), r.get("traceback"))
    assert record["outcome"] == "committed"
    for r in results:
        assert r["moved_slots"] > 0  # the placement changed, so there was something to check
        # Every field of the live metadata equals SGLang's init_by_mapping of the new placement,
        # and no field was rebound (captured graphs and dispatch infos hold the tensors). On CPU
        # the *_cpu fields are the device tensors themselves; the maps test covers them apart.
        assert r["field_mismatches"] == [] and r["rebound_fields"] == []
        assert {"physical_to_logical_map", "physical_to_logical_map_cpu",
                "logical_to_all_physical_map", "logical_to_all_physical_map_cpu",
                "logical_to_all_physical_map_num_valid",
                "logical_to_rank_dispatch_physical_map"} <= set(r["fields_checked"])
        assert r["weights_vs_sglang"] == [] and r["weights_vs_truth"] == []
        assert r["dispatch_errors"] == []
        start, end = r["count_window"]
        assert end - start >= 6, r["counted_steps"]  # most of the 12 counted steps
        tiles = [tuple(t) for t in r["count_tiles"]]
        assert tiles[0][0] == start and tiles[-1][1] == end, tiles
        assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:])), tiles
        assert r["hook_logical"] == r["sglang_logical"] == r["truth_logical"]
        assert sum(map(sum, r["truth_logical"])) > 0


def _metadata(rank: int = 0):
    sglang_env.publish_runtime(rank, WORLD, nnodes=2, num_redundant=4)
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    return ExpertLocationMetadata.init_trivial(sglang_env.TinyModelConfig(), moe_ep_rank=rank)


def test_maps_switch_only_the_landed_layers_in_place_and_dense_rows_stay() -> None:
    import dataclasses
    live = _metadata(rank=1)
    # On CPU SGLang's *_cpu fields are the device tensors themselves (.cpu() of a CPU tensor);
    # separate copies, as on a GPU, show that each field is switched on its own.
    live = dataclasses.replace(
        live, physical_to_logical_map_cpu=live.physical_to_logical_map_cpu.clone(),
        logical_to_all_physical_map_cpu=live.logical_to_all_physical_map_cpu.clone())
    before = {name: t.clone() for name, t in per_layer_fields(live).items()}
    pointers = {name: t.data_ptr() for name, t in per_layer_fields(live).items()}
    moe = [2, 3, 4]
    new = live.physical_to_logical_map_cpu[moe].clone()
    new[:, 8:] = torch.tensor([4, 5, 6, 7])  # the redundant slots now replicate experts 4..7
    maps = SGLangMaps(live, moe, metadata_builder(sglang_env.TinyModelConfig(), 1), rank=1)
    maps.prepare(7, new)
    maps.apply(7, [1])  # MoE layer 1 = engine layer 3
    # The rows SGLang's constructor makes for the whole new placement (its static dispatch map
    # draws replicas from one seeded stream over all layers, so rows depend on earlier layers).
    full = live.physical_to_logical_map_cpu.clone()
    full[moe] = new
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    want = ExpertLocationMetadata.init_by_mapping(sglang_env.TinyModelConfig(), full, moe_ep_rank=1)
    for name, tensor in per_layer_fields(live).items():
        assert tensor.data_ptr() == pointers[name]
        assert torch.equal(tensor[3], getattr(want, name)[3]), name
        for layer in (0, 1, 2, 4):  # dense layers and MoE layers that did not land yet
            assert torch.equal(tensor[layer], before[name][layer]), (name, layer)
    assert not torch.equal(before["physical_to_logical_map"][3], full[3])
    with pytest.raises(RuntimeError, match="never prepared"):
        maps.apply(8, [0])


class _FakeHook:
    rank = 0

    def __init__(self) -> None:
        self.recorded: list[tuple[int, list]] = []
        self.added: list[torch.Tensor] = []

    def record(self, layer: int, ids: torch.Tensor, num_valid=None) -> None:
        self.recorded.append((layer, ids.tolist()))

    def add_counts(self, counts: torch.Tensor) -> None:
        self.added.append(counts.clone())


def test_counting_recorder_maps_engine_layers_to_moe_layers_and_keeps_sglangs_counts() -> None:
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    live = _metadata(rank=0)
    inner = ExpertDistributionRecorder.init_new(live, 0)
    hook = _FakeHook()
    rec = CountingRecorder(inner, hook, [2, 3, 4], counting="select_experts")
    inner.start_record()
    ids = torch.tensor([[0, 9], [-1, -1]])
    with rec.with_forward_pass(1, ForwardBatch()):
        for layer in range(5):
            with rec.with_current_layer(layer):
                rec.on_select_experts(topk_ids=ids)
    assert [layer for layer, _ in hook.recorded] == [0, 1, 2]  # engine layers 2, 3, 4
    assert inner.get_current_pass_count_buffer(0).tolist()[0] == 1  # SGLang counted it too
    stat = CountingRecorder(inner, hook, [2, 3, 4], counting="stat")
    with stat.with_forward_pass(2, ForwardBatch()):
        with stat.with_current_layer(3):
            stat.on_select_experts(topk_ids=ids)
    assert len(hook.added) == 1 and hook.added[0].shape == (3, 12)
    assert hook.added[0].sum().item() == 2 and hook.added[0][1, 9].item() == 1
    assert len(hook.recorded) == 3  # stat mode does not count twice
    assert stat.recording is inner.recording  # everything else goes to SGLang's recorder


def test_plugin_is_off_unless_asked_and_registers_sglangs_hooks(monkeypatch) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.delenv("EPLB_SIDECAR", raising=False)
    plugin()
    assert not HookRegistry._hooks
    monkeypatch.setenv("EPLB_SIDECAR", "1")
    plugin()
    registered = {target: [(kind, fn) for kind, fn, _ in hooks]
                  for target, hooks in HookRegistry._hooks.items()}
    assert registered == {target: [(HookType[kind], fn)]
                          for target, (kind, fn) in HOOK_TARGETS.items()}


def test_sglangs_plugin_loader_finds_the_entry_point_declared_in_pyproject(
        tmp_path: Path, monkeypatch) -> None:
    """The entry point as pyproject.toml declares it (written as setuptools writes it) is what
    SGLang's load_plugins() runs; the hooks are registered, not applied (applying patches
    SGLang's ModelRunner, which needs the whole server stack)."""
    import tomllib

    import sglang.srt.plugins as plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["sglang.srt.plugins"]
    assert declared == {"eplb": "eplb.engines.sglang:plugin"}
    info = tmp_path / "eplb_entry_probe-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eplb-entry-probe\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.setattr(HookRegistry, "apply_hooks", classmethod(lambda cls: None))
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.setenv("EPLB_SIDECAR", "1")
    plugins.load_plugins()
    assert set(HookRegistry._hooks) == set(HOOK_TARGETS)


class _Manager:
    """Stands in for SGLang's EPLBManager (``--enable-eplb``)."""

    def __init__(self) -> None:
        self.disabled: list[str] = []

    def disable_rebalance(self, reason: str) -> None:
        self.disabled.append(reason)


def _model_runner(rank: int):
    import types
    per_gpu = 3
    weights = {layer: [torch.zeros(per_gpu, 4), torch.zeros(per_gpu, 2, 2)] for layer in (2, 3, 4)}
    return types.SimpleNamespace(
        is_draft_worker=False, model=types.SimpleNamespace(routed_experts_weights_of_layer=weights),
        model_config=sglang_env.TinyModelConfig(), eplb_manager=_Manager(), forward_pass_id=41)


def test_install_on_a_model_runner_wraps_the_recorder_stops_sglangs_rebalancer_and_steps(
        tmp_path: Path, monkeypatch) -> None:
    import types

    from sglang.srt.eplb.expert_distribution import (ExpertDistributionRecorder,
                                                     get_global_expert_distribution_recorder,
                                                     set_global_expert_distribution_recorder)
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata
    from sglang.srt.runtime_context import get_parallel

    from eplb.engines import sglang as adapter_module
    from eplb.worker_hook.hook import WorkerHook
    live = _metadata(rank=1)
    set_global_expert_location_metadata(live, allow_overwrite=True)
    get_parallel().override_permanently(moe_ep_group=types.SimpleNamespace(device_group=None))
    sglangs = ExpertDistributionRecorder.init_new(live, 1)
    set_global_expert_distribution_recorder(sglangs)
    monkeypatch.setattr(WorkerHook, "wait_joined", lambda self, timeout: None)  # no sidecar here
    runner = _model_runner(rank=1)
    adapter = adapter_module.install(runner, run_dir=tmp_path / "run", join_timeout_s=1)
    try:
        assert runner._eplb_adapter is adapter and adapter.moe_layer_ids == [2, 3, 4]
        assert adapter.hook.count_ids == "physical" and adapter.hook.num_layers == 3
        assert torch.equal(adapter.hook.phys2log, live.physical_to_logical_map_cpu[2:])
        assert runner.eplb_manager.disabled  # SGLang's own rebalancer is off
        recorder = get_global_expert_distribution_recorder()
        assert isinstance(recorder, CountingRecorder) and recorder.inner is sglangs
        steps: list[int] = []
        monkeypatch.setattr(adapter.hook, "on_step", steps.append)
        adapter_module.before_forward(runner)
        assert steps == [42]  # the number ModelRunner.forward gives the pass
        replaced = ExpertDistributionRecorder.init_new(live, 1)
        set_global_expert_distribution_recorder(replaced)  # as SGLang does on some events
        adapter_module.before_forward(runner)
        assert get_global_expert_distribution_recorder().inner is replaced
        assert adapter_module.install(types.SimpleNamespace(is_draft_worker=True)) is None
    finally:
        adapter.close()
        set_global_expert_distribution_recorder(sglangs)


def test_install_refuses_a_server_without_a_logical_to_physical_map() -> None:
    from eplb.engines.sglang import SGLangAdapterError, install
    sglang_env.publish_runtime(0, WORLD, nnodes=2, num_redundant=4, dispatch=None)
    try:
        with pytest.raises(SGLangAdapterError, match="--ep-dispatch-algorithm dynamic"):
            install(_model_runner(rank=0))
    finally:
        sglang_env.publish_runtime(0, WORLD, nnodes=2, num_redundant=4)
