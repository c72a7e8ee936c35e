"""The mesh's scenarios, what they measure, and the consistency checks.

Each scenario sets the relay's link model, forces epochs one after another (a bounded number,
within a time budget) and collects, from the leader's history, every record of the requests it
made: outcome and PREPARE -> COMMIT time (``agreement_ms``: the leader sends PREPARE until every
PROMISE is in). The partition scenario also takes one follower's link down for a few seconds
while it forces epochs, brings it up, and forces epochs until one commits (recovery).

The checks (:func:`check`) run once the workers have stopped and written their reports:

- the leader is not unsafe and no epoch ``failed``; every record is committed, aborted or
  skipped;
- every rank's report exists and has no failure (hold timeout, copy failure);
- no rank copied (switched layers) for an epoch it got no COMMIT for, or that the leader did not
  commit; no rank got a COMMIT for an epoch the leader aborted; every rank got the COMMIT of
  every committed epoch;
- every rank serves the leader's placement at the end (one hash);
- after a partition, a later forced epoch committed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eplb.control_client import ControlError, control_call

from mesh.cluster import Mesh

log = logging.getLogger("eplb.mesh")


class Outcome(str, enum.Enum):
    """What became of one forced rebalance request."""

    ENDED = "ended"  # records in the leader's history
    REFUSED = "refused"  # the leader refused the request (e.g. group incomplete)
    TIMED_OUT = "timed_out"  # not ended within the wait


@dataclass(frozen=True)
class Scenario:
    """One scenario: the relay's link model (:class:`mesh.relay.Profile` fields) and, for a
    partition, how long one follower's link stays down."""

    key: str
    title: str
    profile: dict[str, float]
    partition_s: float = 0.0


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("a", "0.1 ms, no loss", {"mean_ms": 0.1, "jitter_ms": 0.0, "loss": 0.0}),
    Scenario("b", "1 ms +- 0.3 ms, 0.5 % loss", {"mean_ms": 1.0, "jitter_ms": 0.3, "loss": 0.005}),
    Scenario("c", "2 ms +- 0.5 ms, 1 % loss", {"mean_ms": 2.0, "jitter_ms": 0.5, "loss": 0.01}),
    Scenario("d", "0.5 ms +- 0.1 ms, one follower cut off", {"mean_ms": 0.5, "jitter_ms": 0.1,
                                                             "loss": 0.0}, partition_s=6.0),
)}


@dataclass
class Result:
    """What one scenario measured."""

    scenario: Scenario
    records: list[dict] = field(default_factory=list)  # leader history records of its requests
    refused: int = 0
    timed_out: int = 0
    relay: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    mesh_cores: float = 0.0  # CPU seconds of the mesh's processes / wall seconds
    machine_busy: float = 0.0  # fraction of all cores busy (every process on the machine)
    partition: dict[str, Any] = field(default_factory=dict)

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r["outcome"]] = out.get(r["outcome"], 0) + 1
        return out

    def agreement_ms(self) -> list[float]:
        return [r["agreement_ms"] for r in self.records
                if r["outcome"] == "committed" and r["agreement_ms"] is not None]

    def as_dict(self) -> dict[str, Any]:
        agree = self.agreement_ms()
        return {"scenario": self.scenario.key, "title": self.scenario.title,
                "profile": self.scenario.profile, "outcomes": self.outcomes(),
                "refused": self.refused, "timed_out": self.timed_out,
                "agreement_p50_ms": pct(agree, 0.5), "agreement_p99_ms": pct(agree, 0.99),
                "agreement_max_ms": max(agree, default=None), "relay": relay_summary(self.relay),
                "wall_s": round(self.wall_s, 1), "mesh_cores": round(self.mesh_cores, 2),
                "machine_busy": round(self.machine_busy, 3), "partition": self.partition,
                "records": self.records}


def pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


def relay_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Totals over the relay's peers: chunks, lost chunks, and the worst peer's achieved delay."""
    peers = stats.get("peers", {})
    return {"peers": len(peers), "chunks": sum(p["chunks"] for p in peers.values()),
            "lost": sum(p["lost"] for p in peers.values()),
            "delay_p50_ms": _median([p["delay_p50_ms"] for p in peers.values()]),
            "delay_p99_ms": max((p["delay_p99_ms"] or 0 for p in peers.values()), default=None)}


def _median(values: list[float | None]) -> float | None:
    v = sorted(x for x in values if x is not None)
    return v[len(v) // 2] if v else None


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class Driver:
    """Forces epochs on the mesh's leader and waits for them, within deadlines.

    Args:
        mesh: a started mesh.
        epoch_timeout_s: the longest wait for one forced epoch to end.
        tick: called on every poll (the partition scenario brings the link back from it).
    """

    def __init__(self, mesh: Mesh, epoch_timeout_s: float) -> None:
        self.mesh = mesh
        self.epoch_timeout_s = epoch_timeout_s
        self.tick: Callable[[], None] = lambda: None

    def idle(self, deadline: float) -> bool:
        """Wait until no epoch is in flight or planned; False at the deadline."""
        while time.monotonic() < deadline:
            self.tick()
            s = self.mesh.status(timeout_s=2.0)
            if s is not None and s["epoch_in_flight"] is None and not s["planning"]:
                return True
            time.sleep(0.02)
        return False

    def force(self, deadline: float) -> tuple[Outcome, list[dict]]:
        """Force one rebalance and wait for it to end; (outcome, its history records)."""
        deadline = min(deadline, time.monotonic() + self.epoch_timeout_s)
        if not self.idle(deadline):
            return Outcome.TIMED_OUT, []
        try:
            reply = control_call("rebalance", {"force": True, "by": "bench/mesh"},
                                 self.mesh.run_dir(0), timeout_s=5.0)
        except ControlError as exc:
            log.info("rebalance refused: %s", exc)
            return Outcome.REFUSED, []
        return _wait_request(self, reply["request"], deadline)


def run_scenario(mesh: Mesh, sc: Scenario, epochs: int, budget_s: float, victim: int,
                 epoch_timeout_s: float, settle_s: float) -> Result:
    """Run one scenario: ``epochs`` committed epochs wanted (at most ``2 epochs + 2`` requests),
    within ``budget_s``. With a partition: the victim's link goes down right after the first
    request, epochs are forced while it is down, it comes up after ``partition_s``, then epochs
    are forced until ``epochs`` more commit. After a skipped request (the plan matched the
    placement: no fresh counts yet) the next waits ``settle_s`` (a counts flush interval)."""
    result = Result(sc)
    state: dict[str, float | None] = {"down_at": None, "up_at": None}  # the partition's times
    driver = Driver(mesh, epoch_timeout_s)
    mesh.relay({"cmd": "set", **sc.profile})
    started = time.monotonic()
    deadline = started + budget_s
    driver.idle(deadline)
    mesh.relay({"cmd": "stats", "reset": True})
    cpu0, (busy0, total0) = mesh.cpu_seconds(), machine_jiffies()

    asked_at = [time.monotonic()]

    def take(outcome: Outcome, records: list[dict]) -> None:
        if sc.partition_s > 0 and state["down_at"] is not None:
            # [asked, ended] in seconds after the link went down, and what became of it
            result.partition.setdefault("timeline", []).append(
                [round(asked_at[0] - state["down_at"], 2),
                 round(time.monotonic() - state["down_at"], 2),
                 [r["outcome"] for r in records] or outcome.value])
        result.records += records
        result.refused += outcome is Outcome.REFUSED
        result.timed_out += outcome is Outcome.TIMED_OUT
        if outcome is Outcome.REFUSED:
            time.sleep(0.2)  # the group is incomplete: ask again shortly
        elif records and all(r["outcome"] == "skipped" for r in records):
            time.sleep(settle_s)  # the plan matched the placement: let fresh counts come

    if sc.partition_s > 0:
        part = result.partition
        part["victim"] = victim

        def tick() -> None:
            if state["up_at"] is None and state["down_at"] is not None \
                    and time.monotonic() - state["down_at"] >= sc.partition_s:
                mesh.topo.set_link(victim, up=True)
                state["up_at"] = time.monotonic()
                log.info("node %d: link up again", victim)

        driver.tick = tick
        n_before = 0
        # During the partition: the first request, then more until the link is back.
        while state["up_at"] is None and time.monotonic() < deadline:
            if state["down_at"] is None:
                driver.idle(deadline)
                asked_at[0] = time.monotonic()
                try:
                    reply = control_call("rebalance", {"force": True, "by": "bench/mesh"},
                                         mesh.run_dir(0), timeout_s=5.0)
                except ControlError as exc:
                    log.info("rebalance refused before the partition: %s", exc)
                    take(Outcome.REFUSED, [])
                    continue
                mesh.topo.set_link(victim, up=False)
                state["down_at"] = time.monotonic()
                log.info("node %d: link down (request %s just forced)", victim, reply["request"])
                take(*_wait_request(driver, reply["request"], deadline))
            else:
                asked_at[0] = time.monotonic()
                take(*driver.force(deadline))
            n_before = len(result.records)
        if state["up_at"] is None and state["down_at"] is not None:
            tick_deadline = state["down_at"] + sc.partition_s
            while time.monotonic() < tick_deadline:
                time.sleep(0.05)
            tick()
        part["during"] = [r["outcome"] for r in result.records[:n_before]]
        part["refused_during"] = result.refused
        committed_after = 0
        tries = 0
        while committed_after < epochs and tries < 4 * epochs + 20 and time.monotonic() < deadline:
            tries += 1
            asked_at[0] = time.monotonic()
            outcome, records = driver.force(deadline)
            take(outcome, records)
            if any(r["outcome"] == "committed" for r in records):
                committed_after += 1
                if committed_after == 1:
                    part["first_commit_after_up_s"] = round(time.monotonic() - state["up_at"], 2)
        part["after"] = [r["outcome"] for r in result.records[n_before:]]
        part["recovered"] = committed_after > 0
    else:
        committed = 0
        for _ in range(2 * epochs + 2):
            if committed >= epochs or time.monotonic() >= deadline:
                break
            outcome, records = driver.force(deadline)
            take(outcome, records)
            committed += sum(r["outcome"] == "committed" for r in records)
    result.wall_s = time.monotonic() - started
    result.relay = mesh.relay({"cmd": "stats"})
    busy1, total1 = machine_jiffies()
    result.mesh_cores = (mesh.cpu_seconds() - cpu0) / max(result.wall_s, 1e-9)
    result.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
    return result


def _wait_request(driver: Driver, request: int, deadline: float) -> tuple[Outcome, list[dict]]:
    deadline = min(deadline, time.monotonic() + driver.epoch_timeout_s)
    while time.monotonic() < deadline:
        driver.tick()
        s = driver.mesh.status(timeout_s=2.0)
        if s is not None and s["epoch_in_flight"] is None and not s["planning"]:
            records = [r for r in s["history"] if r.get("request") == request]
            if records:
                return Outcome.ENDED, records
        time.sleep(0.02)
    return Outcome.TIMED_OUT, []


def check(results: list[Result], status: dict[str, Any] | None,
          reports: dict[int, dict], world: int) -> list[str]:
    """The consistency checks of the module docstring; the problems found (empty: all held)."""
    problems: list[str] = []
    if status is None:
        return ["the leader did not answer at the end"]
    if status.get("unsafe"):
        problems.append(f"leader unsafe: {status['unsafe']}")
    counters = status.get("counters", {})
    if counters.get("failed", 0):
        problems.append(f"{counters['failed']} epoch(s) failed")
    records = [r for res in results for r in res.records]
    bad = [r for r in records if r["outcome"] not in ("committed", "aborted", "skipped")]
    if bad:
        problems.append(f"records neither committed, aborted nor skipped: {bad}")
    committed = {r["epoch"] for r in records if r["outcome"] == "committed"}
    # An epoch whose request timed out here may still have been committed after (its retries
    # outlasting --epoch-timeout): the leader's own history (its last 50 records) says so.
    committed |= {r["epoch"] for r in status.get("history", []) if r["outcome"] == "committed"}
    aborted = {r["epoch"] for r in records if r["outcome"] == "aborted"}
    # Epochs the leader committed outside our requests' records (none expected): from its counters.
    for rank in range(world):
        rep = reports.get(rank)
        if rep is None:
            problems.append(f"rank {rank}: no report")
            continue
        if rep["failure"]:
            problems.append(f"rank {rank}: {rep['failure']}")
        commits, aborts = set(rep["commits"]), set(rep["aborts"])
        copied = {c[0] for c in rep["copies"]}
        if copied - commits:
            problems.append(f"rank {rank}: copied for epoch(s) {sorted(copied - commits)} "
                            "without a COMMIT")
        if copied - committed:
            problems.append(f"rank {rank}: copied for epoch(s) {sorted(copied - committed)} the "
                            "leader did not commit")
        if commits & aborted:
            problems.append(f"rank {rank}: COMMIT of aborted epoch(s) {sorted(commits & aborted)}")
        if commits & aborts:
            problems.append(f"rank {rank}: both COMMIT and ABORT of {sorted(commits & aborts)}")
        if committed - commits:
            problems.append(f"rank {rank}: no COMMIT of committed epoch(s) "
                            f"{sorted(committed - commits)}")
        if rep["placement_hash"] != status.get("placement_hash"):
            problems.append(f"rank {rank}: serves placement {rep['placement_hash']}, the leader "
                            f"{status.get('placement_hash')}")
    for res in results:
        if res.scenario.partition_s > 0 and not res.partition.get("recovered"):
            problems.append(f"scenario {res.scenario.key}: no epoch committed after the link "
                            "came back")
    return problems
