"""The mesh's processes in their namespaces: the relay in the hub, a sidecar and a workers process
per node; started, watched, and ended by pid. :meth:`Mesh.close` removes everything the run made
(processes, namespaces with their veth pairs, the run directory unless kept) and is idempotent,
so the driver can call it from ``finally``, ``atexit`` and a signal handler alike.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eplb.control_client import ControlError, control_call
from eplb.curve import create_keys

from mesh import netns
from mesh.relay import relay_call

log = logging.getLogger("eplb.mesh")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PORT = 5555


class Mesh:
    """N sidecars (node 0 leads) x M workers, each node in its own namespace, CURVE on, the
    followers' link to the leader through the relay.

    Args:
        nodes, workers: nodes and workers per node.
        sidecar_args: extra ``eplb-sidecar`` flags for every sidecar.
        step_ms: each worker's decode step time; flush_every: steps between its counts flushes.
        hold_timeout_s: the workers' longest wait at S.
        profile: the relay's initial link model (:class:`mesh.relay.Profile` fields).
        base_dir: where run directories, keys, logs and reports go (a new one under /tmp: ipc
            paths must stay short).
        start_batch: nodes whose workers processes start together (each batch once the one
            before has joined).
        relay_nice: the relay's scheduling priority: it stands for the network, so by default
            it runs ahead of the nodes' processes (which share this machine's cores).
    """

    def __init__(self, nodes: int, workers: int, sidecar_args: list[str], step_ms: float,
                 hold_timeout_s: float = 30.0, profile: dict[str, float] | None = None,
                 base_dir: Path | None = None, seed: int = 0, relay_nice: int = -10,
                 flush_every: int = 8, start_batch: int = 1) -> None:
        if nodes < 2:
            raise ValueError("a mesh has at least 2 nodes (a leader and a follower)")
        self.nodes, self.workers, self.world = nodes, workers, nodes * workers
        self.sidecar_args, self.step_ms, self.hold_timeout_s = sidecar_args, step_ms, hold_timeout_s
        self.profile = profile or {}
        self.seed, self.relay_nice, self.flush_every = seed, relay_nice, flush_every
        self.start_batch = max(1, start_batch)
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="eplbm-mesh-", dir="/tmp"))
        self.log_dir = self.base_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.topo = netns.Topology(nodes)
        self.procs: dict[str, subprocess.Popen] = {}
        self.keys_dir = self.base_dir / "keys"
        self.relay_sock = self.base_dir / "relay.sock"
        self._closed = False
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def run_dir(self, k: int) -> Path:
        return self.base_dir / f"n{k}"

    def report_path(self, k: int) -> Path:
        return self.base_dir / f"report{k}.json"

    # --- start ----------------------------------------------------------------------------------

    def _spawn(self, name: str, namespace: str, cmd: list[str]) -> subprocess.Popen:
        log_file = open(self.log_dir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen([*self.topo.exec_prefix(namespace), *cmd], stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=REPO)
        finally:
            log_file.close()
        self.procs[name] = proc
        return proc

    def start(self, timeout_s: float) -> None:
        """Namespaces, keys, relay, sidecars, workers; returns once every worker has joined and
        stepped (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        netns.remove_stale()
        self.topo.create()
        create_keys(self.keys_dir, self.nodes)
        py = sys.executable
        # The leader first: the relay accepts a follower's connection before it connects to the
        # leader, so a follower that came first would see its handshake cut (not a refusal).
        self._start_sidecar(0)
        self._wait(lambda: self._sidecar_ready(0), deadline, "sidecar 0 (the leader) ready")
        p = {"mean_ms": 0.1, "jitter_ms": 0.0, "loss": 0.0, "rto_ms": 200.0, **self.profile}
        self._spawn("relay", self.topo.hub, [
            py, str(HERE / "relay.py"), "--listen", f"0.0.0.0:{PORT}",
            "--upstream", f"{netns.node_address(0)}:{PORT}", "--control", str(self.relay_sock),
            "--mean-ms", str(p["mean_ms"]), "--jitter-ms", str(p["jitter_ms"]),
            "--loss", str(p["loss"]), "--rto-ms", str(p["rto_ms"]), "--seed", str(self.seed),
            "--nice", str(self.relay_nice)])
        self._wait(lambda: self._relay_up(), deadline, "relay answers")
        for k in range(1, self.nodes):
            self._start_sidecar(k)
        for k in range(self.nodes):
            self._wait(lambda k=k: self._sidecar_ready(k), deadline, f"sidecar {k} ready")
        clock_zero = time.time()  # step 0 of every rank
        for k in range(self.nodes):
            # start_batch nodes at a time, the batch before joined first: 18 processes importing
            # torch at once starve every event loop on a small machine (heartbeats miss, nodes
            # are lost).
            if k > 0 and k % self.start_batch == 0:
                prev = set(range((k - self.start_batch) * self.workers, k * self.workers))
                self._wait(lambda prev=prev: (s := self.status(timeout_s=2.0))
                           and prev <= set(s["workers"]), deadline, f"nodes before {k}: workers joined")
            ranks = ",".join(str(r) for r in range(k * self.workers, (k + 1) * self.workers))
            self._spawn(f"workers{k}", self.topo.ns(k), [
                py, str(HERE / "node.py"), "--node", str(k), "--ranks", ranks,
                "--world", str(self.world), "--run-dir", str(self.run_dir(k)),
                "--step-ms", str(self.step_ms), "--hold-timeout", str(self.hold_timeout_s),
                "--flush-every", str(self.flush_every), "--clock-zero", repr(clock_zero),
                "--join-timeout", str(max(10.0, deadline - time.monotonic())),
                "--report", str(self.report_path(k))])
        self._wait(lambda: (s := self.status(timeout_s=2.0)) and len(s["workers"]) == self.world
                   and s["min_step"] > 20, deadline, f"{self.world} workers joined and stepping")

    def _start_sidecar(self, k: int) -> None:
        leader = netns.node_address(0) if k == 0 else netns.hub_address(k)
        self._spawn(f"sidecar{k}", self.topo.ns(k), [
            sys.executable, "-m", "eplb.coordinator", "--node-rank", str(k), "--num-nodes",
            str(self.nodes), "--leader", f"tcp://{leader}:{PORT}", "--run-dir",
            str(self.run_dir(k)), "--curve-keys", str(self.keys_dir), "--http", "off",
            *self.sidecar_args])

    def _relay_up(self) -> bool:
        try:
            relay_call(self.relay_sock, {"cmd": "ping"}, timeout_s=1.0)
            return True
        except (OSError, ValueError, RuntimeError):
            return False

    def _sidecar_ready(self, k: int) -> bool:
        try:
            local = control_call("status", {"local": True}, self.run_dir(k), timeout_s=1.0)
        except ControlError:
            return False
        return k == 0 or local.get("leader_last_seen_s") is not None

    def _wait(self, predicate: Callable[[], Any], deadline: float, what: str) -> Any:
        while True:
            self.check_alive()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not by the deadline (logs in {self.log_dir})")
            time.sleep(0.05)

    def check_alive(self) -> None:
        """RuntimeError naming the first process of the mesh that exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                   f"{self.log_dir / (name + '.log')}")

    # --- during the run -------------------------------------------------------------------------

    def status(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The leader's status, or None when it does not answer in time."""
        try:
            return control_call("status", {}, self.run_dir(0), timeout_s=timeout_s)
        except ControlError:
            return None

    def relay(self, request: dict[str, Any]) -> Any:
        return relay_call(self.relay_sock, request)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of every mesh process so far."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for proc in self.procs.values():
            try:
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return total

    # --- stop -----------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 20.0) -> dict[int, dict]:
        """SIGTERM every process at once (the workers first), wait for them and read the workers'
        reports; ``{rank: report}`` (a node whose report is missing is absent)."""
        names = sorted(self.procs, key=lambda n: not n.startswith("workers"))
        self._terminate(names, timeout_s)
        reports: dict[int, dict] = {}
        for k in range(self.nodes):
            path = self.report_path(k)
            if path.exists():
                reports.update({int(r): v for r, v in json.loads(path.read_text()).items()})
        return reports

    def _terminate(self, names: list[str], timeout_s: float) -> None:
        procs = [self.procs[n] for n in names if n in self.procs]
        log.debug("SIGTERM at %.3f to %s", time.time(), names)
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        started = time.monotonic()
        deadline = started + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
                log.debug("pid %d ended %.1f s after SIGTERM", proc.pid, time.monotonic() - started)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not end on SIGTERM; SIGKILL", proc.pid)
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)

    def close(self, keep_dir: bool = False) -> list[str]:
        """End every process (by pid), remove the namespaces (veth pairs go with them) and, unless
        ``keep_dir``, the run directory. Idempotent. Returns problems."""
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        try:
            workers = [n for n in self.procs if n.startswith("workers")]
            self._terminate(workers, 10.0)
            # More than the sidecars' --grace-period (10 s): on busy cores they need it.
            self._terminate([n for n in self.procs if n not in workers], 20.0)
        except Exception as exc:  # noqa: BLE001 - go on removing the namespaces
            problems.append(f"ending processes: {exc}")
        problems += self.topo.destroy()
        left = [n for n in netns.list_namespaces_safe() if n.startswith(self.topo.prefix + "-")]
        if left:
            problems.append(f"namespaces left: {left}")
        if not keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        return problems
