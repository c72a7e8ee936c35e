"""Real sidecar processes and real worker processes (gloo, real weight copies) on one machine.

Each test starts 2 sidecars (as 2 nodes) x 2 workers with ``eplb.demo.worker`` and steers the
leader through its control socket. Rebalances only start when a test asks (huge --interval).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from eplb.control_client import control_call
from eplb.demo.cluster import LocalCluster, read_events, start_demo_cluster
from eplb.placement.rules import placement_hash

WORKERS_PER_NODE = 2
WORLD = 4


def start_cluster(tmp_path: Path, worker_flags: dict[int, list[str]] | None = None,
                  sidecar_flags: list[str] | None = None) -> LocalCluster:
    base = Path("/tmp") / f"eplbt-{os.getpid()}-{tmp_path.name[-12:]}"  # short ipc paths
    return start_demo_cluster(base, WORLD, WORKERS_PER_NODE, sidecar_flags, worker_flags)


def events(cluster: LocalCluster, rank: int) -> list[dict]:
    return read_events(cluster.base_dir, rank)


def results(cluster: LocalCluster) -> list[dict]:
    """Ask every worker to stop (they agree on the last step) and read what they measured."""
    for w in cluster.workers:
        w.send_signal(signal.SIGTERM)
    for w in cluster.workers:
        w.wait(60)
    return [json.loads((cluster.base_dir / f"worker{r}.json").read_text()) for r in range(WORLD)]


def committed(status: dict) -> list[dict]:
    return [r for r in status["history"] if r["outcome"] == "committed"]


def assert_switched_together(cluster: LocalCluster, status: dict, outs: list[dict]) -> None:
    """Invariant I1 on real processes: every worker ran its first copy of each committed epoch at
    that epoch's S, and its weights matched the new placement at every switch."""
    for record in committed(status):
        s = record["switch_step"]
        for rank in range(WORLD):
            commits = [e for e in events(cluster, rank) if e["type"] == "COMMIT"
                       and e["epoch"] == record["epoch"]]
            assert len(commits) == 1 and commits[0]["step"] == s, (rank, commits)
            copies = [c for c in outs[rank]["copy_steps"] if c["step"] >= s]
            assert copies and copies[0]["step"] == s, f"rank {rank} first copied at {copies[:1]}, S={s}"
            # CopyExecutor starts transfers a step ahead: chunk i goes out at S + i and lands
            # (its layers switch) at S + i + 1, so S only starts and the last step only lands.
            run = [c for i, c in enumerate(copies) if c["step"] == s + i]  # this epoch's steps
            assert run[0]["kinds"] == ["start"] and run[-1]["kinds"] == ["land"], run
            assert len(run) >= 2 and all(c["kinds"] == ["land", "start"] for c in run[1:-1]), run
    for out in outs:
        assert out["ok"], out
        assert out["weight_mismatches"] == 0 and out["weight_checks"] > 0


@pytest.mark.parametrize("relay", ["per node", "per worker"])
def test_forced_rebalance_commits_and_every_worker_switches_at_S(tmp_path: Path, relay: str) -> None:
    # The deepseek policy, hierarchical here: 4 expert groups over the 2 nodes.
    flags = ["--policy", "deepseek", "--num-groups", "4"]
    flags += ["--per-worker-relay"] if relay == "per worker" else []
    with start_cluster(tmp_path, sidecar_flags=flags) as cluster:
        local = control_call("status", {"local": True}, cluster.run_dir(1))
        assert local["relay"] == relay, local
        control_call("rebalance", {"force": True}, cluster.run_dir(1))  # through the follower
        status = cluster.wait_for(lambda s: s["counters"]["committed"] >= 1, 60, "epoch committed")
        record = committed(status)[0]
        assert record["balancedness_predicted"] > record["balancedness_before"]
        assert record["switch_step"] >= 2
        leader_hash = cluster.status()["placement_hash"]  # adopted after every DONE
        outs = results(cluster)
        assert_switched_together(cluster, status, outs)
        assert {placement_hash(torch.tensor(o["placement"])) for o in outs} == {leader_hash}


def test_a_worker_past_S_forces_abort_then_a_retry_commits(tmp_path: Path) -> None:
    with start_cluster(tmp_path, worker_flags={3: ["--delay-first-prepare"]},
                       sidecar_flags=["--max-retries", "3"]) as cluster:
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        status = cluster.wait_for(lambda s: s["counters"]["committed"] >= 1, 90, "retry committed")
        history = status["history"]
        aborted = [r for r in history if r["outcome"] == "aborted"]
        assert aborted, history
        assert "rank 3 refused" in aborted[0]["reason"] and ">= S=" in aborted[0]["reason"]
        retry = committed(status)[0]
        assert retry["epoch"] == aborted[0]["epoch"] + 1
        assert retry["margin"] > aborted[0]["margin"]
        for rank in range(WORLD):  # every survivor heard the abort, with its reason
            aborts = [e for e in events(cluster, rank) if e["type"] == "ABORT"]
            assert aborts and "rank 3 refused" in aborts[0]["reason"]
        outs = results(cluster)
        assert_switched_together(cluster, status, outs)


def test_killed_worker_mid_epoch_aborts_on_every_survivor(tmp_path: Path) -> None:
    # Without lockstep, so that the kill fails no collective of the survivors: what is tested is
    # the agreement's reaction, not gloo's.
    free = ["--no-lockstep"]
    with start_cluster(tmp_path, worker_flags={r: free for r in range(WORLD)}) as cluster:
        victim = cluster.workers[3]
        victim.send_signal(signal.SIGSTOP)  # it can no longer answer; the others still can
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        cluster.wait_for(lambda s: (s["epoch_in_flight"] or {}).get("waiting_for") == [3], 30,
                         "epoch waiting for rank 3")
        victim.kill()
        status = cluster.wait_for(lambda s: s["counters"]["aborted"] >= 1, 30, "epoch aborted")
        reason = status["history"][-1]["reason"]
        assert "rank 3" in reason, reason
        assert status["counters"]["committed"] == 0 and 3 not in status["workers"]
        for rank in range(3):
            aborts = [e for e in events(cluster, rank) if e["type"] == "ABORT"]
            assert aborts and "rank 3" in aborts[0]["reason"], (rank, aborts)
            assert not [e for e in events(cluster, rank) if e["type"] == "COMMIT"]
        # The group is incomplete now: no new epoch may start.
        with pytest.raises(Exception, match="only 3 of 4 ranks have joined"):
            control_call("rebalance", {"force": True}, cluster.run_dir(0))


def test_killed_follower_sidecar_mid_epoch_aborts_with_reason(tmp_path: Path) -> None:
    free = ["--no-lockstep"]
    with start_cluster(tmp_path, worker_flags={r: free for r in range(WORLD)}) as cluster:
        follower = cluster.sidecars[1]
        follower.send_signal(signal.SIGSTOP)
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        cluster.wait_for(lambda s: (s["epoch_in_flight"] or {}).get("waiting_for") == [2, 3], 30,
                         "epoch waiting for node 1's ranks")
        follower.kill()
        status = cluster.wait_for(lambda s: s["counters"]["aborted"] >= 1, 30, "epoch aborted")
        reason = status["history"][-1]["reason"]
        assert "node 1 lost" in reason, reason
        for rank in (0, 1):
            aborts = [e for e in events(cluster, rank) if e["type"] == "ABORT"]
            assert aborts and "node 1 lost" in aborts[0]["reason"], (rank, aborts)
        assert "1" not in status["nodes"]
        # Node 1's workers never got the PLAN, so nothing holds them: they keep stepping.
        assert all(not [e for e in events(cluster, r) if e["type"] in ("PLAN", "PREPARE")]
                   for r in (2, 3))
        outs = results(cluster)
        assert all(o["ok"] and o["steps"] > 0 for o in outs), outs
