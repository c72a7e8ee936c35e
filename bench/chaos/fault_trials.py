"""Fault trials: kill or pause one process of a local cluster at a chosen phase of a rebalance,
and classify what became of the engine instance from the evidence the processes leave.

    PYTHONPATH=. .venv/bin/python bench/chaos/fault_trials.py --trials 60 --seed 1 --json out.json
    PYTHONPATH=. .venv/bin/python bench/chaos/fault_trials.py --trials 25 --balanced --seed 2
    PYTHONPATH=. .venv/bin/python bench/chaos/fault_trials.py --trial-seed 1007:follower:kill:commit

Each trial starts a fresh cluster: 2 sidecars (node 0 leads) x 2 demo workers
(``eplb.demo.worker``: gloo, real P2P weight copies, weights checked after every layer switch,
one all-reduce per step as an engine's dispatch keeps ranks in lockstep). Settings, chosen so that
epochs come often and every timeout fits a trial:

- sidecars: ``--interval 200 --window 200 --policy greedy --min-gain 0`` (workers drift their
  expert popularity every 100 steps, so plans keep changing), ``--ack-timeout 3
  --promise-timeout 3 --done-timeout 6 --worker-timeout 2 --node-timeout 3`` (the daemon's
  default node timeout).
- workers: ``--step-ms 4``, ``--hold-timeout 8``: the longest a promised worker waits at S for
  the outcome. A sidecar restart here is the restart delay (0.2-1.0 s) plus the process start
  (about 2-4 s on 2 busy cores), so 8 s is about twice the restart time; pauses last 0.5-4 s. Each
  trial measures when the restarted sidecar answers again (``back_s``) and a trial where it came
  back later than the hold timeout is counted apart (``late``), outside the goal.

A trial picks, from its own seed (``--seed`` x 1000 + trial index; the summary prints each
failed trial as ``SEED:ROLE:FAULT:TARGET``, which ``--trial-seed`` replays; ``--balanced`` cycles
role x fault and target instead of drawing them): the role (leader sidecar, follower sidecar, worker), the fault (sidecars:
SIGKILL then a restart with the same command after 0.2-1.0 s, the script acting as the supervisor
as systemd would; or SIGSTOP then SIGCONT after 0.5-4 s; workers: SIGKILL, no restart) and the
target phase:

- ``idle``: no epoch in flight in the leader's status;
- ``plan``: the first PLAN of an epoch has reached a worker (the driver forces a rebalance);
- ``prepare``: the first PREPARE has reached a worker;
- ``commit``: the first COMMIT has reached a worker;
- ``copying``: every worker has the COMMIT; the fault is timed from the COMMIT's arrival step,
  S and the measured step rate to land at a random point of the copy steps S .. S + chunks.

How precise the targeting is: the driver polls the workers' event files (one JSON line per
protocol message, with its wall time) every 5 ms, so a fault lands 0-10 ms (plus scheduling on
busy cores) after the trigger was written; PLAN and PREPARE round trips take a few ms here, so a
fault aimed at ``plan`` often lands when PREPARE is already out, and one aimed at ``commit``
after every COMMIT has left the leader. The tables therefore use the phase *observed* afterwards:
from the wall times of the events and of the copies each worker logged, the most advanced thing
the workers had seen when the signal went (idle / plan / prepare / commit / copying); the target
is kept in each trial's record. After the fault the cluster runs on until it is healthy again
(leader answers, no epoch in flight, all 4 workers joined and stepping 30 steps past the fault and
past every S) or every worker has exited, at most hold timeout + 4 s after the fault healed; then
the workers get SIGTERM (they stop together) and the sidecars are stopped.

Figures per trial (and summed per role x fault x observed phase):

- ``partial``: an I1 violation among the ranks not killed by the trial: for an epoch some rank
  started its copies at S and another rank that ran step S did not, or started at another step.
- ``diverged``: silent divergence: ranks that ended without an error serve different placements,
  or one of them saw mismatched weights.
- ``hang``: a worker still in its decode loop (no result written) and not exiting within hold
  timeout + 3 s of SIGTERM, or a sidecar alive but not answering its control socket within
  2 x 3 s at the end. A worker that finished its loop and wrote its result but whose process had
  not exited by then (the demo worker's teardown) is counted apart (``exitstk``), and its stacks
  are dumped to its log (SIGUSR1) before it is killed.
- ``lost``: the engine instance was lost: a rank ended with an error (HoldTimeout, CopyFailed,
  another, e.g. a collective that failed because a peer died) or the leader declared the instance
  unsafe (its status' ``unsafe``). Reported for sidecar faults that came back within the hold
  timeout (``lost`` there is a goal violation: the goal is 0), and for worker kills, where every
  surviving rank must end in a clean error (an error recorded in its result, process exited):
  ``unclean`` counts the surviving ranks that did not.

The script exits 1 when a goal is violated: any partial, diverged, hang, lost after a sidecar
fault that came back in time, or unclean rank after a worker kill; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eplb.control_client import ControlError, control_call
from eplb.demo.cluster import LocalCluster, free_port

WORLD, PER_NODE, NODES = 4, 2, 2
PHASES = ("idle", "plan", "prepare", "commit", "copying")
ROLES = ("leader", "follower", "worker")
HOLD_TIMEOUT_S = 8.0
DONE_TIMEOUT_S = 6.0
STEP_MS = 4.0
SIDECAR_FLAGS = ["--interval", "200", "--window", "200", "--planner", "thread", "--policy", "greedy",
                 "--min-gain", "0", "--ack-timeout", "3", "--promise-timeout", "3",
                 "--done-timeout", str(DONE_TIMEOUT_S), "--worker-timeout", "2",
                 "--node-timeout", "3", "--log-level", "INFO"]
SETUP_TIMEOUT_S = 30.0
TARGET_TIMEOUT_S = 8.0
POLL_S = 0.005


def faults_for(role: str) -> tuple[str, ...]:
    return ("kill",) if role == "worker" else ("kill", "stop")


@dataclass
class Choice:
    """What one trial does, drawn from its seed."""

    seed: int
    role: str
    fault: str
    target: str
    victim_rank: int | None
    delay_s: float  # kill: restart delay; stop: pause length

    @classmethod
    def draw(cls, seed: int, roles: tuple[str, ...], phases: tuple[str, ...],
             fixed: tuple[str, str, str] | None = None) -> "Choice":
        """From ``seed``; ``fixed`` = (role, fault, target) overrides those three draws."""
        rng = random.Random(seed)
        role = rng.choice(roles)
        fault = rng.choice(faults_for(role))
        target = rng.choice(phases)
        if fixed is not None:
            role, fault, target = fixed
        victim = rng.randrange(WORLD) if role == "worker" else None
        delay = rng.uniform(0.2, 1.0) if fault == "kill" else rng.uniform(0.5, 4.0)
        if role == "worker":
            delay = 0.0
        return cls(seed, role, fault, target, victim, round(delay, 3))


class EventWatcher:
    """Reads the workers' event files (JSON lines) incrementally."""

    def __init__(self, base: Path) -> None:
        self.paths = [base / f"events{r}.jsonl" for r in range(WORLD)]
        self.offsets = [0] * WORLD
        self.events: list[list[dict]] = [[] for _ in range(WORLD)]

    def poll(self) -> None:
        for r, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[r])
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self.offsets[r] += end + 1
            for line in data[:end].splitlines():
                try:
                    self.events[r].append(json.loads(line))
                except ValueError:
                    pass

    def of_type(self, kind: str, min_epoch: int) -> list[tuple[int, dict]]:
        return [(r, e) for r in range(WORLD) for e in self.events[r]
                if e["type"] == kind and (e.get("epoch") or 0) >= min_epoch]


@dataclass
class Trial:
    choice: Choice
    index: int
    observed: str = "?"
    wall_s: float = 0.0
    setup_error: str = ""
    fault_at: float | None = None  # wall clock (time.time())
    healed_at: float | None = None
    back_s: float | None = None  # fault -> the sidecar answers its control socket again
    late: bool = False
    target_reached: bool = False
    epochs: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    partial: int = 0
    partial_detail: list[str] = field(default_factory=list)
    diverged: int = 0
    diverged_detail: list[str] = field(default_factory=list)
    hang: int = 0
    hang_detail: list[str] = field(default_factory=list)
    unexited: list[int] = field(default_factory=list)  # ranks killed after the SIGTERM bound
    silent_sidecars: list[int] = field(default_factory=list)
    stuck_exit: int = 0  # ranks that finished (result written) but whose process did not exit
    errors: int = 0
    unsafe: str = ""
    lost: int = 0
    unclean: int = 0
    sidecar_crashed: list[int] = field(default_factory=list)
    commits_after: int = 0
    leader_history: list[dict] = field(default_factory=list)
    base_dir: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["choice"] = dict(self.choice.__dict__)
        d["replay"] = self.replay
        return d

    @property
    def replay(self) -> str:
        c = self.choice
        return f"--trial-seed {c.seed}:{c.role}:{c.fault}:{c.target}"


def _status(cluster: LocalCluster, node: int = 0, timeout_s: float = 1.5) -> dict | None:
    try:
        return control_call("status", {}, cluster.run_dir(node), timeout_s=timeout_s)
    except (ControlError, OSError):
        return None


def _local_status(cluster: LocalCluster, node: int, timeout_s: float = 3.0) -> dict | None:
    try:
        return control_call("status", {"local": True}, cluster.run_dir(node), timeout_s=timeout_s)
    except (ControlError, OSError):
        return None


def start_cluster(base: Path, seed: int) -> LocalCluster:
    cluster = LocalCluster(NODES, list(SIDECAR_FLAGS), base_dir=base)
    try:
        _start(cluster, base, seed)
    except BaseException:  # a failed start or an interrupt: leave nothing running
        cluster.stop(timeout_s=5.0)
        raise
    return cluster


def _start(cluster: LocalCluster, base: Path, seed: int) -> None:
    cluster.start()
    cluster.wait_ready(SETUP_TIMEOUT_S)
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    for rank in range(WORLD):
        cluster.start_worker([
            "--rank", str(rank), "--world-size", str(WORLD), "--ranks-per-node", str(PER_NODE),
            "--run-dir", str(cluster.run_dir(rank // PER_NODE)), "--dist-init", dist_init,
            "--steps", "0", "--step-ms", str(STEP_MS), "--drift-every", "100",
            "--seed", str(seed % 100000), "--hold-timeout", str(HOLD_TIMEOUT_S),
            "--result", str(base / f"worker{rank}.json"),
            "--events", str(base / f"events{rank}.jsonl")], f"worker{rank}.log")
    cluster.wait_for(lambda s: len(s["workers"]) == WORLD and s["min_step"] > 20, SETUP_TIMEOUT_S,
                     "all workers joined and stepping")


def _force(cluster: LocalCluster) -> None:
    try:
        control_call("rebalance", {"force": True}, cluster.run_dir(0), timeout_s=1.5)
    except (ControlError, OSError):
        pass


def wait_for_target(cluster: LocalCluster, watcher: EventWatcher, target: str,
                    rng: random.Random, rate: float) -> bool:
    """Return when the target phase is reached (True) or TARGET_TIMEOUT_S passed (False)."""
    deadline = time.monotonic() + TARGET_TIMEOUT_S
    if target == "idle":
        while time.monotonic() < deadline:
            s = _status(cluster)
            if s and s["epoch_in_flight"] is None and not s["planning"]:
                time.sleep(rng.uniform(0.0, 0.05))
                return True
            time.sleep(0.02)
        return False
    watcher.poll()
    first = 1 + max((e.get("epoch") or 0 for evs in watcher.events for e in evs), default=0)
    kind = {"plan": "PLAN", "prepare": "PREPARE", "commit": "COMMIT", "copying": "COMMIT"}[target]
    next_force = 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        watcher.poll()
        seen = watcher.of_type(kind, first)
        if target != "copying" and seen:
            return True
        if target == "copying" and seen:
            epoch = max(e["epoch"] for _, e in seen)
            ranks = {r: e for r, e in seen if e["epoch"] == epoch}
            if len(ranks) == WORLD:
                s_step = next(iter(ranks.values()))["step"]
                arrived = min(e["at_step"] for e in ranks.values())
                t_arrived = min(e["t"] for e in ranks.values())
                # S .. S + 4 chunks (at most L=4 layers change, one chunk a step)
                to_s = max(0, s_step - arrived) / max(rate, 1.0)
                when = t_arrived + to_s + rng.uniform(0.0, 4.0) / max(rate, 1.0)
                time.sleep(max(0.0, when - time.time()))
                return True
        if not watcher.of_type("PLAN", first) and now >= next_force:
            _force(cluster)  # a plan equal to the placement is skipped: ask again
            next_force = now + 1.0
        time.sleep(POLL_S)
    return False


def observed_phase(watcher: EventWatcher, results: list[dict | None], t_fault: float) -> str:
    """The most advanced thing the workers had seen when the fault hit (see the docstring)."""
    latest: int | None = None
    for evs in watcher.events:
        for e in evs:
            if e.get("epoch") and e["t"] <= t_fault:
                latest = e["epoch"] if latest is None else max(latest, e["epoch"])
    if latest is None:
        return "idle"
    seen = {e["type"] for evs in watcher.events for e in evs
            if e.get("epoch") == latest and e["t"] <= t_fault}
    if "ABORT" in seen:
        return "idle"
    if "COMMIT" in seen:
        s_step = next(e["step"] for evs in watcher.events for e in evs
                      if e.get("epoch") == latest and e["type"] == "COMMIT" and e["t"] <= t_fault)
        started = finished = 0
        for res in results:
            if not res:
                continue
            steps = [c for c in res.get("copy_steps", []) if c["step"] >= s_step]
            if steps and steps[0]["t"] <= t_fault:
                started += 1
                run = [c for i, c in enumerate(steps) if c["step"] == s_step + i]
                if run and run[-1]["t"] <= t_fault and run[-1]["kinds"] == ["land"]:
                    finished += 1
        if started and finished == sum(1 for res in results if res):  # a killed rank has none
            return "idle"
        return "copying" if started else "commit"
    if "PREPARE" in seen:
        return "prepare"
    return "plan" if "PLAN" in seen else "idle"


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def inject(cluster: LocalCluster, trial: Trial) -> None:
    """Signal the victim; heal (restart / SIGCONT) after the delay. Sets fault/heal times."""
    c = trial.choice
    if c.role == "worker":
        proc = cluster.workers[c.victim_rank]
        trial.fault_at = time.time()
        proc.kill()
        proc.wait(5)
        trial.healed_at = trial.fault_at
        return
    node = 0 if c.role == "leader" else 1
    proc = cluster.sidecars[node]
    t0 = time.monotonic()
    if c.fault == "kill":
        trial.fault_at = time.time()
        proc.kill()
        proc.wait(5)
        time.sleep(c.delay_s)
        cluster.start_sidecar(node)
    else:
        trial.fault_at = time.time()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(c.delay_s)
        proc.send_signal(signal.SIGCONT)
    trial.healed_at = time.time()
    # back: the sidecar answers its control socket again
    deadline = time.monotonic() + HOLD_TIMEOUT_S + 5
    while time.monotonic() < deadline:
        if cluster.sidecars[node].poll() is not None:
            break
        if _local_status(cluster, node, timeout_s=0.5) is not None:
            trial.back_s = round(time.monotonic() - t0, 3)
            break
        time.sleep(0.05)
    # back_s None: the sidecar never answered again (a failed restart): that stays in the goal
    trial.late = trial.back_s is not None and trial.back_s >= HOLD_TIMEOUT_S


def run_on(cluster: LocalCluster, trial: Trial, watcher: EventWatcher) -> None:
    """Let the cluster run until healthy again, every worker exited, or the bound."""
    victim = cluster.workers[trial.choice.victim_rank] if trial.choice.role == "worker" else None
    survivors = [w for w in cluster.workers if w is not victim]
    start = time.monotonic()
    deadline = start + HOLD_TIMEOUT_S + 4.0
    base_step: int | None = None
    while time.monotonic() < deadline:
        if not any(_alive(w) for w in survivors):
            return
        s = _status(cluster, timeout_s=1.0)
        if s is not None and victim is None:
            if base_step is None and len(s["workers"]) == WORLD:
                base_step = s["min_step"]
            watcher.poll()
            max_s = max((e["step"] for evs in watcher.events for e in evs
                         if e["type"] in ("PREPARE", "COMMIT") and e.get("step")), default=0)
            if (base_step is not None and s["epoch_in_flight"] is None and not s["planning"]
                    and len(s["workers"]) == WORLD and s["min_step"] >= base_step + 30
                    and s["min_step"] > max_s + 5 and time.monotonic() - start > 1.0
                    and all(_alive(w) for w in survivors)):
                return
        time.sleep(0.1)


def stop_and_collect(cluster: LocalCluster, trial: Trial) -> list[dict | None]:
    c = trial.choice
    victim = c.victim_rank if c.role == "worker" else None
    status = _status(cluster, timeout_s=3.0)
    if status is not None:
        trial.unsafe = status.get("unsafe") or ""
        trial.leader_history = status.get("history", [])
        trial.epochs["leader_placement"] = status.get("placement_hash")
        trial.epochs["counters"] = status.get("counters")
        trial.commits_after = sum(1 for r in trial.leader_history if r["outcome"] == "committed")
    for node in range(NODES):
        proc = cluster.sidecars[node]
        if not _alive(proc):
            trial.sidecar_crashed.append(node)
            continue
        if _local_status(cluster, node) is None and _local_status(cluster, node) is None:
            trial.silent_sidecars.append(node)
    for rank, w in enumerate(cluster.workers):
        if rank != victim and _alive(w):
            w.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + HOLD_TIMEOUT_S + 3.0
    for rank, w in enumerate(cluster.workers):
        try:
            w.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            trial.unexited.append(rank)
            try:  # the demo worker dumps its threads' stacks to its log on SIGUSR1
                w.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
            except ProcessLookupError:
                pass
            w.kill()
            w.wait(5)
    cluster.stop(timeout_s=5.0)
    results: list[dict | None] = []
    for rank in range(WORLD):
        path = cluster.base_dir / f"worker{rank}.json"
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            results.append(None)
    return results


def classify(trial: Trial, watcher: EventWatcher, results: list[dict | None],
             exit_codes: list[int | None]) -> None:
    c = trial.choice
    victim = c.victim_rank if c.role == "worker" else None
    watcher.poll()
    trial.observed = observed_phase(watcher, results, trial.fault_at or 0.0)
    for rank in range(WORLD):
        res = results[rank]
        info: dict[str, Any] = {"rank": rank, "killed": rank == victim, "exit": exit_codes[rank],
                                "result": res is not None}
        if res is None:
            info.update(error="no result file" if rank != victim else "", error_type="none")
        else:
            info.update(error=res.get("error", ""), error_type=res.get("error_type", ""),
                        last_step=res.get("last_step"), placement=res.get("placement_hash"),
                        mismatches=res.get("weight_mismatches", 0),
                        checks=res.get("weight_checks", 0))
        trial.ranks.append(info)
    survivors = [r for r in range(WORLD) if r != victim]
    # I1 per epoch: the COMMITs the workers got name S; who started copies at S?
    # Keyed by (epoch, S): a restarted leader numbers its epochs from 1 again.
    commits = sorted({(e["epoch"], e["step"]) for evs in watcher.events for e in evs
                      if e["type"] == "COMMIT"}, key=lambda k: k[1])
    for epoch, s_step in commits:
        started, not_started, elsewhere = [], [], []
        for r in survivors:
            res = results[r]
            if res is None:
                continue
            got_commit = any(e["type"] == "COMMIT" and e["epoch"] == epoch and e["step"] == s_step
                             for e in watcher.events[r])
            copy_at = [cs["step"] for cs in res.get("copy_steps", []) if cs["step"] >= s_step
                       and "start" in cs["kinds"]]
            failed_copy = (res.get("error_type") == "CopyFailed" and got_commit
                           and res.get("last_step", -1) >= s_step)
            if (copy_at and copy_at[0] == s_step and got_commit) or (
                    failed_copy and not copy_at and res.get("last_step") == s_step):
                started.append(r)  # a copy that failed as it started at S still started at S
            elif res.get("last_step", -1) >= s_step:
                (elsewhere if copy_at and got_commit and copy_at[0] <= s_step + 1 + WORLD
                 else not_started).append(r)
        trial.epochs[f"{epoch}@{s_step}"] = {"S": s_step, "started": started, "not_started": not_started,
                                    "other_step": elsewhere}
        if started and (not_started or elsewhere):
            trial.partial += 1
            trial.partial_detail.append(f"epoch {epoch} S={s_step}: ranks {started} started "
                                        f"copies at S, ranks {not_started} ran S without, "
                                        f"ranks {elsewhere} at another step")
    clean = [r for r in survivors if results[r] is not None and not results[r].get("error")]
    placements = {results[r]["placement_hash"] for r in clean}
    if len(placements) > 1:
        trial.diverged += 1
        trial.diverged_detail.append(f"ranks without error serve {len(placements)} placements: "
                                     + ", ".join(f"{r}:{results[r]['placement_hash']}"
                                                 for r in clean))
    bad = [r for r in clean if results[r].get("weight_mismatches", 0)]
    if bad:
        trial.diverged += 1
        trial.diverged_detail.append(f"ranks {bad} saw mismatched weights without an error")
    finalize(trial)


def finalize(trial: Trial) -> None:
    """Hang, lost and unclean from the trial's record (also for --summarize on a saved run)."""
    ranks = {info["rank"]: info for info in trial.ranks}
    survivors = [r for r, info in ranks.items() if not info["killed"]]
    trial.hang_detail = [f"sidecar {n} alive but silent on its control socket"
                         for n in trial.silent_sidecars]
    trial.hang_detail += [f"rank {r} did not exit within hold timeout + 3 s of SIGTERM and wrote "
                          "no result: stuck in its loop" for r in trial.unexited
                          if not ranks[r]["result"]]
    trial.hang = len(trial.hang_detail)
    # Finished its loop and wrote its result, but the process did not exit in time (the demo
    # worker's teardown): reported, not a protocol hang.
    trial.stuck_exit = sum(1 for r in trial.unexited if ranks[r]["result"])
    errored = [r for r in survivors if not ranks[r]["result"] or ranks[r]["error"]]
    trial.errors = len(errored)
    trial.lost = 1 if errored or trial.unsafe else 0
    trial.unclean = 0
    if trial.choice.role == "worker":
        # every surviving rank must end in a recorded error, not stuck in its loop
        trial.unclean = sum(1 for r in survivors if not ranks[r]["result"]
                            or not ranks[r]["error"])


def run_trial(index: int, seed: int, roles, phases, keep: bool, log,
              fixed: tuple[str, str, str] | None = None) -> Trial:
    choice = Choice.draw(seed, roles, phases, fixed)
    trial = Trial(choice, index)
    rng = random.Random(seed * 7 + 3)
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix=f"eplbx{seed}-", dir="/tmp"))
    trial.base_dir = str(base)
    cluster: LocalCluster | None = None
    try:
        try:
            cluster = start_cluster(base, seed)
        except (TimeoutError, RuntimeError, ControlError) as exc:
            trial.setup_error = f"{type(exc).__name__}: {exc}"[:300]
            return trial
        watcher = EventWatcher(base)
        s = _status(cluster) or {}
        rate = float(s.get("steps_per_second") or 100.0)
        trial.target_reached = wait_for_target(cluster, watcher, choice.target, rng, rate)
        inject(cluster, trial)
        run_on(cluster, trial, watcher)
        results = stop_and_collect(cluster, trial)
        exit_codes = [w.poll() for w in cluster.workers]
        classify(trial, watcher, results, exit_codes)
        return trial
    finally:
        if cluster is not None:
            cluster.stop(timeout_s=5.0)
        trial.wall_s = round(time.monotonic() - started, 2)
        notable = (trial.partial or trial.diverged or trial.hang or trial.unclean or trial.unsafe
                   or (trial.lost and choice.role != "worker") or trial.setup_error)
        if not (keep or notable):  # the logs of notable trials stay for a look
            shutil.rmtree(base, ignore_errors=True)
        log(trial)


# --- reporting ----------------------------------------------------------------------------------

COLUMNS = ("trials", "partial", "diverged", "hang", "lost(sc)", "rkerr(sc)", "late", "lost(wk)",
           "unclean", "unsafe", "exitstk", "wall s")


def summarize(trials: list[Trial]) -> dict[str, Any]:
    groups: dict[tuple[str, str, str], list[Trial]] = {}
    for t in trials:
        if t.setup_error:
            continue
        groups.setdefault((t.choice.role, t.choice.fault, t.observed), []).append(t)

    def row(ts: list[Trial]) -> dict[str, Any]:
        sidecar = [t for t in ts if t.choice.role != "worker"]
        return {
            "trials": len(ts),
            "partial": sum(t.partial > 0 for t in ts),
            "diverged": sum(t.diverged > 0 for t in ts),
            "hang": sum(t.hang > 0 for t in ts),
            "lost(sc)": sum(t.lost for t in sidecar if not t.late),
            "rkerr(sc)": sum(t.errors > 0 for t in sidecar if not t.late),
            "late": sum(t.late for t in sidecar),
            "lost(wk)": sum(t.lost for t in ts if t.choice.role == "worker"),
            "unclean": sum(t.unclean for t in ts),
            "unsafe": sum(bool(t.unsafe) for t in ts),
            "exitstk": sum(t.stuck_exit > 0 for t in ts),
            "wall s": round(statistics.mean(t.wall_s for t in ts), 1) if ts else 0.0,
        }

    order = {p: i for i, p in enumerate(PHASES + ("?",))}
    rows = [{"role": k[0], "fault": k[1], "phase": k[2], **row(v)}
            for k, v in sorted(groups.items(), key=lambda kv: (ROLES.index(kv[0][0]), kv[0][1],
                                                               order.get(kv[0][2], 9)))]
    ok = [t for t in trials if not t.setup_error]
    total = {"role": "total", "fault": "", "phase": "", **row(ok)}
    total["wall s (sum)"] = round(sum(t.wall_s for t in trials), 1)
    def tag(t: Trial) -> str:
        return t.replay.removeprefix("--trial-seed ")

    violated = {
        "partial_applies": [tag(t) for t in ok if t.partial],
        "silent_divergence": [tag(t) for t in ok if t.diverged],
        "hangs": [tag(t) for t in ok if t.hang],
        "lost_after_sidecar_fault_back_in_time": [tag(t) for t in ok
                                                  if t.choice.role != "worker" and t.lost
                                                  and not t.late],
        "unclean_after_worker_kill": [tag(t) for t in ok if t.unclean],
    }
    targeting: dict[str, dict[str, int]] = {}
    for t in ok:
        targeting.setdefault(t.choice.target, {}).setdefault(t.observed, 0)
        targeting[t.choice.target][t.observed] += 1
    backs = [t.back_s for t in ok if t.back_s is not None and t.choice.fault == "kill"]
    return {"rows": rows, "total": total, "violated": violated, "targeting": targeting,
            "setup_errors": [(t.choice.seed, t.setup_error) for t in trials if t.setup_error],
            "restart_back_s": {"max": max(backs) if backs else None,
                               "median": statistics.median(backs) if backs else None}}


def print_table(summary: dict[str, Any], out=sys.stdout) -> None:
    head = f"{'role':<9}{'fault':<6}{'phase':<9}" + "".join(f"{c:>10}" for c in COLUMNS)
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in summary["rows"] + [summary["total"]]:
        print(f"{r['role']:<9}{r['fault']:<6}{r['phase']:<9}"
              + "".join(f"{r[c]:>10}" for c in COLUMNS), file=out)
    print(f"columns: trials; trials with a partial apply among surviving ranks (I1); with silent "
          f"divergence; with a hang past the timeouts; lost(sc): instances lost (a rank error or "
          f"the leader unsafe) after a sidecar fault that came back within the hold timeout "
          f"({HOLD_TIMEOUT_S:g}s; goal 0); rkerr(sc): those of them where a rank raised an error "
          f"(the rest: only the leader declared the instance unsafe); late: sidecar back after "
          f"the hold timeout (not in the goal); lost(wk): instances lost "
          f"after a worker kill (expected); unclean: surviving ranks that did not end in a clean "
          f"error after a worker kill (goal 0); unsafe: leader declared the instance unsafe; "
          f"exitstk: a worker wrote its result but its process had not exited "
          f"{HOLD_TIMEOUT_S + 3:g}s after SIGTERM (teardown, not counted as a hang); mean wall "
          f"time per trial", file=out)
    print(f"targeting (target -> observed phase: trials): {summary['targeting']}", file=out)
    print(f"sidecar restart, kill -> answering again: {summary['restart_back_s']}", file=out)
    if summary["setup_errors"]:
        print(f"trials that did not start (not counted): {summary['setup_errors']}", file=out)
    print(f"total wall time of the trials: {summary['total']['wall s (sum)']} s", file=out)
    for goal, seeds in summary["violated"].items():
        print(f"goal {goal}: {'ok' if not seeds else f'FAILED in {len(seeds)} trial(s): '}"
              + " ".join(seeds), file=out)
    print("(replay one: fault_trials.py --trial-seed SEED:ROLE:FAULT:TARGET)", file=out)


def load_trials(path: Path) -> list[Trial]:
    """The trials of a saved run, classified again with :func:`finalize`."""
    trials = []
    for d in json.loads(path.read_text())["trials"]:
        d = dict(d)
        d.pop("replay", None)
        choice = Choice(**d.pop("choice"))
        for info in d.get("ranks", []):  # runs saved before "result" was recorded
            info.setdefault("result", "last_step" in info)
        if "unexited" not in d:  # ... and before unexited / silent_sidecars were
            d["unexited"] = [int(h.split()[1]) for h in d.get("hang_detail", [])
                             if h.startswith("rank ")]
            d["silent_sidecars"] = [int(h.split()[1]) for h in d.get("hang_detail", [])
                                    if h.startswith("sidecar ")]
        known = {f for f in Trial.__dataclass_fields__}
        trial = Trial(choice=choice, **{k: v for k, v in d.items() if k in known and k != "choice"})
        if not trial.setup_error:
            finalize(trial)
        trials.append(trial)
    return trials


def _trial_line(t: Trial) -> str:
    c = t.choice
    if t.setup_error:
        return f"trial {t.index:>3} seed {c.seed}: setup failed: {t.setup_error}"
    flags = []
    if t.partial:
        flags.append("PARTIAL")
    if t.diverged:
        flags.append("DIVERGED")
    if t.hang:
        flags.append("HANG")
    if t.lost:
        flags.append("lost")
    if t.unclean:
        flags.append(f"UNCLEAN x{t.unclean}")
    if t.unsafe:
        flags.append("unsafe")
    errs = ",".join(f"{r['rank']}:{r['error_type'] or 'ok'}" for r in t.ranks if not r["killed"])
    who = c.role + (f"#{c.victim_rank}" if c.victim_rank is not None else "")
    return (f"trial {t.index:>3} {c.seed}: {who:<9} {c.fault:<4} {c.delay_s:>5.2f}s "
            f"target {c.target:<8} observed {t.observed:<8} back {t.back_s}  ranks {errs}  "
            f"[{' '.join(flags) or 'ok'}]  {t.wall_s:.1f}s"
            + (f"  (kept {t.base_dir})" if Path(t.base_dir).exists() else ""))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trial-seed", action="append", default=[],
                   help="SEED or SEED:ROLE:FAULT:TARGET (as the summary prints them): run that "
                        "trial (repeatable); replaces --trials/--seed")
    p.add_argument("--balanced", action="store_true",
                   help="trial i takes target phase i mod 5 and role x fault (i + i / 5) mod 5 "
                        "(leader kill, leader stop, follower kill, follower stop, worker kill) "
                        "instead of drawing them from its seed: any 5 trials in a row cover every "
                        "phase and every role x fault, 25 every pair")
    p.add_argument("--roles", default=",".join(ROLES))
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--max-wall", type=float, default=0.0,
                   help="stop starting trials after this many seconds (default: 60 s a trial)")
    p.add_argument("--hold-timeout", type=float, default=HOLD_TIMEOUT_S,
                   help="the workers' hold timeout (s); keep it well above a sidecar's restart "
                        "time on this machine")
    p.add_argument("--json", default=None, help="write every trial and the summary here")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="print the tables of a saved run (its --json) again and exit")
    p.add_argument("--keep", action="store_true", help="keep every trial's logs (default: only "
                   "those of trials that violated a goal)")
    args = p.parse_args(argv)
    if args.summarize:
        trials = load_trials(Path(args.summarize))
        summary = summarize(trials)
        print_table(summary)
        return 1 if any(summary["violated"].values()) else 0
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the cluster on SIGTERM too
    globals()["HOLD_TIMEOUT_S"] = args.hold_timeout  # read by the trial functions
    roles = tuple(args.roles.split(","))
    phases = tuple(args.phases.split(","))
    if not set(roles) <= set(ROLES) or not set(phases) <= set(PHASES) or args.trials < 0:
        print(f"roles must be among {ROLES}, phases among {PHASES}", file=sys.stderr)
        return 2
    plan: list[tuple[int, tuple[str, str, str] | None]] = []
    try:
        for spec in args.trial_seed:
            seed, *rest = spec.split(":")
            fixed = tuple(rest) if rest else None
            if fixed is not None and (len(fixed) != 3 or fixed[0] not in ROLES or fixed[1]
                                      not in faults_for(fixed[0]) or fixed[2] not in PHASES):
                raise ValueError(spec)
            plan.append((int(seed), fixed))
    except ValueError as exc:
        print(f"bad --trial-seed {exc}: SEED or SEED:ROLE:FAULT:TARGET", file=sys.stderr)
        return 2
    if not plan:
        combos = [(r, f) for r in roles for f in faults_for(r)]
        for i in range(args.trials):
            fixed = None
            if args.balanced:  # a Latin square: 25 trials meet every combination once
                role, fault = combos[(i + i // len(phases)) % len(combos)]
                fixed = (role, fault, phases[i % len(phases)])
            plan.append((args.seed * 1000 + i, fixed))
    seeds = [seed for seed, _ in plan]
    budget = args.max_wall or 60.0 * len(seeds)
    started = time.monotonic()
    trials: list[Trial] = []
    print(f"fault trials: {len(seeds)} trial(s), {NODES} sidecars x {PER_NODE} workers, hold "
          f"timeout {HOLD_TIMEOUT_S:g}s, done timeout {DONE_TIMEOUT_S:g}s, budget {budget:g}s",
          flush=True)
    for i, (seed, fixed) in enumerate(plan):
        if time.monotonic() - started > budget:
            print(f"stopping: {budget:g}s spent after {i} trial(s)", flush=True)
            break
        trials.append(run_trial(i, seed, roles, phases, args.keep,
                                lambda t: print(_trial_line(t), flush=True), fixed))
    summary = summarize(trials)
    print()
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"trials": [t.as_dict() for t in trials],
                                               "summary": summary}, indent=1, default=str))
    return 1 if any(summary["violated"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
