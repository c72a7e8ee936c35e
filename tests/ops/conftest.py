"""Helpers for tests that start eplb-sidecar as a real process and talk HTTP to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eplb.control_client import ControlError, control_call
from eplb.demo.cluster import free_port, wait_until


class Daemon:
    """One ``eplb-sidecar`` process (a single-node leader unless told otherwise)."""

    def __init__(self, base: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.run_dir = base / "run"
        self.log_path = base / "sidecar.log"
        cmd = [sys.executable, "-m", "eplb.coordinator", "--run-dir", str(self.run_dir),
               "--http", "127.0.0.1:0", "--planner", "thread", *args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self, timeout_s: float = 30.0) -> str:
        """``http://HOST:PORT`` once the daemon answers on its control socket."""
        def ask() -> str | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = control_call("status", {"local": True}, self.run_dir, timeout_s=1.0)
            except ControlError:
                return None
            return status.get("leader", status)["http"]  # the leader answers with everything
        return "http://" + wait_until(ask, timeout_s, "sidecar answering")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture()
def daemon_factory(tmp_path: Path):
    """``daemon_factory(args, env)`` starts a single-node leader; all are killed at teardown."""
    daemons: list[Daemon] = []
    base = Path("/tmp") / f"eplbo-{os.getpid()}-{tmp_path.name[-10:]}"  # short ipc paths
    base.mkdir(parents=True, exist_ok=True)

    def start(args: list[str] | None = None, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(base / f"d{len(daemons)}", ["--node-rank", "0", "--num-nodes", "1",
                                               "--leader", f"tcp://127.0.0.1:{free_port()}",
                                               *(args or [])], env)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.stop()
