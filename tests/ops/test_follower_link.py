"""A follower whose link to the leader does not come up says why, once per cause, however often
libzmq retries (several times a second): the leader's host name does not resolve, nothing
accepts the connection, or its leader.key is not the leader's. Real sidecar processes; each test
waits (bounded) until the follower has seen many failed attempts, then counts the log lines. A
secret key file others can read is used, with a warning that says the chmod to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import zmq.auth

from eplb.control_client import ControlError, control_call
from eplb.demo.cluster import LocalCluster, free_port, wait_until

ATTEMPTS = 8  # failed attempts seen before the log is counted (libzmq retries every ~0.1-0.2 s)


def link(run_dir: Path) -> dict:
    try:
        return control_call("status", {"local": True}, run_dir, timeout_s=2.0)["peer_link"]
    except ControlError:
        return {}


def start_follower(base: Path, leader: str, *flags: str) -> tuple[subprocess.Popen, Path, Path]:
    base.mkdir(parents=True, exist_ok=True)
    run_dir, log_path = base / "run", base / "sidecar.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "eplb.coordinator", "--node-rank", "1",
                                 "--num-nodes", "2", "--leader", leader, "--run-dir", str(run_dir),
                                 "--http", "off", "--log-format", "human", *flags],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, run_dir, log_path


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def failed_attempts(run_dir: Path, at_least: int) -> dict:
    return wait_until(lambda: (l := link(run_dir)).get("failed_attempts", 0) >= at_least and l,
                      60, f"{at_least} failed attempts")


def test_an_unresolvable_leader_name_is_logged_once(tmp_path: Path) -> None:
    base = Path("/tmp") / f"eplbl-{os.getpid()}-dns"
    shutil.rmtree(base, ignore_errors=True)
    proc, run_dir, log_path = start_follower(base, "tcp://no-such-host.invalid:5555",
                                             "--insecure-plain-tcp")
    try:
        state = failed_attempts(run_dir, ATTEMPTS)
        assert state["link"].startswith("down: cannot resolve the leader's host name "
                                        "'no-such-host.invalid'"), state
        log = log_path.read_text()
        assert log.count("cannot resolve the leader's host name 'no-such-host.invalid'") == 1, log
        assert "not keeping up" not in log
        # readiness is local (a leader outage must not take the engines out of service); the
        # status says the leader is not reachable
        local = control_call("status", {"local": True}, run_dir)
        assert local["ready"] is True and local["leader_reachable"] is False, local
    finally:
        stop(proc)


def test_an_unreachable_leader_is_logged_once_and_the_recovery_too(tmp_path: Path) -> None:
    base = Path("/tmp") / f"eplbl-{os.getpid()}-unr"
    shutil.rmtree(base, ignore_errors=True)
    with LocalCluster(2, ["--planner", "thread", "--insecure-plain-tcp", "--log-format", "human"],
                      base_dir=base) as c:
        follower = c.start_sidecar(1)  # no leader yet: nothing listens on its port
        state = failed_attempts(c.run_dir(1), ATTEMPTS)
        assert state["link"].startswith("down: cannot connect to the leader at "), state
        log = (c.log_dir / "sidecar1.log").read_text()
        assert log.count("cannot connect to the leader at") == 1, log
        c.start_sidecar(0)
        c.wait_for(lambda s: "1" in s["nodes"], 60, "node 1 joined once the leader is up")
        wait_until(lambda: "connected to the leader at" in
                   (c.log_dir / "sidecar1.log").read_text(), 30, "the recovery logged")
        assert link(c.run_dir(1))["link"] == "up"
        assert (c.log_dir / "sidecar1.log").read_text().count("cannot connect to the leader") == 1
    # the cluster stops every sidecar it started, in whatever order (a follower started before
    # the leader once took the leader's slot, and outlived the test)
    assert follower.poll() is not None and c.sidecars[0].poll() is not None


def test_a_wrong_leader_key_is_logged_once(tmp_path: Path) -> None:
    base = Path("/tmp") / f"eplbl-{os.getpid()}-key"
    shutil.rmtree(base, ignore_errors=True)
    with LocalCluster(2, ["--planner", "thread", "--log-format", "human"], base_dir=base) as c:
        assert c.keys_dir is not None
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        shutil.copy(c.keys_dir / "node-1.key_secret", wrong / "node-1.key_secret")
        zmq.auth.create_certificates(str(tmp_path), "other")
        shutil.copy(tmp_path / "other.key", wrong / "leader.key")  # not the leader's public key
        c.start_sidecar(0)
        c.start_sidecar(1, ["--curve-keys", str(wrong)])
        # (attempts before the leader has bound its port fail as unreachable: another cause)
        state = wait_until(lambda: (l := link(c.run_dir(1))).get("handshake_failures", 0)
                           >= ATTEMPTS and l, 60, f"{ATTEMPTS} failed handshakes")
        assert "leader.key does not match" in state["link"], state
        log = (c.log_dir / "sidecar1.log").read_text()
        assert log.count("leader.key does not match") == 1, log
        assert "not keeping up" not in log
        assert c.status()["nodes"] == {}


def test_a_secret_key_others_can_read_is_used_with_a_warning(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "eplb.ctl", "keys", str(keys), "--nodes", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    secret = keys / "node-1.key_secret"
    secret.chmod(0o644)
    base = Path("/tmp") / f"eplbl-{os.getpid()}-mode"
    shutil.rmtree(base, ignore_errors=True)
    proc, run_dir, log_path = start_follower(base, f"tcp://127.0.0.1:{free_port()}",
                                             "--curve-keys", str(keys))
    try:
        wait_until(lambda: link(run_dir), 60, "the follower runs")
        log = log_path.read_text()
        assert (f"secret key {secret} (mode 0644) is readable by every user on this machine"
                in log), log
        assert f"run `chmod 600 {secret}`" in log
    finally:
        stop(proc)
    secret.chmod(0o600)  # private: no warning
    from eplb.curve import load_keys

    assert not load_keys(keys, 1, 2).warnings
    secret.chmod(0o640)  # this user's file, readable by its group
    assert "readable by its group" in " ".join(load_keys(keys, 1, 2).warnings)
