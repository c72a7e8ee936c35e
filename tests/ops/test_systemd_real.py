"""deploy/systemd/eplb-sidecar.service under a real systemd: deploy/systemd/test-in-container.sh
boots a Debian root (debootstrap, cached under /var/tmp/eplb-systemd) with ``systemd-nspawn
--boot``, follows deploy/README.md's systemd steps in it and runs a leader and a follower unit with
four demo engine ranks: start (READY=1), /healthz and /readyz, a committed rebalance, the
watchdog, restart, stop with status 0.

Needs root on Linux (debootstrap, systemd-nspawn and mount); the script installs debootstrap and
systemd-container with apt-get when they are missing. It fails rather than skips when it cannot
run: deselect it with ``-m 'not systemd'``. 2 to 3 minutes the first time (debootstrap and
torch's wheel), 45 to 90 s after that on a busy 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "test-in-container.sh"

#: What the script prints when each check passes.
EXPECTED = [
    "ok: step 1: user eplb",
    "ok: step 2: /etc/eplb/sidecar.toml and sidecar.env, --print-config",
    "ok: step 3: eplbctl keys",
    "ok: systemd-analyze verify of the installed units: no output",
    "ok: step 4: eplb-sidecar started (READY=1)",
    "ok: eplb-sidecar-follower started",
    "ok: both active (running)",
    "ok: /healthz 200 on both",
    "ok: /readyz 503 before the engine's ranks joined",
    "ok: eplbctl --run-dir /run/eplb status, as root and as user engine (group eplb)",
    "ok: /run/eplb is 0770 group eplb",
    "ok: /readyz 200 on both once the engine's ranks joined",
    "ok: leader: eplb_follower_sidecars 1, workers [0, 1, 2, 3]",
    "ok: a rebalance committed",
    "ok: journals: JSON lines only, no warnings or errors",
    "ok: watchdog: both still running 12 s later, NRestarts=0",
    "ok: restart: new main processes",
    "ok: after the restart: epoch",
    "ok: stop eplb-sidecar-follower in",
    "ok: stop eplb-sidecar in",
    "ok: start after the stop, and stop again: ExecMainStatus=0 Result=success",
    "ok: journals: no traceback over restart and stop",
]


@pytest.mark.systemd
@pytest.mark.timeout(900)
def test_the_unit_runs_under_a_real_systemd() -> None:
    if sys.platform != "linux":
        pytest.skip("systemd-nspawn exists on Linux only")
    if os.geteuid() != 0:
        pytest.fail("tests/ops/test_systemd_real.py needs root (debootstrap, systemd-nspawn, "
                    "mount); run it as root or deselect it with -m 'not systemd'")
    # Its own session: on a timeout SIGTERM reaches the script and systemd-nspawn, which powers
    # the container off, and the script's cleanup unmounts and removes its run directory.
    proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHON": sys.executable})
    try:
        out, _ = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"test-in-container.sh ran over 840 s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-8000:]
    assert "\nPASS\n" in out, out[-8000:]
    missing = [line for line in EXPECTED if line not in out]
    assert not missing, f"missing {missing}:\n{out[-8000:]}"
