"""Operating a real cluster (2 sidecar processes x 2 demo worker processes, gloo copies):
/metrics moves across a committed epoch, and SIGTERM to the leader mid-epoch leaves every worker
consistent: an epoch before COMMIT is aborted on every worker, a committed one is never aborted
and every worker switches."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import zmq

from eplb.control_client import control_call
from eplb.coordinator.leader import SHUTDOWN_REASON
from eplb.demo.cluster import (LocalCluster, read_events, scrape_metrics,
                               start_demo_cluster, wait_until)
from eplb.paths import control_endpoint
from eplb.placement.rules import default_placement, placement_hash

WORKERS_PER_NODE, WORLD = 2, 4
LAYERS, EXPERTS, PHYSICAL = 4, 16, 24  # the demo worker's defaults


def start_cluster(tmp_path: Path, worker_flags: dict[int, list[str]] | None = None,
                  sidecar_flags: list[str] | None = None) -> LocalCluster:
    base = Path("/tmp") / f"eplbc-{os.getpid()}-{tmp_path.name[-12:]}"  # short ipc paths
    return start_demo_cluster(base, WORLD, WORKERS_PER_NODE, sidecar_flags, worker_flags)


def events(cluster: LocalCluster, rank: int) -> list[dict]:
    return read_events(cluster.base_dir, rank)


def of_type(cluster: LocalCluster, rank: int, kind: str) -> list[dict]:
    return [e for e in events(cluster, rank) if e["type"] == kind]


def results(cluster: LocalCluster, stop: bool = True) -> list[dict]:
    """Stop the workers (they agree on the last step over gloo), or with ``stop`` False wait for
    them to finish their --steps, and read what they measured."""
    if stop:
        for w in cluster.workers:
            w.send_signal(signal.SIGTERM)
    for w in cluster.workers:
        w.wait(60)
    return [json.loads((cluster.base_dir / f"worker{r}.json").read_text()) for r in range(WORLD)]


def scrape(url: str) -> dict[str, float]:
    return scrape_metrics(url)


def test_metrics_move_across_a_real_committed_epoch(tmp_path: Path) -> None:
    with start_cluster(tmp_path) as cluster:
        leader, follower = cluster.http_address(0), cluster.http_address(1)
        before = scrape(leader)
        assert before["eplb_epochs_committed_total"] == 0 and before["eplb_moved_bytes_total"] == 0
        # a malformed frame on the leader's control socket is counted by reason
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(control_endpoint(cluster.run_dir(0)))
        sock.send(b"\x01not msgpack")
        assert sock.poll(10_000), "no answer to a bad control frame"
        sock.close()

        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        status = cluster.wait_for(lambda s: s["counters"]["committed"] >= 1, 60, "epoch committed")
        record = next(r for r in status["history"] if r["outcome"] == "committed")
        assert record["bytes_received"] > 0
        after = wait_until(lambda: (m := scrape(leader))["eplb_epochs_committed_total"] >= 1
                           and 'eplb_layer_balancedness{layer="0"}' in m
                           and "eplb_decode_steps_per_second" in m and m, 15,  # after 1 s of steps
                           "metrics updated")
        assert after["eplb_epochs_started_total"] >= 1
        assert after["eplb_epochs_committed_total"] == status["counters"]["committed"]
        assert after["eplb_moved_bytes_total"] == sum(r["bytes_received"] for r in status["history"])
        assert after["eplb_moved_slots_total"] == record["experts_moved"] > 0
        assert after["eplb_plan_seconds_count"] >= 1 and after["eplb_plan_seconds_sum"] > 0
        assert after["eplb_agreement_seconds_count"] == 1
        assert abs(after["eplb_agreement_seconds_sum"] - record["agreement_ms"] / 1e3) < 1e-6
        assert after['eplb_frames_rejected_total{reason="malformed"}'] >= 1
        assert after["eplb_group_workers_joined"] == WORLD and after["eplb_workers_connected"] == 2
        assert 0 < after["eplb_balancedness"] <= 1
        assert all(0 < after[f'eplb_layer_balancedness{{layer="{layer}"}}'] <= 1
                   for layer in range(LAYERS))
        assert after["eplb_ready"] == 1
        assert after["eplb_epoch_in_flight"] == 0 and after["eplb_node_count_mismatch"] == 0
        assert after["eplb_decode_steps_per_second"] > 0 and after["eplb_num_nodes"] == 2
        assert 0 < time.time() - after['eplb_last_rebalance_timestamp_seconds{outcome="committed"}'] < 60
        assert not any(k.endswith("_created") or k.startswith("eplb_leader_") for k in after)
        assert after["process_resident_memory_bytes"] > 0
        on_follower = scrape(follower)
        assert on_follower["eplb_workers_connected"] == 2 and on_follower["eplb_ready"] == 1
        assert 0 <= on_follower["eplb_leader_last_seen_seconds"] < 2
        assert on_follower["eplb_leader_reachable"] == 1
        assert "eplb_balancedness" not in on_follower and "eplb_epoch_in_flight" not in on_follower
        assert on_follower['eplb_sidecar_info{node="1",role="follower",version="0.1.0"}'] == 1
        outs = results(cluster)
        assert all(o["ok"] and o["weight_mismatches"] == 0 for o in outs), outs


def sigterm_leader(cluster: LocalCluster, grace_s: float) -> float:
    """SIGTERM the leader; returns how long it took to exit, after checking it exited with 0."""
    leader = cluster.sidecars[0]
    started = time.monotonic()
    leader.send_signal(signal.SIGTERM)
    code = leader.wait(grace_s + 5)
    took = time.monotonic() - started
    log = (cluster.log_dir / "sidecar0.log").read_text()
    assert code == 0, log
    assert took < grace_s, (took, log)
    return took


def leader_log(cluster: LocalCluster) -> list[dict]:
    lines = (cluster.log_dir / "sidecar0.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_sigterm_to_the_leader_while_workers_promised_aborts_the_epoch_everywhere(
        tmp_path: Path) -> None:
    # Rank 3 acks the PLAN, then its socket thread dawdles (--delay-first-prepare); we freeze it
    # there so the epoch stays in PREPARING with ranks 0-2 promised (and held at S). A long
    # --worker-timeout keeps the frozen rank in the group on a slow machine.
    with start_cluster(tmp_path, worker_flags={3: ["--delay-first-prepare"]},
                       sidecar_flags=["--promise-timeout", "60", "--max-retries", "0",
                                      "--worker-timeout", "30", "--grace-period", "5"]) as cluster:
        victim = cluster.workers[3]
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        wait_until(lambda: of_type(cluster, 3, "PLAN"), 30, "rank 3 got the PLAN", every_s=0.005)
        victim.send_signal(signal.SIGSTOP)
        status = cluster.wait_for(lambda s: (s["epoch_in_flight"] or {}).get("phase") == "preparing"
                                  and s["epoch_in_flight"]["waiting_for"] == [3], 30,
                                  "ranks 0-2 promised, rank 3 frozen")
        epoch = status["epoch_in_flight"]["epoch"]
        for rank in range(3):
            assert of_type(cluster, rank, "PREPARE"), rank
        sigterm_leader(cluster, grace_s=5)
        for rank in range(3):  # node 0's ranks directly, node 1's through the follower
            aborts = wait_until(lambda r=rank: of_type(cluster, r, "ABORT"), 10, f"rank {rank} ABORT")
            assert [{k: v for k, v in a.items() if k != "t"} for a in aborts] == [
                {"type": "ABORT", "epoch": epoch, "at_step": aborts[0]["at_step"], "step": None,
                 "reason": SHUTDOWN_REASON}]
        victim.send_signal(signal.SIGCONT)
        wait_until(lambda: of_type(cluster, 3, "ABORT"), 10, "rank 3 ABORT after it wakes")
        assert of_type(cluster, 3, "ABORT")[0]["reason"] == SHUTDOWN_REASON
        assert not any(of_type(cluster, r, "COMMIT") for r in range(WORLD))
        assert any(e.get("epoch") == epoch and e.get("phase") == "preparing"
                   and "aborting" in e["msg"] for e in leader_log(cluster))
        outs = results(cluster)  # every worker goes on, on the old placement, weights intact
        initial = placement_hash(default_placement(LAYERS, EXPERTS, PHYSICAL))
        for out in outs:
            assert out["ok"] and out["weight_mismatches"] == 0 and not out["copy_steps"], out
            assert placement_hash(torch.tensor(out["placement"])) == initial


def test_sigterm_to_the_leader_after_commit_never_aborts_and_every_worker_switches(
        tmp_path: Path) -> None:
    # A wide margin puts S a second or so after COMMIT; rank 3 is frozen once it has the COMMIT,
    # so the epoch is COMMITTED (no DONE yet) when the leader is told to stop. The workers run
    # 1500 steps, well past S, and stop by themselves: with the leader gone, that is how the test
    # knows they went through S.
    steps = {r: ["--steps", "1500"] for r in range(WORLD)}
    with start_cluster(tmp_path, worker_flags=steps,
                       sidecar_flags=["--min-margin", "300", "--worker-timeout", "30",
                                      "--grace-period", "5"]) as cluster:
        victim = cluster.workers[3]
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        wait_until(lambda: of_type(cluster, 3, "COMMIT"), 60, "rank 3 got the COMMIT",
                   every_s=0.005)
        victim.send_signal(signal.SIGSTOP)
        status = cluster.wait_for(lambda s: (s["epoch_in_flight"] or {}).get("phase") == "committed",
                                  10, "epoch committed, DONE outstanding")
        epoch, switch = status["epoch_in_flight"]["epoch"], status["epoch_in_flight"]["switch_step"]
        assert 3 in status["epoch_in_flight"]["waiting_for"]
        sigterm_leader(cluster, grace_s=5)
        assert any(e.get("epoch") == epoch and "not aborted" in e["msg"]
                   for e in leader_log(cluster))
        victim.send_signal(signal.SIGCONT)
        outs = results(cluster, stop=False)
        assert switch + 4 < 1500 and all(o["steps"] == 1500 for o in outs), outs
        assert not any(of_type(cluster, r, "ABORT") for r in range(WORLD))
        for rank, out in enumerate(outs):
            assert out["ok"] and out["weight_mismatches"] == 0 and out["weight_checks"] > 0, out
            assert out["copy_steps"][0]["step"] == switch, (rank, out["copy_steps"])
        assert len({placement_hash(torch.tensor(o["placement"])) for o in outs}) == 1
        assert placement_hash(torch.tensor(outs[0]["placement"])) != \
            placement_hash(default_placement(LAYERS, EXPERTS, PHYSICAL))
