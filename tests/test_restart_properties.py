"""Stateful property test: crashes, restarts and pauses of every role against the real sans-IO
cores (DESIGN.md §5, invariants I1 and I2; issue 13).

A :class:`LeaderCore` (whose :class:`Persist` outputs go to a simulated disk that survives its
crash), ``G`` :class:`WorkerAgreement` objects and 2G FIFO channels. Ranks are split over two
nodes: node 0 holds the leader, node 1 a follower sidecar. Hypothesis picks the schedule among:

* deliver or drop (only while a fault is in progress) the head of a channel;
* decode steps, a tick of the clock;
* **the leader crashes and restarts**: everything in flight to or from it is lost, a new
  ``LeaderCore`` is restored from the disk, and every rank rejoins (HELLO with its current,
  possibly half-switched, placement and last applied epoch);
* **the follower crashes and restarts**: what is in flight to or from its ranks is lost, the
  leader sees its ranks leave, then rejoin;
* **a pause** of the follower: its ranks' messages are delayed (they stay queued) while the
  leader ticks on;
* a promised rank **asks for the outcome** (the hook does so every heartbeat).

Checked: I1 in its literal form (every rank that runs decode step ``t`` runs it on the same
placement) across every crash, every restart and every epoch; the start-ahead copy schedule of
every epoch on every rank, for the pipeline depth drawn per example (``tests/machine_support.py``:
chunk ``i`` starts at ``S + i`` and lands ``min(d, n)`` steps later, in order, never more than
``d`` in flight, all landed before DONE); and, after a final calm phase
(no loss, the leader alive, queries answered), no rank is left holding and every rank serves the
placement the leader adopted — no engine instance is lost to one sidecar fault.
"""

from __future__ import annotations

from collections import deque

import torch
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from eplb.coordinator.agreement import AgreementTimeouts
from eplb.coordinator.leader import (Broadcast, ComputePlan, LeaderConfig, LeaderCore, Persist,
                                     SendTo)
from eplb.placement.planner import PlanResult
from eplb.placement.rules import default_placement
from eplb.proto import Counts, Hello
from eplb.worker_hook.agreement import WorkerAgreement
from tests.machine_support import RankCopies, checked, holds

L, E, P = 3, 4, 8
TIMEOUTS = AgreementTimeouts(ack_s=2.0, promise_s=2.0, done_s=1e6)  # done: wait for the ranks
CALM_ROUNDS = 400


def plans() -> st.SearchStrategy[torch.Tensor]:
    """A valid placement that differs from the default in some layers."""

    @st.composite
    def build(draw) -> torch.Tensor:
        p = default_placement(L, E, P)
        for layer in range(L):
            if draw(st.booleans()):
                p[layer] = torch.tensor(draw(st.permutations(list(range(E)) * 2)))
        return p

    return build()


def fingerprint(phys2log: torch.Tensor) -> tuple[int, ...]:
    return tuple(phys2log.flatten().tolist())


class RestartNetwork(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    @initialize(num_gpus=st.sampled_from([2, 4]), plan=plans(), margin=st.integers(2, 6),
                depth=st.sampled_from([0, 1, 2]))
    @checked
    def setup(self, num_gpus: int, plan: torch.Tensor, margin: int, depth: int) -> None:
        note(f"G={num_gpus} margin={margin} depth={depth} plan={plan.tolist()}")
        self.n = num_gpus
        self.node = [0 if r < num_gpus // 2 else 1 for r in range(num_gpus)]
        self.plan = plan
        self.config = LeaderConfig(min_margin=margin, max_retries=2, timeouts=TIMEOUTS,
                                   interval_steps=10 ** 9)
        self.disk: list = []
        self.now = 0.0
        self.workers = [WorkerAgreement(r, E, num_gpus, default_placement(L, E, P),
                                        pipeline_depth=depth) for r in range(num_gpus)]
        self.engines = [RankCopies(w) for w in self.workers]
        self.next_step = [5] * num_gpus
        self.to_worker: list[deque] = [deque() for _ in range(num_gpus)]
        self.to_leader: list[deque] = [deque() for _ in range(num_gpus)]
        self.paused = False
        self.down = False  # the follower sidecar is dead: nothing reaches its ranks
        self.faults = 0
        self.ran: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.leader = self.new_leader(restore=False)
        self.joined = set(range(num_gpus))
        self.leader.on_message(Counts(rank=0, from_step=0, to_step=5,
                                      counts=torch.ones(L, E, dtype=torch.int64)), self.now)
        self.force()

    # --- plumbing -------------------------------------------------------------------------------

    def new_leader(self, restore: bool) -> LeaderCore:
        core = LeaderCore(self.config)
        if restore:
            self.execute(core.restore(list(self.disk), self.now), core)
        for r in range(self.n):
            self.hello(r, core)
        return core

    def hello(self, r: int, core: LeaderCore | None = None) -> None:
        core = core or self.leader
        w = self.workers[r]
        msg = Hello(rank=r, node=self.node[r], world_size=self.n, num_layers=L, num_experts=E,
                    num_physical=P, bytes_per_expert=1, step=self.next_step[r] - 1, pid=r,
                    phys2log=w.phys2log.clone(), applied_epoch=w.applied_epoch)
        error = core.on_hello(msg, self.now)
        assert not error, f"rank {r} refused on rejoin: {error}"
        self.execute(core.on_joined(r), core)

    def force(self) -> None:
        if self.leader.request_rebalance(force=True)[0]:
            self.execute(self.leader.on_tick(self.now))

    def execute(self, outputs: list, core: LeaderCore | None = None) -> None:
        core = core or self.leader
        for out in outputs:
            if isinstance(out, Persist):
                self.disk.append(out.record)
            elif isinstance(out, Broadcast):  # reaches the joined ranks whose sidecar is up
                for r in core.workers:
                    if self.reachable(r):
                        self.to_worker[r].append(out.msg)
            elif isinstance(out, SendTo):
                if self.reachable(out.rank):
                    self.to_worker[out.rank].append(out.msg)
            elif isinstance(out, ComputePlan):
                result = PlanResult(self.plan.clone(), 0.5, 0.9, 1, 0.0, "")
                self.execute(core.on_plan_result(out.request_id, result, self.now), core)

    def reachable(self, r: int) -> bool:
        return not (self.down and self.node[r] == 1)

    def deliverable(self, r: int) -> bool:
        return self.reachable(r) and not (self.paused and self.node[r] == 1)

    def run_step(self, r: int) -> bool:
        w, step = self.workers[r], self.next_step[r]
        ran, replies = self.engines[r].run_step(step)
        if not ran:
            return False
        if self.reachable(r):  # a DONE sent while its sidecar is dead is lost
            self.to_leader[r].extend(replies)
        mine = fingerprint(w.phys2log)
        other = self.ran.setdefault(step, (r, mine))
        assert other[1] == mine, (f"I1 broken at step {step}: rank {other[0]} ran it on "
                                  f"{list(other[1])}, rank {r} on {list(mine)}")
        self.next_step[r] = step + 1
        return True

    # --- rules (no preconditions: every rule is always enabled, a no-op where nothing applies) --

    @rule(data=st.data())
    @checked
    def deliver(self, data) -> None:
        r = data.draw(st.integers(0, self.n - 1), label="rank")
        if not self.deliverable(r):
            return
        if data.draw(st.booleans(), label="to the worker") and self.to_worker[r]:
            msg = self.to_worker[r].popleft()
            self.to_leader[r].extend(self.workers[r].on_message(msg, self.next_step[r] - 1))
        elif self.to_leader[r]:
            self.execute(self.leader.on_message(self.to_leader[r].popleft(), self.now))

    @rule()
    @checked
    def deliver_a_round(self) -> None:
        """The head of every channel that can move arrives."""
        for r in range(self.n):
            if self.deliverable(r) and self.to_worker[r]:
                msg = self.to_worker[r].popleft()
                self.to_leader[r].extend(self.workers[r].on_message(msg, self.next_step[r] - 1))
            if self.deliverable(r) and self.to_leader[r]:
                self.execute(self.leader.on_message(self.to_leader[r].popleft(), self.now))

    @rule(data=st.data())
    @checked
    def advance(self, data) -> None:
        r = data.draw(st.integers(0, self.n - 1), label="rank")
        for _ in range(data.draw(st.integers(1, 6), label="steps")):
            if not self.run_step(r):
                break

    @rule(dt=st.sampled_from([0.1, 0.5, 2.5]))
    @checked
    def tick(self, dt: float) -> None:
        self.now += dt
        self.execute(self.leader.on_tick(self.now))

    @rule()
    @checked
    def ask_outcome(self) -> None:
        """Every promised rank whose sidecar is up asks (the hook does, every heartbeat)."""
        for r, w in enumerate(self.workers):
            query = w.outcome_query()
            if query is not None and self.deliverable(r):
                self.to_leader[r].append(query)

    @rule(kind=st.sampled_from(["leader crash", "follower crash", "follower restart",
                                "follower pause", "follower resume"]))
    @checked
    def fault(self, kind: str) -> None:
        if kind == "follower restart" and self.down:
            self.follower_restarts()
        elif kind == "follower resume":
            self.paused = False
        elif self.faults >= 4:
            return
        elif kind == "leader crash":
            self.faults += 1
            for r in range(self.n):  # in flight to and from the dead leader: lost
                self.to_worker[r].clear()
                self.to_leader[r].clear()
            self.now += 1.0
            self.leader = self.new_leader(restore=True)
        elif kind == "follower crash" and not self.down:
            self.faults += 1
            self.down = True
            for r in range(self.n):
                if self.node[r] == 1:
                    self.to_worker[r].clear()
                    self.to_leader[r].clear()
                    self.execute(self.leader.on_worker_left(r, "node 1 lost", self.now))
        elif kind == "follower pause":
            self.faults += 1
            self.paused = True

    def follower_restarts(self) -> None:
        self.down = False
        for r in range(self.n):
            if self.node[r] == 1:
                self.hello(r)

    @rule()
    @checked
    def another_rebalance(self) -> None:
        if self.leader.agreement is None and not self.leader.unsafe_reason:
            self.plan = self.plan.flip(1)
            self.force()

    @invariant()
    @checked
    def nobody_unsafe_without_evidence(self) -> None:
        # No copy ever fails here, and no rank lies about its placement: nothing is evidence.
        assert not self.leader.unsafe_reason, self.leader.unsafe_reason

    def teardown(self) -> None:
        if self.broken or not hasattr(self, "workers"):
            return
        # Calm: no faults, no loss, queries answered. Every hold must end, every rank converge.
        self.paused = False
        if self.down:
            self.follower_restarts()
        for _ in range(CALM_ROUNDS):
            for r in range(self.n):
                if self.workers[r].outcome_query():
                    self.to_leader[r].append(self.workers[r].outcome_query())
                while self.to_worker[r]:
                    for reply in self.workers[r].on_message(self.to_worker[r].popleft(),
                                                            self.next_step[r] - 1):
                        self.to_leader[r].append(reply)
                while self.to_leader[r]:
                    self.execute(self.leader.on_message(self.to_leader[r].popleft(), self.now))
                self.run_step(r)
            self.now += 0.1
            self.execute(self.leader.on_tick(self.now))
        holding = [r for r in range(self.n) if holds(self.workers[r], self.next_step[r])]
        assert not holding, f"ranks {holding} still hold: the instance would be lost"
        assert not self.leader.unsafe_reason, self.leader.unsafe_reason
        assert self.leader.agreement is None, f"epoch still in flight: {self.leader.status()}"
        served = {fingerprint(w.phys2log) for w in self.workers}
        assert served == {fingerprint(self.leader.placement)}, "ranks diverged from the leader"


RestartNetwork.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestRestartNetwork = RestartNetwork.TestCase

