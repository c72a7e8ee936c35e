"""One sidecar fault must not cost the engine instance (issue 13): a real cluster (2 sidecar
processes x 2 demo worker processes, gloo copies) where the leader or the follower is killed at a
chosen phase of an epoch and restarted, as systemd would. Every promised worker must learn the
outcome the leader put on record, and every worker must go on serving one placement."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from eplb.control_client import control_call
from eplb.demo.cluster import LocalCluster, read_events, start_demo_cluster, wait_until
from eplb.placement.rules import default_placement, placement_hash

WORKERS_PER_NODE, WORLD = 2, 4
LAYERS, EXPERTS, PHYSICAL = 4, 16, 24  # the demo worker's defaults


def start_cluster(tmp_path: Path, frozen_rank: int, flags: list[str]) -> LocalCluster:
    base = Path("/tmp") / f"eplbf-{os.getpid()}-{tmp_path.name[-12:]}"  # short ipc paths
    return start_demo_cluster(base, WORLD, WORKERS_PER_NODE,
                              ["--max-retries", "0", "--worker-timeout", "30", *flags],
                              {frozen_rank: ["--delay-first-prepare"]})


def of_type(cluster: LocalCluster, rank: int, kind: str, epoch: int | None = None) -> list[dict]:
    """Rank ``rank``'s protocol events of type ``kind`` (of ``epoch`` only, when given)."""
    return [e for e in read_events(cluster.base_dir, rank)
            if e["type"] == kind and (epoch is None or e["epoch"] == epoch)]


def kill_and_restart(cluster: LocalCluster, node: int) -> None:
    cluster.sidecars[node].send_signal(signal.SIGKILL)
    cluster.sidecars[node].wait(10)
    cluster.start_sidecar(node)


def freeze_in_preparing(cluster: LocalCluster, frozen: int, tries: int = 3) -> int:
    """Force an epoch and freeze rank ``frozen`` right after its PLAN_ACK: every other rank
    promises (their decode loops then wait for the frozen rank in the per-step all-reduce; their
    hooks' socket threads go on). Returns the epoch.

    The rank logs the PLAN after its hook queued the PLAN_ACK, but ZeroMQ's I/O thread may not
    have written it when SIGSTOP lands (seen under load): the leader then aborts the epoch for
    want of that PLAN_ACK, and the rank is woken and the epoch forced again."""
    for _ in range(tries):
        plans = len(of_type(cluster, frozen, "PLAN"))
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        wait_until(lambda: len(of_type(cluster, frozen, "PLAN")) > plans, 30,
                   f"rank {frozen} got the PLAN", every_s=0.005)
        cluster.workers[frozen].send_signal(signal.SIGSTOP)
        status = cluster.wait_for(
            lambda s: s["epoch_in_flight"] is None
            or (s["epoch_in_flight"].get("phase") == "preparing"
                and s["epoch_in_flight"]["waiting_for"] == [frozen]),
            30, f"every rank but {frozen} promised, or the epoch aborted")
        if status["epoch_in_flight"] is not None:
            return status["epoch_in_flight"]["epoch"]
        reason = status["history"][-1]["reason"]
        assert f"no PLAN_ACK from ranks [{frozen}]" in reason, status["history"][-1]
        cluster.workers[frozen].send_signal(signal.SIGCONT)
    raise AssertionError(f"rank {frozen}'s PLAN_ACK was lost to SIGSTOP {tries} times in a row")


def commit_and_finish(cluster: LocalCluster) -> list[dict]:
    """Every rank rejoined; a forced rebalance commits; the workers stop and report."""
    cluster.wait_for(lambda s: s["workers"] == list(range(WORLD)) and not s["epoch_in_flight"],
                     60, "every rank in the group again")
    before = cluster.status()["counters"]["committed"]
    for _ in range(3):
        # Right after a stall the leader's view of the steps is stale and the decode rate it
        # measured low, so S may fall behind a rank, which then refuses (too late); with
        # --max-retries 0 the leader does not retry by itself, so the test forces again.
        started = cluster.status()["counters"]["started"]
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        status = cluster.wait_for(lambda s: s["counters"]["started"] > started
                                  and not s["epoch_in_flight"], 60, "the forced epoch ended")
        last = status["history"][-1]
        if last["outcome"] == "committed" or last["abort_code"] != "refused" \
                or "already at step" not in last["reason"]:
            break
    assert status["counters"]["committed"] > before, status["history"][-3:]
    assert not status["unsafe"], status["unsafe"]
    for w in cluster.workers:
        w.send_signal(signal.SIGTERM)
    for w in cluster.workers:
        w.wait(60)
    outs = [json.loads((cluster.base_dir / f"worker{r}.json").read_text()) for r in range(WORLD)]
    for out in outs:
        assert out["ok"] and out["weight_mismatches"] == 0 and "error" not in out, out
    assert len({placement_hash(torch.tensor(o["placement"])) for o in outs}) == 1
    assert placement_hash(torch.tensor(outs[0]["placement"])) == status["placement_hash"]
    return outs


def test_a_leader_killed_while_workers_promised_aborts_from_its_log_after_the_restart(
        tmp_path: Path) -> None:
    with start_cluster(tmp_path, 3, ["--promise-timeout", "60"]) as cluster:
        epoch = freeze_in_preparing(cluster, 3)
        kill_and_restart(cluster, 0)
        for rank in range(3):  # they held at S; they ask, the restarted leader answers
            aborts = wait_until(lambda r=rank: of_type(cluster, r, "ABORT", epoch), 30,
                                f"rank {rank} ABORT")
            assert "restarted" in aborts[0]["reason"], aborts
        cluster.workers[3].send_signal(signal.SIGCONT)  # it refuses the stale PREPARE, or asks
        wait_until(lambda: of_type(cluster, 3, "PREPARE", epoch), 30, "rank 3 read its PREPARE")
        assert not any(e["epoch"] == epoch for r in range(WORLD) for e in of_type(cluster, r, "COMMIT"))
        outs = commit_and_finish(cluster)
        assert placement_hash(torch.tensor(outs[0]["placement"])) != \
            placement_hash(default_placement(LAYERS, EXPERTS, PHYSICAL))


def test_a_follower_killed_while_its_workers_promised_delivers_the_abort_after_its_restart(
        tmp_path: Path) -> None:
    with start_cluster(tmp_path, 1, ["--promise-timeout", "60", "--node-timeout", "2"]) as cluster:
        epoch = freeze_in_preparing(cluster, 1)
        cluster.sidecars[1].send_signal(signal.SIGKILL)
        cluster.sidecars[1].wait(10)
        status = cluster.wait_for(lambda s: not s["epoch_in_flight"], 30, "the leader aborted")
        assert status["history"][-1]["outcome"] == "aborted" and not status["unsafe"]
        assert not of_type(cluster, 2, "ABORT", epoch) and not of_type(cluster, 3, "ABORT", epoch)
        cluster.start_sidecar(1)
        for rank in (2, 3):  # they rejoin and ask; the leader's record answers
            wait_until(lambda r=rank: of_type(cluster, r, "ABORT", epoch), 30, f"rank {rank} ABORT")
        cluster.workers[1].send_signal(signal.SIGCONT)
        wait_until(lambda: of_type(cluster, 1, "ABORT", epoch), 30, "rank 1 ABORT after it wakes")
        commit_and_finish(cluster)


def test_a_follower_killed_after_commit_is_waited_for_and_the_epoch_succeeds(tmp_path: Path) -> None:
    # A wide margin puts S a second or so after COMMIT; the follower dies once rank 3 has the
    # COMMIT and before any rank reaches S. The leader must wait (silence is not evidence), the
    # restarted follower's ranks rejoin and report DONE, and nobody is declared unsafe.
    with start_cluster(tmp_path, 3, ["--min-margin", "400", "--node-timeout", "2"]) as cluster:
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        wait_until(lambda: of_type(cluster, 3, "COMMIT"), 60, "rank 3 got the COMMIT",
                   every_s=0.005)
        kill_and_restart(cluster, 1)
        status = cluster.wait_for(lambda s: s["counters"]["committed"] >= 1
                                  and not s["epoch_in_flight"], 60, "the epoch succeeded")
        assert not status["unsafe"] and status["counters"]["failed"] == 0, status
        assert status["history"][-1]["outcome"] == "committed"
        commit_and_finish(cluster)
