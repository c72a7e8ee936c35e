"""The vLLM adapter against vLLM's own EPLB code: 2 real sidecars x 2 worker processes (gloo),
one epoch forced through the leader, then every rank compares its state with what vLLM's own
updaters make of the same old state and new placement (see ``vllm_worker.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:  # found, not imported: the workers import it
    raise ImportError("vLLM is not installed; ./dev test installs its EPLB code from "
                      "requirements-engines.txt (the tests fail rather than skip without it)")

from eplb.placement.planner import PlannerSpec  # noqa: E402
from eplb.demo.cluster import LocalCluster, free_port  # noqa: E402
from eplb.engines.vllm import merge_load_files  # noqa: E402
from eplb.offline_plan import plan_offline, read_load, read_placement  # noqa: E402
from eplb.placement.rules import placement_hash  # noqa: E402

WORKER = Path(__file__).with_name("vllm_worker.py")
REPO = Path(__file__).resolve().parents[2]
WORLD, PER_NODE = 4, 2
LAYERS, EXPERTS, PHYSICAL = 3, 8, 12


def test_sidecar_epoch_matches_vllm_maps_weights_and_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers import this checkout's eplb (and find vllm_stubs next to their script).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    base = Path("/tmp") / f"eplbv-{os.getpid()}-{tmp_path.name[-8:]}"  # short ipc paths
    stop = base / "stop"
    with LocalCluster(WORLD // PER_NODE, ["--interval", "1000000", "--window", "100000",
                                          "--planner", "thread", "--worker-timeout", "10",
                                          "--node-timeout", "10"], base_dir=base) as cluster:
        cluster.start()
        cluster.wait_ready(30)
        dist_init = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(WORLD):
            cluster.start_worker(
                ["--rank", str(rank), "--world-size", str(WORLD),
                 "--run-dir", str(cluster.run_dir(rank // PER_NODE)),
                 "--dist-init", dist_init, "--stop-file", str(stop),
                 "--result", str(base / f"result{rank}.json"),
                 "--export", str(base / f"load{rank}.pt")],
                f"worker{rank}.log", command=[sys.executable, str(WORKER)])
        try:
            cluster.wait_for(lambda s: len(s["workers"]) == WORLD and s["min_step"] > 20, 60,
                             "all vLLM workers joined and stepping")
            # Committed = every rank reported its copies done; the leader adopted the plan.
            leader_hash = cluster.commit_once()["placement_hash"]
        finally:
            stop.touch()  # the workers vote to stop together, then check against vLLM
            for proc in cluster.workers:
                proc.wait(60)
        results = [json.loads((base / f"result{r}.json").read_text()) for r in range(WORLD)]

    logs = cluster.log_dir
    for r, out in enumerate(results):
        assert out["ok"], f"rank {r}: {out.get('error')} (see {logs / f'worker{r}.log'})"
        assert out["placement_changed"] and placement_hash(torch.tensor(out["placement"])) \
            == leader_hash, r
        assert out["maps"] == {"physical_to_logical_map": True, "logical_to_physical_map": True,
                               "logical_replica_count": True}, (r, out["maps"])
        assert out["maps_in_place"] and out["layer_views_follow"], r
        assert out["l2p_shape"] == [LAYERS, EXPERTS, PHYSICAL - EXPERTS + 1]  # vLLM's padding
        assert out["weights_equal"], r
        assert out["expert_load_pass_zeroed"] and out["should_record"], r
        assert out["reports"] > 0 and out["count_mismatches"] == [], (r, out["count_mismatches"])
        # The export is what eplbctl plan reads, and holds every counted pass.
        export = base / f"load{r}.pt"
        assert read_load(export).to(torch.int64).tolist() == out["expected_total"], r
        assert read_placement(export).tolist() == out["placement"], r
    assert any(out["weights_moved"] for out in results)

    merged = merge_load_files([base / f"load{r}.pt" for r in range(WORLD)], base / "load.pt")
    summary = plan_offline(merged, PHYSICAL, WORLD, PlannerSpec(), current_path=merged)
    assert summary["layers"] == LAYERS and summary["experts"] == EXPERTS
    shutil.rmtree(base, ignore_errors=True)  # kept for the logs when an assertion failed


def test_plugin_is_declared_and_off_without_env(tmp_path: Path) -> None:
    """pyproject declares the vllm.general_plugins entry point; without EPLB_SIDECAR=1 the
    entry point leaves vLLM's EplbState as it is (run apart: the stubs stay out of pytest)."""
    import subprocess
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    plugins = meta["project"]["entry-points"]["vllm.general_plugins"]
    assert plugins == {"eplb_sidecar": "eplb.engines.vllm:register"}
    check = ("import vllm_stubs; vllm_stubs.install()\n"
             "from eplb.engines.vllm import register\n"
             "from vllm.distributed.eplb.eplb_state import EplbState\n"
             "step, add_model = EplbState.step, EplbState.add_model\n"
             "register()\n"
             "assert (EplbState.step, EplbState.add_model) == (step, add_model)\n"
             "import os; os.environ['EPLB_SIDECAR'] = '1'; register(); register()\n"
             "assert EplbState.step is not step and EplbState._eplb_sidecar_patched\n")
    env = {k: v for k, v in os.environ.items() if k != "EPLB_SIDECAR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(WORKER.parent)])
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
