"""What /metrics and /readyz say on real sidecar processes: an unknown value is no sample (never
-1), no ``_created`` series, process metrics; readiness is local (a follower whose leader is down
stays ready, ``/readyz?leader=1`` and ``eplb_leader_reachable`` say the leader is gone); a
node-count mismatch (a rank >= --num-nodes, or the whole group joined through fewer nodes) is in
the status, a metric and a log line."""

from __future__ import annotations

import os
import signal
from pathlib import Path


from eplb.control_client import control_call
from eplb.demo.cluster import LocalCluster, http_get, scrape_metrics, wait_until
from eplb.worker_hook import WorkerHook

PATIENCE_S = 30.0


def samples(url: str) -> dict[str, float]:
    return scrape_metrics(url)


def local_status(run_dir: Path) -> dict:
    status = control_call("status", {"local": True}, run_dir, timeout_s=5.0)
    return status.get("leader", status)


def test_unknown_values_have_no_sample_and_there_are_no_created_series(daemon_factory) -> None:
    daemon = daemon_factory()
    url = daemon.url()
    got = samples(url)
    # no counts, no group, no measured rate, a leader: those series are absent, not -1
    for name in ("eplb_balancedness", "eplb_group_world_size", "eplb_decode_steps_per_second",
                 "eplb_leader_reachable", "eplb_leader_last_seen_seconds"):
        assert name not in got, name
    assert not any(k.startswith("eplb_last_rebalance_timestamp_seconds") for k in got)
    assert all(v >= 0 for k, v in got.items() if k.startswith("eplb_")), got
    assert not any("_created" in k for k in got), [k for k in got if "_created" in k]
    assert got["eplb_epoch_in_flight"] == 0 and got["eplb_rebalance_interval_steps"] == 1000
    assert got["eplb_num_nodes"] == 1 and got["eplb_node_count_mismatch"] == 0
    assert got["process_resident_memory_bytes"] > 0 and got["process_open_fds"] > 0
    assert any(k.startswith("python_info") for k in got)
    text = http_get(url + "/metrics")[1]
    assert "eplb_bytes_moved" not in text and "eplb_experts_moved" not in text
    assert "# TYPE eplb_moved_bytes_total counter" in text
    assert "# TYPE eplb_moved_slots_total counter" in text


def test_a_follower_stays_ready_while_the_leader_is_down(tmp_path: Path) -> None:
    base = Path("/tmp") / f"eplbr-{os.getpid()}"
    with LocalCluster(2, ["--planner", "thread", "--node-timeout", "1"], base_dir=base) as c:
        c.start()
        c.wait_ready(60)
        url = c.http_address(1)
        wait_until(lambda: http_get(url + "/readyz?leader=1")[0] == 200, PATIENCE_S,
                   "follower ready, leader included")
        assert samples(url)["eplb_leader_reachable"] == 1
        leader = c.sidecars[0]
        leader.send_signal(signal.SIGKILL)  # our own child, by its pid
        leader.wait(10)
        code, text = wait_until(lambda: (a := http_get(url + "/readyz?leader=1"))[0] == 503 and a,
                                PATIENCE_S, "the follower notices the leader is gone")
        assert "silent for" in text
        assert http_get(url + "/readyz")[0] == 200  # local readiness: the pod stays Ready
        got = wait_until(lambda: (m := samples(url))["eplb_leader_reachable"] == 0 and m,
                         PATIENCE_S, "eplb_leader_reachable 0")
        assert got["eplb_leader_last_seen_seconds"] > 1 and got["eplb_ready"] == 1
        status = local_status(c.run_dir(1))
        assert status["ready"] is True and status["leader_reachable"] is False


def test_a_rank_outside_num_nodes_is_reported_by_it_and_by_the_leader(tmp_path: Path) -> None:
    # plain TCP: with CURVE the leader refuses node 2's key (it authorizes node-1.key only), and
    # only node 2 itself can tell
    base = Path("/tmp") / f"eplbm-{os.getpid()}"
    with LocalCluster(2, ["--planner", "thread", "--node-timeout", "1", "--insecure-plain-tcp"],
                      base_dir=base) as c:
        c.start()
        c.wait_ready(60)
        extra = c.start_sidecar(2)  # --node-rank 2 --num-nodes 2: a replica too many
        url = wait_until(lambda: _http(c, 2), PATIENCE_S, "node 2 up")
        code, text = http_get(url + "/readyz")
        assert code == 503 and "node-count mismatch" in text and "outside --num-nodes 2" in text
        assert samples(url)["eplb_node_count_mismatch"] == 1
        assert "outside --num-nodes 2" in local_status(c.run_dir(2))["node_count_mismatch"]
        leader = c.http_address(0)
        wait_until(lambda: samples(leader)["eplb_node_count_mismatch"] == 1, PATIENCE_S,
                   "the leader reports node 2")
        assert "node(s) [2] say hello" in c.status()["leader"]["node_count_mismatch"]
        assert samples(c.http_address(1))["eplb_node_count_mismatch"] == 0
        for node in (0, 2):
            log = (c.log_dir / f"sidecar{node}.log").read_text()
            assert "node-count mismatch" in log and '"level": "ERROR"' in log, log[-2000:]
        extra.terminate()  # the replica goes: the leader's report clears
        assert extra.wait(30) == 0
        wait_until(lambda: samples(leader)["eplb_node_count_mismatch"] == 0, PATIENCE_S,
                   "the leader's report cleared")
        assert c.status()["leader"]["node_count_mismatch"] is None
        assert "node-count mismatch cleared" in (c.log_dir / "sidecar0.log").read_text()


def _http(c: LocalCluster, node: int) -> str | None:
    try:
        return c.http_address(node, timeout_s=1.0)
    except Exception:
        return None


def test_a_group_that_joined_through_fewer_nodes_is_reported(daemon_factory) -> None:
    daemon = daemon_factory(["--num-nodes", "2", "--insecure-plain-tcp"])
    url = daemon.url()
    assert samples(url)["eplb_node_count_mismatch"] == 0  # nobody joined yet: nothing to say
    hook = WorkerHook(0, 1, 2, 4, 4, node=0, run_dir=daemon.run_dir, flush_every=2)
    try:
        hook.wait_joined(30)
        wait_until(lambda: samples(url)["eplb_node_count_mismatch"] == 1, PATIENCE_S,
                   "mismatch reported")
        text = local_status(daemon.run_dir)["node_count_mismatch"]
        assert "joined through 1 node(s) [0] but --num-nodes is 2" in text
        assert "node-count mismatch" in daemon.log()
        assert http_get(url + "/readyz")[0] == 200  # the leader's own readiness is unaffected
    finally:
        hook.close()
