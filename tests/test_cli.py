"""The two console scripts as a user meets them: help, bad arguments, no sidecar running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


def test_sidecar_help_explains_every_option() -> None:
    out = run("-m", "eplb.coordinator", "--help")
    assert out.returncode == 0
    for flag in ("--node-rank", "--num-nodes", "--leader", "--run-dir", "--interval", "--window",
                 "--min-gain", "--min-margin", "--max-retries", "--layers-per-step", "--bytes-per-step",
                 "--ack-timeout", "--promise-timeout", "--done-timeout", "--worker-timeout"):
        assert flag in out.stdout, flag
    assert "(default: None)" not in out.stdout


def test_sidecar_rejects_bad_arguments_with_a_message_naming_the_option() -> None:
    # (--node-rank >= --num-nodes starts and reports the mismatch: tests/ops/test_metrics.py)
    out = run("-m", "eplb.coordinator", "--node-rank", "-1", "--num-nodes", "2",
              "--leader", "tcp://127.0.0.1:1")
    assert out.returncode == 2 and "bad --node-rank: '-1'" in out.stderr
    assert "expected an integer >= 0" in out.stderr
    out = run("-m", "eplb.coordinator", "--node-rank", "0", "--num-nodes", "1", "--leader", "host:1")
    assert out.returncode == 2 and "expected tcp://HOST:PORT" in out.stderr
    out = run("-m", "eplb.coordinator", "--node-rank", "0", "--num-nodes", "1",
              "--leader", "tcp://127.0.0.1:1", "--min-margin", "1")
    assert out.returncode == 2 and "bad --min-margin: '1'" in out.stderr
    assert "expected an integer >= 2" in out.stderr


def test_eplbctl_without_a_sidecar_says_what_to_do(tmp_path: Path) -> None:
    out = run("-m", "eplb.ctl", "--run-dir", str(tmp_path), "status")
    assert out.returncode == 2  # unreachable (eplbctl --help lists the exit codes)
    assert "start eplb-sidecar" in out.stderr and "--run-dir" in out.stderr


def test_the_run_dir_must_be_a_private_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "shared"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)
    other = tmp_path / "file"
    other.write_text("x")
    out = run("-m", "eplb.coordinator", "--node-rank", "0", "--num-nodes", "1",
              "--leader", "tcp://127.0.0.1:1", "--run-dir", str(other))
    assert out.returncode == 2 and "cannot create run directory" in out.stderr
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    out = run("-m", "eplb.coordinator", "--node-rank", "0", "--num-nodes", "1",
              "--leader", "tcp://127.0.0.1:1", "--run-dir", str(link))
    assert out.returncode == 2 and "symlink" in out.stderr
    from eplb.paths import ensure_private_dir

    ensure_private_dir(run_dir)  # tightened, since it is ours
    assert run_dir.stat().st_mode & 0o077 == 0
