"""``eplbctl`` as an operator meets it, against real sidecar and worker processes: rebalance waits
for the outcome and its exit code says which; status in words, --watch until Ctrl-C; history
--plot; messages, not tracebacks, when the sidecar cannot be reached or read."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eplb.control_client import control_call
from eplb.ctl import (EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_SKIPPED, EXIT_TIMEOUT,
                      EXIT_UNREACHABLE)
from eplb.demo.cluster import start_demo_cluster

REPO = Path(__file__).resolve().parents[2]


def eplbctl(run_dir: Path, *args: str, timeout_s: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eplb.ctl", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})


def no_traceback(out: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_rebalance_waits_for_the_outcome_and_its_exit_code_says_which(tmp_path: Path) -> None:
    # --min-gain 1: an unforced plan is always skipped; --ack-timeout 1: a frozen rank makes each
    # epoch abort after a second (3 retries, then the outcome); --worker-timeout 60 keeps it in
    # the group.
    base = Path("/tmp") / f"eplbctl-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    flags = ["--min-gain", "1", "--ack-timeout", "1", "--worker-timeout", "60"]
    with start_demo_cluster(base, 4, 2, sidecar_flags=flags) as cluster:
        leader, follower = cluster.run_dir(0), cluster.run_dir(1)

        # a frozen rank never acks the PLAN: no outcome within 0.3 s (the ack timeout is 1 s)...
        victim = cluster.workers[3]
        victim.send_signal(signal.SIGSTOP)
        try:
            out = eplbctl(leader, "rebalance", "--force", "--timeout", "0.3")
            no_traceback(out)
            assert out.returncode == EXIT_TIMEOUT, out.stdout + out.stderr
            assert "no outcome within 0.3s" in out.stderr
            cluster.wait_for(lambda s: s["epoch_in_flight"] is None and not s["planning"], 30,
                             "the epoch ended")
            # ... and aborts after the ack timeout, each retry too: exit 4 with the reason
            out = eplbctl(leader, "rebalance", "--force")
            no_traceback(out)
            assert out.returncode == EXIT_FAILED, out.stdout + out.stderr
            lines = out.stdout.splitlines()
            assert len(lines) == 4 and all(line.startswith("retried after: epoch ")
                                           for line in lines[:3]), out.stdout
            assert re.fullmatch(r"epoch \d+ aborted \(forced\) at step \d+: .+", lines[3]), lines
        finally:
            victim.send_signal(signal.SIGCONT)

        out = eplbctl(follower, "rebalance", "--force")  # through the follower
        no_traceback(out)
        assert out.returncode == EXIT_OK, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        lines = [line for line in lines if not line.startswith("retried after: ")]
        assert re.fullmatch(r"epoch \d+ committed \(forced\)", lines[0]), out.stdout
        assert lines[1].startswith("  switch step S: ") and int(lines[1].split()[-1]) > 0
        assert lines[2].startswith("  moved: ") and "slots" in lines[2] and "bytes" in lines[2]
        assert "before" in lines[3] and "predicted after" in lines[3] and "observed" in lines[3]
        log = (cluster.log_dir / "sidecar0.log").read_text()
        assert "rebalance (forced) requested by eplbctl (user" in log and "via node 1" in log

        out = eplbctl(leader, "rebalance")  # below --min-gain 1, always
        no_traceback(out)
        assert out.returncode == EXIT_SKIPPED, out.stdout + out.stderr
        assert out.stdout.startswith("skipped at step "), out.stdout

        out = eplbctl(leader, "rebalance", "--force", "--no-wait")
        assert out.returncode == EXIT_OK and out.stdout.startswith("rebalance requested (forced)")
        request = int(out.stdout.split("(request ")[1].split(")")[0])
        cluster.wait_for(lambda s: any(r["request"] == request for r in s["history"])
                         and s["epoch_in_flight"] is None, 60, "the --no-wait rebalance ended")

        # status and history in words, and the plot
        out = eplbctl(follower, "status")
        no_traceback(out)
        assert out.returncode == EXIT_OK, out.stderr
        text = out.stdout
        for expected in ("node 1 of 2, follower", "leader: node 0 at tcp://127.0.0.1:",
                         "link to leader: up", "ranks joined: 4 of 4: 0-3",
                         "model: 4 layers, 16 experts, 24 slots (L, E, P)",
                         "epoch in flight: none", "recent attempts (newest last):",
                         " committed (forced): switched at step S=",
                         " aborted (forced) at step "):
            assert expected in text, (expected, text)
        assert "None" not in text and "[]" not in text and "?" not in text, text
        status = control_call("status", {}, leader)
        history = eplbctl(leader, "history", "--plot", str(tmp_path / "h.png"))
        no_traceback(history)
        assert history.returncode == EXIT_OK, history.stderr
        assert len(history.stdout.splitlines()) == len(status["history"]) >= 5
        assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "h.png").stat().st_size > 10_000


def test_a_refused_rebalance_and_a_status_with_nothing_joined_yet(daemon_factory) -> None:
    d = daemon_factory()
    d.url()
    out = eplbctl(d.run_dir, "rebalance")
    no_traceback(out)
    assert out.returncode == EXIT_REFUSED
    assert "not started: only 0 of an unknown number of ranks have joined" in out.stderr
    out = eplbctl(d.run_dir, "status")
    no_traceback(out)
    assert out.returncode == EXIT_OK, out.stderr
    assert "ranks joined: none yet" in out.stdout
    assert "model: not known yet: no worker joined" in out.stdout
    assert "node 0 of 1, leader" in out.stdout and "no rebalance attempted yet" in out.stdout
    assert "None" not in out.stdout and "[]" not in out.stdout and "?" not in out.stdout
    out = eplbctl(d.run_dir, "status", "--json")  # unchanged: the raw values
    assert out.returncode == EXIT_OK and '"world_size": null' in out.stdout
    assert "refused: only 0 of" in d.log()  # the leader logs who asked, and that it said no


def test_status_watch_refreshes_until_ctrl_c(daemon_factory) -> None:
    d = daemon_factory()
    d.url()
    proc = subprocess.Popen([sys.executable, "-m", "eplb.ctl", "--run-dir", str(d.run_dir),
                             "status", "--watch", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = 0
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while seen < 3 and time.monotonic() < deadline:  # readline returns as each line comes
            line = proc.stdout.readline()
            assert line, "eplbctl status --watch exited early"
            seen += "(Ctrl-C to stop)" in line
        assert seen == 3, "three refreshes"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == EXIT_OK and "Traceback" not in err, err


def test_unreachable_and_missing_sidecars_get_a_message_and_exit_2(daemon_factory,
                                                                    tmp_path: Path) -> None:
    out = eplbctl(tmp_path / "nothing", "status")
    no_traceback(out)
    assert out.returncode == EXIT_UNREACHABLE
    assert "no sidecar socket" in out.stderr and "--run-dir" in out.stderr
    d = daemon_factory()
    d.url()
    d.proc.kill()  # SIGKILL: the socket file stays, nothing answers on it
    d.proc.wait(10)
    out = eplbctl(d.run_dir, "--timeout", "1", "rebalance")
    no_traceback(out)
    assert out.returncode == EXIT_UNREACHABLE
    assert "no answer from the sidecar" in out.stderr and "is it running?" in out.stderr


def test_a_user_who_cannot_read_the_run_dir_gets_a_message(daemon_factory) -> None:
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run eplbctl as another user")
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp"}
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import eplb.ctl"],
                           capture_output=True, text=True, timeout=60, env=env, cwd="/tmp")
    if probe.returncode != 0:  # e.g. a clone made in a `mktemp -d` directory (mode 0700)
        pytest.skip(f"uid 65534 cannot run eplbctl from {REPO} with {sys.executable} (make the "
                    f"checkout and its venv readable to others, e.g. chmod 755 its parents): "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    d = daemon_factory()
    d.url()
    assert d.run_dir.stat().st_mode & 0o777 == 0o700
    for args in (["status"], ["rebalance"]):
        out = subprocess.run([*as_nobody, sys.executable, "-m", "eplb.ctl", "--run-dir",
                              str(d.run_dir), *args], capture_output=True, text=True, timeout=60,
                             env=env, cwd="/tmp")
        no_traceback(out)
        assert out.returncode == EXIT_UNREACHABLE, out.stderr
        assert f"permission denied: this user (uid 65534) cannot open the run directory " \
               f"{d.run_dir} (mode 0700, owner uid 0)" in out.stderr, out.stderr


def test_history_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path) -> None:
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    out = eplbctl(tmp_path / "nothing", "history", "--plot", str(tmp_path / "h.png"),
                  env={"PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])})
    no_traceback(out)
    assert out.returncode == EXIT_UNREACHABLE
    assert "pip install 'eplb-coordinator[plot]'" in out.stderr, out.stderr
    assert not (tmp_path / "h.png").exists()


def test_eplbctl_help_lists_the_exit_codes() -> None:
    out = subprocess.run([sys.executable, "-m", "eplb.ctl", "rebalance", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for code in ("0  done", "1  the sidecar refused", "2  bad usage", "3  rebalance: skipped",
                 "4  rebalance: aborted", "5  rebalance: no outcome within --timeout"):
        assert code in out.stdout, code
    assert "--no-wait" in out.stdout and "--timeout SECONDS" in out.stdout
    assert "Failed to initialize NumPy" not in out.stderr


def test_an_unsafe_instance_is_shown_first(monkeypatch) -> None:
    """Rendering only (an unsafe instance needs an epoch that failed after COMMIT): the leader's
    status as it answers, with ``unsafe`` set."""
    import argparse

    import eplb.ctl as ctl

    local = {"node": 0, "num_nodes": 1, "role": "leader", "pid": 1, "uptime_s": 5.0,
             "ready": False, "leader_address": "tcp://127.0.0.1:5555", "local_workers": [0, 1],
             "frames_rejected": {}, "http": None, "peer_link": {"security": "none (single node)"}}
    status = {"leader": local, "unsafe": "epoch 3: rank 1 reported a failed copy",
              "workers": [0, 1], "world_size": 2, "shape": [2, 4, 8], "min_step": 10,
              "max_step": 12, "steps_per_second": 3.0, "balancedness": 0.5,
              "placement_hash": "abc", "epoch_in_flight": None, "planning": False,
              "counters": {"failed": 1}, "next_trigger_step": 100, "nodes": {},
              "history": [{"epoch": 3, "outcome": "failed", "switch_step": 9,
                           "reason": "rank 1 reported a failed copy"}]}
    monkeypatch.setattr(ctl, "_call", lambda args, op, call_args, timeout_s=None: status)
    code, text = ctl.status_text(argparse.Namespace(local=False, last=5))
    lines = text.splitlines()
    assert code == EXIT_OK
    assert lines[0] == "!! UNSAFE: epoch 3: rank 1 reported a failed copy"
    assert "epoch 3 FAILED after COMMIT (S=9)" in text and "None" not in text
