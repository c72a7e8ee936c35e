"""The README's main job: ``eplbctl demo`` end to end, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_commits_a_rebalance_that_raises_balancedness() -> None:
    proc = subprocess.run([sys.executable, "-m", "eplb.ctl", "demo", "--steps", "900",
                           "--interval", "250"], capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "RESULT: ok" in out
    rows = re.findall(r"^\s+(\d+)\s+committed\s+(\d+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert rows, out
    assert any(float(after) > float(before) for _, _, before, after in rows)
    checks = re.search(r"(\d+) checks, (\d+) mismatched slots", out)
    assert checks and int(checks.group(1)) > 0 and checks.group(2) == "0", out
