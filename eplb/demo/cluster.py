"""Start and stop a local cluster of sidecars and worker processes (the demo and the tests use it)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eplb.control_client import ControlError, control_call
from eplb.curve import create_keys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """``(status, body)`` of a GET (a sidecar's /metrics, /healthz, /readyz); an HTTP error status
    is an answer too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape_metrics(url: str) -> dict[str, float]:
    """``url/metrics`` as ``{'name{label="v",...}': value}`` (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    code, text = http_get(url + "/metrics")
    if code != 200:
        raise AssertionError(f"{url}/metrics answered {code}: {text[:500]}")
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return found


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               every_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; raise TimeoutError
    naming ``what`` and the last value otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g}s (last: {last!r})")


@dataclass
class LocalCluster:
    """``num_nodes`` sidecars on this machine, each with its own run directory.

    Args:
        sidecar_args: extra ``eplb-sidecar`` flags for every sidecar.
        base_dir: where run directories and logs go (a new temporary directory by default).

    With more than one node the TCP link is authenticated: per-node CURVE keys are made in a new
    directory under ``base_dir`` (``keys_dir``) and every sidecar gets ``--curve-keys`` unless its
    flags already say ``--curve-keys`` or ``--insecure-plain-tcp``.
    """

    num_nodes: int
    sidecar_args: list[str] = field(default_factory=list)
    base_dir: Path | None = None
    sidecars: dict[int, subprocess.Popen] = field(default_factory=dict)  # node -> its latest
    workers: list[subprocess.Popen] = field(default_factory=list)
    _started: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.base_dir is None:
            # Short: ipc socket paths must stay under 107 bytes.
            self.base_dir = Path(tempfile.mkdtemp(prefix="eplb-", dir="/tmp"))
        self.leader = f"tcp://127.0.0.1:{free_port()}"
        self.log_dir = self.base_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.keys_dir: Path | None = None
        if self.num_nodes > 1:
            self.keys_dir = Path(tempfile.mkdtemp(prefix="keys-", dir=self.base_dir))
            create_keys(self.keys_dir, self.num_nodes)

    def run_dir(self, node: int) -> Path:
        return self.base_dir / f"n{node}"

    def start_sidecar(self, node: int, extra: list[str] | None = None) -> subprocess.Popen:
        # Port 0: every sidecar of the cluster gets a free port for its HTTP endpoints
        # (http_address() says which); a --http in the extra flags wins.
        cmd = [sys.executable, "-m", "eplb.coordinator", "--node-rank", str(node),
               "--num-nodes", str(self.num_nodes), "--leader", self.leader,
               "--run-dir", str(self.run_dir(node)), "--http", "127.0.0.1:0",
               *self.sidecar_args, *(extra or [])]
        if self.keys_dir is not None and not {"--curve-keys", "--insecure-plain-tcp"} & set(cmd):
            cmd += ["--curve-keys", str(self.keys_dir)]
        log = open(self.log_dir / f"sidecar{node}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.sidecars[node] = proc
        self._started.append(proc)
        return proc

    def start(self) -> None:
        for node in range(self.num_nodes):
            self.start_sidecar(node)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until every sidecar answers on its control socket (and followers see the leader)."""
        deadline = time.monotonic() + timeout_s
        for node in range(self.num_nodes):
            while True:
                proc = self.sidecars[node]
                if proc.poll() is not None:
                    raise RuntimeError(f"sidecar {node} exited with {proc.returncode}; see "
                                       f"{self.log_dir / f'sidecar{node}.log'}")
                try:
                    local = control_call("status", {"local": True}, self.run_dir(node), timeout_s=1.0)
                    if node == 0 or local.get("leader_last_seen_s") is not None:
                        break
                except ControlError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sidecar {node} not ready within {timeout_s:g}s")
                time.sleep(0.05)

    def http_address(self, node: int, timeout_s: float = 5.0) -> str:
        """``http://HOST:PORT`` of a running sidecar's /metrics, /healthz and /readyz."""
        local = control_call("status", {"local": True}, self.run_dir(node), timeout_s=timeout_s)
        local = local.get("leader", local)  # the leader answers with the whole status
        if not local.get("http"):
            raise RuntimeError(f"sidecar {node} serves no HTTP endpoints (--http off?)")
        return f"http://{local['http']}"

    def start_worker(self, args: list[str], log_name: str,
                     command: list[str] | None = None) -> subprocess.Popen:
        """Start a worker process: ``command`` (default ``python -m eplb.demo.worker``) + ``args``,
        its output in ``log_dir/log_name``."""
        log = open(self.log_dir / log_name, "ab")
        proc = subprocess.Popen([*(command or [sys.executable, "-m", "eplb.demo.worker"]), *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.workers.append(proc)
        return proc

    def status(self, node: int = 0, timeout_s: float = 5.0) -> dict[str, Any]:
        return control_call("status", {}, self.run_dir(node), timeout_s=timeout_s)

    def wait_for(self, predicate, timeout_s: float, what: str, node: int = 0) -> dict[str, Any]:
        """Poll the leader's status until ``predicate(status)`` holds; raise TimeoutError naming
        ``what`` and the last status otherwise."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status(node, timeout_s=2.0)
                if predicate(last):
                    return last
            except ControlError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{what}: not within {timeout_s:g}s; last status: {last}")

    def commit_once(self, tries: int = 5, timeout_s: float = 30.0) -> dict[str, Any]:
        """Force rebalances until one commits (a plan equal to the placement is skipped) and no
        epoch is in flight; the leader's status then. Raises AssertionError on another outcome
        or when none committed in ``tries``."""
        status: dict[str, Any] = {}
        for _ in range(tries):
            before = len(self.status()["history"])
            control_call("rebalance", {"force": True}, self.run_dir(0))
            status = self.wait_for(lambda s: len(s["history"]) > before
                                   and s["epoch_in_flight"] is None, timeout_s, "epoch finished")
            if status["history"][-1]["outcome"] == "committed":
                return status
            assert status["history"][-1]["outcome"] == "skipped", status["history"][-1]
        raise AssertionError(f"no rebalance committed: {status.get('history')}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM everything, then SIGKILL what is still alive after ``timeout_s``."""
        procs = self.workers + self._started  # every sidecar started, restarted ones too
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_demo_cluster(base_dir: Path, world: int = 4, workers_per_node: int = 2,
                       sidecar_flags: list[str] | None = None,
                       worker_flags: dict[int, list[str]] | None = None,
                       timeout_s: float = 90.0) -> LocalCluster:
    """Start ``world / workers_per_node`` sidecars and ``world`` demo workers (gloo, real weight
    copies) that step until SIGTERM, and wait until every worker has joined and stepped 20 steps.

    Rebalances start only when asked (``--interval`` is huge). Each rank ``r`` writes its
    measurements to ``base_dir/worker{r}.json`` and its protocol events to
    ``base_dir/events{r}.jsonl`` (see :func:`read_events`). ``worker_flags[r]`` adds flags to rank
    ``r``; ``sidecar_flags`` to every sidecar. Keep ``base_dir`` short: ipc paths are limited.
    """
    cluster = LocalCluster(world // workers_per_node,
                           ["--interval", "1000000", "--window", "400", "--planner", "thread",
                            "--worker-timeout", "2", "--node-timeout", "2", *(sidecar_flags or [])],
                           base_dir=base_dir)
    cluster.start()
    try:
        cluster.wait_ready(60.0)
        dist_init = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(world):
            cluster.start_worker([
                "--rank", str(rank), "--world-size", str(world),
                "--ranks-per-node", str(workers_per_node),
                "--run-dir", str(cluster.run_dir(rank // workers_per_node)),
                "--dist-init", dist_init, "--steps", "0", "--step-ms", "1",
                "--result", str(base_dir / f"worker{rank}.json"),
                "--events", str(base_dir / f"events{rank}.jsonl"),
                *(worker_flags or {}).get(rank, [])], f"worker{rank}.log")
        cluster.wait_for(lambda s: len(s["workers"]) == world and s["min_step"] > 20, timeout_s,
                         "all workers joined and stepping")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def read_events(base_dir: Path, rank: int) -> list[dict]:
    """The protocol events demo worker ``rank`` logged (``--events``), oldest first."""
    path = base_dir / f"events{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
