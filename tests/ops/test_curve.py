"""CURVE on the sidecars' TCP link, on real processes: a follower with the right keys is served;
one whose key the leader does not know is refused (counted, logged) and never hears the leader."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from eplb.control_client import ControlError, control_call
from eplb.curve import CurveKeyError, load_keys
from eplb.demo.cluster import LocalCluster, http_get, wait_until


def make_keys(directory: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "eplb.ctl", "keys", str(directory)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(directory / f) for f in
                                   ("leader.key", "leader.key_secret", "node.key", "node.key_secret")]


def test_eplbctl_keys_writes_private_key_pairs_and_never_overwrites(tmp_path: Path) -> None:
    make_keys(tmp_path / "k")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "k" / "node.key_secret").stat().st_mode) == 0o600
    leader, node = load_keys(tmp_path / "k", leader=True), load_keys(tmp_path / "k", leader=False)
    assert node.leader_public == leader.public and leader.authorized == {node.public}
    proc = subprocess.run([sys.executable, "-m", "eplb.ctl", "keys", str(tmp_path / "k")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    with pytest.raises(CurveKeyError, match="eplbctl keys"):
        load_keys(tmp_path / "missing", leader=False)


def local_status(cluster: LocalCluster, node: int) -> dict:
    try:
        return control_call("status", {"local": True}, cluster.run_dir(node), timeout_s=2.0)
    except ControlError:
        return {}


def test_the_leader_serves_only_followers_with_an_authorized_key(tmp_path: Path) -> None:
    good, other = tmp_path / "good", tmp_path / "other"
    make_keys(good)
    make_keys(other)
    # node 2 knows the leader's public key but presents a key pair the leader never saw
    os.remove(other / "leader.key")
    shutil.copy(good / "leader.key", other / "leader.key")
    base = Path("/tmp") / f"eplbk-{os.getpid()}"
    with LocalCluster(3, ["--planner", "thread", "--node-timeout", "2"], base_dir=base) as cluster:
        cluster.start_sidecar(0, ["--curve-keys", str(good)])
        cluster.start_sidecar(1, ["--curve-keys", str(good)])
        cluster.start_sidecar(2, ["--curve-keys", str(other)])
        wait_until(lambda: local_status(cluster, 1).get("leader_last_seen_s") is not None, 60,
                   "node 1 hears the leader over CURVE")
        status = cluster.wait_for(lambda s: "1" in s["nodes"], 30, "node 1 joined the leader")
        url = cluster.http_address(0)
        wait_until(lambda: 'eplb_frames_rejected_total{reason="unauthenticated"}'
                   in (text := http_get(url + "/metrics")[1])
                   and 'eplb_frames_rejected_total{reason="unauthenticated"} 0.0' not in text,
                   30, "node 2's handshake refused and counted")
        status = cluster.status()
        assert set(status["nodes"]) == {"1"}, status["nodes"]
        assert status["leader"]["frames_rejected"]["unauthenticated"] >= 1
        assert local_status(cluster, 2)["leader_last_seen_s"] is None
        code, text = http_get(cluster.http_address(2) + "/readyz")
        assert code == 503 and "CURVE" in text
        log = (cluster.log_dir / "sidecar0.log").read_text()
        assert "unauthenticated" in log and "is not among the authorized keys" in log


def test_a_sidecar_with_unreadable_keys_stops_at_start_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "node.key_secret").write_text("not a certificate\n")
    proc = subprocess.run([sys.executable, "-m", "eplb.coordinator", "--node-rank", "1",
                           "--num-nodes", "2", "--leader", "tcp://127.0.0.1:1", "--http", "off",
                           "--run-dir", str(Path("/tmp") / f"eplbk2-{os.getpid()}"),
                           "--curve-keys", str(tmp_path / "k")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--curve-keys" in proc.stderr and "eplbctl keys" in proc.stderr, proc.stderr
