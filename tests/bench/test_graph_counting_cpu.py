"""bench/graph_counting.py on CPU (eager, no graph): its checks run and pass, so the GPU run
that commits the figures exercises code the suite has run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_graph_counting_checks_pass_eagerly_on_cpu() -> None:
    cmd = [sys.executable, str(REPO / "bench" / "graph_counting.py"), "--device", "cpu",
           "--layers", "3", "--replays", "2", "--prefill-ids", "5000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok     ") == 2 and "all checks passed" in proc.stdout, proc.stdout
    assert "FAILED" not in proc.stdout
