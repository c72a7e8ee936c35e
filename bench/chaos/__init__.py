"""The project's chaos scripts (fault trials, socket fuzzing); see each script's docstring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_chaos_script(script: str, args: list[str], out: Path, timeout_s: float) -> dict:
    """Run ``bench/chaos/<script>`` with ``args`` plus ``--json out`` and return what it wrote,
    with its output under ``stdout``. Exit status 1 (a goal violated) is an answer; any other
    failure raises."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "chaos" / script), *args,
                             "--json", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException:  # timeout or interrupt: SIGTERM lets the script stop its cluster
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    print(stdout[-6000:], stderr[-3000:])
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{script} exited with {proc.returncode}: {stderr[-3000:]}")
    data = json.loads(out.read_text())
    data["stdout"] = stdout
    return data
