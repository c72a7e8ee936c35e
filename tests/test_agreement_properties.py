"""Stateful property test of the two-phase step agreement (DESIGN.md §4, invariants I1, I2, I5).

One leader-side :class:`EpochAgreement` and ``G`` worker-side :class:`WorkerAgreement` objects are
wired by a simulated network: one FIFO channel leader → worker ``i`` and one worker ``i`` → leader
(ZeroMQ keeps order per pipe). Hypothesis picks the schedule: deliver or drop the head of a channel,
let one worker's decode loop run a few steps, advance the clock, make a worker leave.

The network and the workers run in one of two kinds of world, drawn per example:

* **nice**: no loss, nobody leaves, no copy fails, no worker far ahead (they start within 3
  steps of each other), no timeout within reach, and the network has bounded delay for the
  messages that fix and announce S: a PLAN, PLAN_ACK or PREPARE is delivered before any worker
  runs more than ``K`` steps after it was sent, and the leader's margin is above ``3K`` (PLAN
  out, ACK in, PREPARE out: three one-way trips). PROMISE, COMMIT and DONE may take
  any time (the workers then hold at S). There, the epoch must end SUCCEEDED with every worker
  on the new placement. (Without the delay bound, a scheduler that lets one decode loop run
  ``margin`` steps between PLAN_ACK and PREPARE makes it refuse, so "no loss" alone is not
  enough for success; that is the retry's job, not a bug.)
* **hostile**: no delay bound at all (safety must hold for every schedule), and any mix of loss,
  workers leaving, a copy failing, a worker far ahead that runs in long bursts, PREPAREs that
  arrive just as a worker reaches S - 1, S or S + 1 (to provoke refusals at the boundary), small
  margins, short timeouts, and sometimes a plan with a logical expert missing (I5).

Checked after every rule and at the end:

* I1, all-or-none, in its literal form: for every decode step ``t``, every worker that ran ``t``
  ran it with the same placement. Also: no copy work (prefetch, start, landing) before the COMMIT
  reached the worker, none in an aborted epoch, chunks are the changed layers in order,
  ``layers_per_chunk`` at a time, and nobody passes S in a committed epoch without having issued
  chunk 0 at S.
* The start-ahead schedule, for the pipeline depth ``d`` of the workers' copy engine (drawn per
  example: 0, 1 or 2) and ``n`` chunks: chunk ``i`` starts at ``S + i`` and lands at
  ``S + i + min(d, n)`` (at depth 0 it is copied in one call at ``S + i``), never landed before
  started, at most ``d`` in flight,
  every chunk landed before DONE, nothing scheduled after a failed start or landing
  (``tests/machine_support.py`` holds these checks, shared with the restart machine).
* I2: every live leader phase has a finite deadline, and a tick at it ends the epoch; a worker
  holding at S is always explained by an outcome still unknown to the leader, or by a COMMIT /
  ABORT for it that is still in flight or was lost; with no loss every hold ends.
* I5: a plan with a missing expert is refused by every worker that gets it, nobody leaves IDLE,
  and the epoch never commits.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from eplb.coordinator.agreement import TERMINAL, AgreementTimeouts, EpochAgreement, Phase
from eplb.placement.rules import placement_hash, validate_placement
from eplb.proto import Abort, Commit, Message, Plan, PlanAck, Prepare, Promise, Refuse
from eplb.worker_hook.agreement import CopyChunk, WorkerAgreement, WorkerState
from tests.machine_support import RankCopies, checked, copy_kinds, holds

L, E = 3, 4
EPOCH = 5
COMMITTED_PHASES = frozenset({Phase.COMMITTED, Phase.SUCCEEDED, Phase.FAILED})
ALLOWED_TRANSITIONS = {
    (Phase.PLANNED, Phase.PREPARING), (Phase.PLANNED, Phase.ABORTED),
    (Phase.PREPARING, Phase.COMMITTED), (Phase.PREPARING, Phase.ABORTED),
    (Phase.COMMITTED, Phase.SUCCEEDED), (Phase.COMMITTED, Phase.FAILED),
}
HUGE_TIMEOUTS = AgreementTimeouts(ack_s=1e9, promise_s=1e9, done_s=1e9)
DRAIN_ROUNDS = 20_000


# --- data ---------------------------------------------------------------------------------------

@st.composite
def placement_rows(draw, num_experts: int, num_physical: int) -> list[int]:
    """One valid layer: every expert once, the redundant slots any expert, shuffled."""
    extra = draw(st.lists(st.integers(0, num_experts - 1), min_size=num_physical - num_experts,
                          max_size=num_physical - num_experts))
    return draw(st.permutations(list(range(num_experts)) + extra))


@dataclass(frozen=True)
class World:
    num_gpus: int
    num_physical: int
    current: torch.Tensor          # [L, P] placement every worker serves at the start
    plan: torch.Tensor             # [L, P] the placement of the epoch (maybe invalid)
    plan_valid: bool
    layers_per_chunk: int
    margin: int
    steps_per_second: float
    timeouts: AgreementTimeouts
    start_steps: tuple[int, ...]   # next decode step of each worker
    nice: bool
    delay_bound: int | None        # K: steps a worker may run while a PLAN/ACK/PREPARE flies
    fast: int | None               # the worker far ahead, free of any delay bound
    loss: bool
    leaving: bool
    copy_failures: bool
    tick_sizes: tuple[float, ...]
    drain_period: int              # rounds between deliveries to the leader at the end
    pipeline_depth: int            # the workers' copy engine: steps from a chunk's start to landing


@st.composite
def worlds(draw) -> World:
    num_gpus = draw(st.integers(2, 5))
    per_gpu = draw(st.sampled_from([math.ceil(E / num_gpus), math.ceil(E / num_gpus) + 1]))
    num_physical = num_gpus * per_gpu
    rows = placement_rows(E, num_physical)
    current = torch.tensor([draw(rows) for _ in range(L)], dtype=torch.int64)
    kind = draw(st.sampled_from(["moves"] * 6 + ["same", "missing expert"]))
    nice = draw(st.sampled_from([True, False, False]))
    if nice and kind == "missing expert":
        kind = "moves"
    plan = current.clone()
    if kind != "same":
        for layer in range(L):
            if draw(st.booleans()):
                plan[layer] = torch.tensor(draw(rows), dtype=torch.int64)
    if kind == "missing expert":
        layer = draw(st.integers(0, L - 1))
        gone = draw(st.integers(0, E - 1))
        other = draw(st.integers(0, E - 2))
        other += other >= gone
        plan[layer][plan[layer] == gone] = other
    if nice:
        bound = draw(st.integers(1, 3))
        margin = 3 * bound + 1 + draw(st.sampled_from([0, 0, 0, 1, 3]))
        fast = None
        loss = leaving = copy_failures = False
        timeouts = HUGE_TIMEOUTS
        tick_sizes = (0.05, 0.2, 0.5)
        sps = draw(st.sampled_from([0.0, 0.5, 1.0]))
    else:
        bound = None  # safety must hold for every schedule
        margin = draw(st.integers(0, 8))
        fast = draw(st.none() | st.integers(0, num_gpus - 1))
        loss, leaving, copy_failures = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
        timeouts = AgreementTimeouts(ack_s=draw(st.sampled_from([1.0, 3.0, 5.0])),
                                     promise_s=draw(st.sampled_from([1.0, 3.0, 5.0])),
                                     done_s=draw(st.sampled_from([4.0, 20.0])))
        tick_sizes = (0.05, 0.3, 1.0, 2.5)
        sps = draw(st.sampled_from([0.0, 0.5, 2.0]))
    base = draw(st.integers(1, 30))
    start = [base + draw(st.integers(0, 3)) for _ in range(num_gpus)]
    if fast is not None:
        start[fast] += draw(st.integers(5, 40))
    return World(num_gpus=num_gpus, num_physical=num_physical, current=current, plan=plan,
                 plan_valid=kind != "missing expert",
                 layers_per_chunk=draw(st.integers(1, 3)), margin=margin, steps_per_second=sps,
                 timeouts=timeouts, start_steps=tuple(start), nice=nice, delay_bound=bound,
                 fast=fast, loss=loss, leaving=leaving, copy_failures=copy_failures,
                 tick_sizes=tick_sizes, drain_period=draw(st.sampled_from([1, 3, 8])),
                 pipeline_depth=draw(st.sampled_from([0, 1, 1, 2])))


@dataclass
class InFlight:
    msg: object
    sent_at: tuple[int, ...]  # every worker's next step when the message was sent


def fingerprint(phys2log: torch.Tensor) -> tuple[int, ...]:
    return tuple(phys2log.flatten().tolist())


def changed_chunks(old: torch.Tensor, new: torch.Tensor, per_chunk: int) -> list[tuple[int, ...]]:
    """Independent of the code under test: the layers whose rows differ, grouped in order."""
    changed = [layer for layer in range(old.shape[0]) if old[layer].tolist() != new[layer].tolist()]
    return [tuple(changed[i:i + per_chunk]) for i in range(0, len(changed), per_chunk)]


def why(reason: str) -> str:
    """A short class of an epoch's end reason, for the statistics."""
    for needle, label in (("refused", "(refused)"), ("PLAN_ACK", "(no ack)"), ("no PROMISE", "(no promise)"),
                          ("no DONE", "(no done)"), ("left", "(worker left)"), ("copies", "(copy error)")):
        if needle in reason:
            return label
    return ""


# --- the machine --------------------------------------------------------------------------------

class AgreementNetwork(RuleBasedStateMachine):
    """A leader, G workers and 2G FIFO channels."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.world: World | None = None

    @initialize(world=worlds())
    @checked
    def setup(self, world: World) -> None:
        note(f"world: G={world.num_gpus} P={world.num_physical} nice={world.nice} "
             f"K={world.delay_bound} fast={world.fast} loss={world.loss} leaving={world.leaving} "
             f"copy_failures={world.copy_failures} margin={world.margin} "
             f"sps={world.steps_per_second} lpc={world.layers_per_chunk} "
             f"depth={world.pipeline_depth} "
             f"valid={world.plan_valid} start={world.start_steps}\n"
             f"current={world.current.tolist()}\nplan={world.plan.tolist()}")
        self.world = world
        n = world.num_gpus
        self.now = 0.0
        self.plan = Plan(epoch=EPOCH, phys2log=world.plan.clone(),
                         plan_hash=placement_hash(world.plan), layers_per_chunk=world.layers_per_chunk)
        self.leader = EpochAgreement(self.plan, frozenset(range(n)), world.margin,
                                     world.steps_per_second, self.now, world.timeouts)
        self.workers = [WorkerAgreement(r, E, n, world.current,
                                        pipeline_depth=world.pipeline_depth) for r in range(n)]
        self.engines = [RankCopies(w, functools.partial(self.before_copy_work, r))
                        for r, w in enumerate(self.workers)]
        self.commit_delivered = [False] * n
        self.next_step = list(world.start_steps)
        self.stopped = [False] * n             # left the group, or its engine stopped
        self.left = [False] * n
        self.to_worker: list[deque[InFlight]] = [deque() for _ in range(n)]
        self.to_leader: list[deque[InFlight]] = [deque() for _ in range(n)]
        self.dropped_to_worker: list[list[object]] = [[] for _ in range(n)]
        self.any_loss = False
        self.any_hold = False
        self.expected_chunks = changed_chunks(world.current, world.plan, world.layers_per_chunk)
        # (step, chunk index, layers) of every landing; (step, kind, chunk index) of all work
        self.copies: list[list[tuple[int, int, tuple[int, ...]]]] = [[] for _ in range(n)]
        self.work: list[list[tuple[int, str, int]]] = [[] for _ in range(n)]
        self.copy_failed = [False] * n
        self.ran: dict[int, tuple[int, tuple[int, ...]]] = {}  # step -> (worker, placement)
        self.replies_to_plan: list[list[object]] = [[] for _ in range(n)]
        self.sent: list[tuple[object, Phase, Phase]] = []  # (message, phase before, phase after)
        self.phase = self.leader.phase
        self.broadcast(self.leader.start(), Phase.PLANNED)

    # --- plumbing -------------------------------------------------------------------------------

    def live(self) -> list[int]:
        return [i for i in range(len(self.workers)) if not self.stopped[i]]

    def stamp(self) -> tuple[int, ...]:
        return tuple(self.next_step)

    def broadcast(self, msgs: list, phase_before: Phase) -> None:
        for msg in msgs:
            self.sent.append((msg, phase_before, self.leader.phase))
            for i in self.live():
                self.to_worker[i].append(InFlight(msg, self.stamp()))
        self.after_leader_event(phase_before)

    def after_leader_event(self, phase_before: Phase) -> None:
        phase = self.leader.phase
        if phase is not phase_before:
            assert (phase_before, phase) in ALLOWED_TRANSITIONS, (phase_before, phase)
        self.phase = phase

    def leader_receives(self, item: InFlight) -> None:
        before = self.leader.phase
        self.broadcast(self.leader.on_message(item.msg, self.now), before)

    def worker_receives(self, i: int, item: InFlight) -> None:
        w = self.workers[i]
        started = self.next_step[i] - 1  # the step the decode loop has started
        replies = w.on_message(item.msg, started)
        if isinstance(item.msg, Commit) and item.msg.epoch == EPOCH:
            self.commit_delivered[i] = True
        if isinstance(item.msg, Plan):
            self.replies_to_plan[i] += replies
        for reply in replies:
            self.from_worker(i, reply)

    def may_advance(self, i: int) -> bool:
        """The delay bound: worker ``i`` may not run more than K steps past the moment any
        PLAN, PLAN_ACK or PREPARE still in flight was sent (the fast worker is exempt). Those are
        the messages that must beat the workers to S; PROMISE, COMMIT and the rest may take any
        time, which only makes the workers hold at S."""
        w = self.world
        if self.stopped[i] or holds(self.workers[i], self.next_step[i]):
            return False
        if w.delay_bound is None or i == w.fast:
            return True
        limit = self.next_step[i] + 1 - w.delay_bound
        return all(item.sent_at[i] >= limit
                   for channel in self.to_worker + self.to_leader for item in channel
                   if isinstance(item.msg, (Plan, PlanAck, Prepare)))

    def run_one_step(self, i: int, fail: type | None = None) -> bool:
        """One iteration of worker ``i``'s decode loop; False if it holds or its copy failed.
        ``fail``: the first :class:`StartChunk` or :class:`LandChunk` of this step fails."""
        w, step = self.workers[i], self.next_step[i]
        if holds(w, step):
            self.any_hold = True
            (hold,) = w.actions_at(step)
            assert hold.epoch == EPOCH and hold.step == self.leader.switch_step == step
            return False
        ran, replies = self.engines[i].run_step(step, fail)
        for reply in replies:
            self.from_worker(i, reply)
        if not ran:  # a copy failed: DESIGN §4.7, the engine stops, it never serves again
            self.copy_failed[i] = self.stopped[i] = True
            self.to_worker[i].clear()
            return False
        self.record_step(i, step)
        self.next_step[i] = step + 1
        return True

    def from_worker(self, i: int, reply: Message) -> None:
        """A reply of worker ``i`` leaves for the leader."""
        self.to_leader[i].append(InFlight(reply, self.stamp()))

    def before_copy_work(self, i: int, kind: str, step: int, chunk: CopyChunk) -> None:
        """I1: copy work only in a committed epoch whose COMMIT reached this worker, on the
        expected chunks (the schedule itself is checked by :class:`RankCopies`)."""
        assert self.leader.phase in COMMITTED_PHASES, f"{kind} in phase {self.leader.phase}"
        assert any(isinstance(m, Commit) for m, _, _ in self.sent), f"{kind} without COMMIT"
        assert self.commit_delivered[i], f"rank {i}: {kind} before the COMMIT reached it"
        assert chunk.epoch == EPOCH and self.workers[i].switch_step == self.leader.switch_step
        assert chunk.num_chunks == len(self.expected_chunks)
        assert chunk.layers == self.expected_chunks[chunk.index]
        self.work[i].append((step, kind, chunk.index))
        if kind == "land":
            self.copies[i].append((step, chunk.index, chunk.layers))

    def record_step(self, i: int, step: int) -> None:
        """I1 literally: every worker that runs step ``step`` runs it on the same placement."""
        mine = fingerprint(self.workers[i].phys2log)
        other = self.ran.setdefault(step, (i, mine))
        assert other[1] == mine, (
            f"I1 broken at step {step}: rank {other[0]} ran it on {list(other[1])}, rank {i} on "
            f"{list(mine)} (S={self.leader.switch_step}, leader {self.leader.phase.value})")

    # --- rules ----------------------------------------------------------------------------------

    @precondition(lambda self: any(self.to_worker[i] for i in self.live()))
    @rule(data=st.data())
    @checked
    def deliver_to_worker(self, data) -> None:
        i = data.draw(st.sampled_from([i for i in self.live() if self.to_worker[i]]), label="to worker")
        self.maybe_late(i, data)
        self.worker_receives(i, self.to_worker[i].popleft())

    def maybe_late(self, i: int, data) -> None:
        """A PREPARE about to arrive may arrive just as the decode loop gets to S - 1, S or S + 1."""
        if isinstance(self.to_worker[i][0].msg, Prepare) and self.may_advance(i):
            late = data.draw(st.sampled_from([None, -1, 0, 1]), label=f"PREPARE reaches {i} at S +")
            if late is not None:
                self.run_up_to(i, self.leader.switch_step + late)

    @precondition(lambda self: any(self.to_leader))
    @rule(data=st.data())
    @checked
    def deliver_to_leader(self, data) -> None:
        i = data.draw(st.sampled_from([i for i, c in enumerate(self.to_leader) if c]), label="from worker")
        self.leader_receives(self.to_leader[i].popleft())

    @precondition(lambda self: any(self.to_worker[i] for i in self.live()) or any(self.to_leader))
    @rule(data=st.data())
    @checked
    def deliver_a_round(self, data) -> None:
        """The head of every channel arrives (a quick round of the network)."""
        for i in self.live():
            if self.to_worker[i]:
                self.maybe_late(i, data)
                self.worker_receives(i, self.to_worker[i].popleft())
        for i in range(len(self.to_leader)):
            if self.to_leader[i]:
                self.leader_receives(self.to_leader[i].popleft())

    @precondition(lambda self: self.world.loss and any(self.to_worker + self.to_leader))
    @rule(data=st.data())
    @checked
    def drop(self, data) -> None:
        channels = [("to", i) for i in self.live() if self.to_worker[i]]
        channels += [("from", i) for i, c in enumerate(self.to_leader) if c]
        way, i = data.draw(st.sampled_from(channels), label="drop")
        self.any_loss = True
        if way == "to":
            self.dropped_to_worker[i].append(self.to_worker[i].popleft().msg)
        else:
            self.lost_on_the_way_up(self.to_leader[i].popleft().msg)

    def lost_on_the_way_up(self, msg: Message) -> None:
        """``msg`` was dropped on its way to the leader (a subclass may note what it was)."""

    @precondition(lambda self: any(self.may_advance(i) for i in self.live()))
    @rule(data=st.data())
    @checked
    def advance(self, data) -> None:
        i = data.draw(st.sampled_from([i for i in self.live() if self.may_advance(i)]), label="worker")
        burst = data.draw(st.integers(1, 12 if i == self.world.fast else 8), label="steps")
        for _ in range(burst):
            if not self.may_advance(i):
                break
            if not self.run_one_step(i, self.draw_failure(i, data)):
                break

    @precondition(lambda self: any(self.may_advance(i) for i in self.live()))
    @rule(data=st.data())
    @checked
    def run_until_blocked(self, data) -> None:
        """One decode loop runs while the network stalls: until it holds, hits the delay bound,
        or has run 30 steps."""
        i = data.draw(st.sampled_from([i for i in self.live() if self.may_advance(i)]), label="worker")
        for _ in range(30):
            if not self.may_advance(i) or not self.run_one_step(i):
                break

    def draw_failure(self, i: int, data) -> type | None:
        """In a world with copy failures: whether the start or landing worker ``i`` is about to
        carry out fails (:class:`StartChunk`, :class:`LandChunk` or None)."""
        kinds = copy_kinds(self.workers[i], self.next_step[i])
        if not (self.world.copy_failures and kinds):
            return None
        return data.draw(st.sampled_from([None, *kinds]), label=f"copy on rank {i} fails at")

    def racing(self) -> list[int]:
        return [i for i in self.live() if self.may_advance(i)
                and any(isinstance(x.msg, Prepare) for x in self.to_worker[i])]

    @precondition(lambda self: self.racing())
    @rule(data=st.data())
    @checked
    def race_to_s(self, data) -> None:
        """A worker with a PREPARE in flight runs right up to S, or just past it: the boundary
        of "promise iff step < S"."""
        i = data.draw(st.sampled_from(self.racing()), label="racer")
        self.run_up_to(i, self.leader.switch_step + data.draw(st.integers(-1, 1), label="to S +"))

    def run_up_to(self, i: int, next_step: int) -> None:
        """Worker ``i`` runs until its next step is ``next_step``, unless it must stop before."""
        while self.next_step[i] < next_step and self.may_advance(i) and self.run_one_step(i):
            pass

    @precondition(lambda self: any(self.may_advance(i) for i in self.live()))
    @rule(data=st.data())
    @checked
    def advance_everyone(self, data) -> None:
        """Every decode loop that may runs one step (EP ranks move roughly together)."""
        for i in self.live():
            if self.may_advance(i):
                self.run_one_step(i, self.draw_failure(i, data))

    @rule(data=st.data())
    @checked
    def tick(self, data) -> None:
        self.now += data.draw(st.sampled_from(self.world.tick_sizes), label="dt")
        before, deadline = self.leader.phase, self.leader.deadline
        self.broadcast(self.leader.on_tick(self.now), before)
        if before not in TERMINAL and self.now >= deadline:
            assert self.leader.finished, f"I2: {before.value} went past its deadline {deadline}"

    @precondition(lambda self: self.world.leaving and len(self.live()) > 1)
    @rule(data=st.data())
    @checked
    def leave(self, data) -> None:
        i = data.draw(st.sampled_from(self.live()), label="leaves")
        self.stopped[i] = self.left[i] = True
        self.to_worker[i].clear()  # what it has sent may still arrive
        before = self.leader.phase
        self.broadcast(self.leader.on_worker_left(i, "simulated exit", self.now), before)

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    @checked
    def leader_is_consistent(self) -> None:
        ag = self.leader
        assert ag.phase is self.phase
        if not ag.finished:
            assert math.isfinite(ag.deadline), "I2: a live phase without a finite deadline"
        commits = [(m, before) for m, before, _ in self.sent if isinstance(m, Commit)]
        aborts = [m for m, _, _ in self.sent if isinstance(m, Abort)]
        prepares = [m for m, _, _ in self.sent if isinstance(m, Prepare)]
        assert len(commits) <= 1 and len(aborts) <= 1 and len(prepares) <= 1
        assert not (commits and aborts), "an epoch both committed and aborted"
        if prepares:
            assert ag.switch_step == prepares[0].step
            assert ag.effective_margin >= max(2, self.world.margin)
            assert ag.switch_step == max(ag.acked_steps.values()) + ag.effective_margin
        if commits:
            assert commits[0][1] is Phase.PREPARING
            assert ag.promised == ag.ranks, "COMMIT before every PROMISE"
            assert commits[0][0].step == ag.switch_step
        if ag.phase is Phase.ABORTED:
            assert aborts and aborts[0].epoch == EPOCH
        if ag.phase is Phase.SUCCEEDED:
            assert set(ag.done) == ag.ranks and all(d.ok for d in ag.done.values())

    @invariant()
    @checked
    def all_or_none(self) -> None:
        ag = self.leader
        if any(self.work) or any(w.state is WorkerState.COPYING for w in self.workers):
            assert ag.phase in COMMITTED_PHASES
        if ag.phase is Phase.ABORTED:
            assert not any(self.work), "copy work (prefetch, start, landing) in an aborted epoch"
            for w in self.workers:
                assert w.state in (WorkerState.IDLE, WorkerState.PLANNED, WorkerState.PROMISED)
                assert torch.equal(w.phys2log, self.world.current)
        if ag.phase in COMMITTED_PHASES and self.expected_chunks:
            s = ag.switch_step
            for i, w in enumerate(self.workers):
                if self.next_step[i] > s:
                    issued = [x for x in self.work[i] if x[1] != "prefetch"]
                    assert issued and issued[0][0] == s and issued[0][2] == 0, (
                        f"rank {i} passed S={s} of a committed epoch without issuing chunk 0 "
                        f"at S: {self.work[i]}")
        for i, w in enumerate(self.workers):
            if not self.copies[i]:  # (a plan without changes finishes at COMMIT, and equals it)
                assert torch.equal(w.phys2log, self.world.current), f"rank {i} switched unseen"

    @invariant()
    @checked
    def pipeline_is_bounded(self) -> None:
        """At most ``d`` chunks started and not landed; nothing scheduled after a failed copy."""
        for i, engine in enumerate(self.engines):
            e = engine.epoch(EPOCH)
            if e is not None:
                assert 0 <= e.in_flight() <= self.world.pipeline_depth, e
                assert len(e.lands) <= len(e.starts) or self.world.pipeline_depth == 0
            assert self.copy_failed[i] == engine.failed
            engine.check_quiet_after_failure(self.next_step[i])

    @invariant()
    @checked
    def holds_are_explained(self) -> None:
        """I2 for workers: a hold lasts only while the outcome is unknown to the worker because
        the leader has not decided, or its decision is in flight, or was lost."""
        ag = self.leader
        for i in self.live():
            if not holds(self.workers[i], self.next_step[i]):
                continue
            (action,) = self.workers[i].actions_at(self.next_step[i])
            self.any_hold = True
            assert ag.phase is not Phase.PLANNED
            if ag.phase is Phase.PREPARING:
                continue
            in_flight = [x.msg for x in self.to_worker[i] if isinstance(x.msg, (Commit, Abort))]
            lost = [m for m in self.dropped_to_worker[i] if isinstance(m, (Commit, Abort))]
            assert in_flight or lost, (
                f"I2: rank {i} holds at S={action.step} but the leader ({ag.phase.value}) has no "
                "COMMIT/ABORT in flight to it and none was lost")

    @invariant()
    @checked
    def invalid_plans_are_refused(self) -> None:
        """I5."""
        if self.world.plan_valid:
            return
        assert self.leader.phase in (Phase.PLANNED, Phase.ABORTED)
        assert not any(isinstance(m, (Prepare, Commit)) for m, _, _ in self.sent)
        for i, w in enumerate(self.workers):
            assert w.state is WorkerState.IDLE
            assert torch.equal(w.phys2log, self.world.current)
            assert all(isinstance(r, Refuse) and r.epoch == EPOCH and "invalid plan" in r.reason
                       for r in self.replies_to_plan[i])

    # --- the end --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Let the run finish without loss. In rounds: every decode loop that may runs one step,
        then the head of every channel to a worker arrives, and the head of every channel to the
        leader too, but only every ``drain_period`` rounds while some worker has promised (so
        that workers race the network to S and hold). Until no message is in flight and nobody
        is copying or short of its S."""
        for round_ in range(DRAIN_ROUNDS):
            in_flight = any(self.to_worker[i] for i in self.live()) or any(self.to_leader)
            busy = [i for i in self.live()
                    if self.workers[i].state is WorkerState.COPYING
                    or (self.workers[i].state is WorkerState.PROMISED
                        and self.next_step[i] < self.workers[i].switch_step)]
            if not in_flight and not busy:
                return
            for i in self.live():
                if self.may_advance(i):
                    self.run_one_step(i)
            for i in self.live():
                if self.to_worker[i]:
                    self.worker_receives(i, self.to_worker[i].popleft())
            waiting = any(self.workers[i].state in (WorkerState.PROMISED, WorkerState.COPYING)
                          for i in self.live())
            period = self.world.drain_period  # PROMISE comes back slowly: workers reach S first
            if round_ % period == period - 1 or not waiting:
                for i in range(len(self.to_leader)):
                    if self.to_leader[i]:
                        self.leader_receives(self.to_leader[i].popleft())
            self.holds_are_explained()
            self.all_or_none()
        raise AssertionError(f"the network did not settle within {DRAIN_ROUNDS} rounds")

    def teardown(self) -> None:
        if self.broken or self.world is None:
            return  # a rule or invariant already failed; let its error stand
        kind = "nice" if self.world.nice else "hostile"
        event(f"{kind}: drain starts in {self.leader.phase.value}")
        self.drain()
        self.holds_are_explained()
        ag = self.leader
        event(f"{kind}: ends {ag.phase.value} {why(ag.reason)}".strip())
        event(f"{kind}: copies={any(self.copies)} hold={self.any_hold} loss={self.any_loss}")
        if self.world.nice:
            assert ag.phase is Phase.SUCCEEDED, (
                f"nice world ended {ag.phase.value}: {ag.reason!r} (S={ag.switch_step})")
        # I2: the deadline of a live phase really ends it.
        if not ag.finished:
            self.now = max(self.now, ag.deadline)
            before = ag.phase
            self.broadcast(ag.on_tick(self.now), before)
            assert ag.finished, f"I2: phase {ag.phase.value} outlived its deadline"
            self.drain()
        self.all_or_none()
        self.leader_is_consistent()
        self.invalid_plans_are_refused()
        for i in self.live():
            w = self.workers[i]
            if holds(w, self.next_step[i]):
                assert self.any_loss, f"I2: rank {i} holds forever although nothing was lost"
                assert any(isinstance(m, (Commit, Abort)) for m in self.dropped_to_worker[i]), (
                    f"I2: rank {i} holds forever, yet no COMMIT/ABORT to it was lost")
            assert w.state is not WorkerState.COPYING
        if ag.phase is Phase.SUCCEEDED:
            for i, w in enumerate(self.workers):
                if not self.stopped[i] or i in ag.done:
                    assert torch.equal(w.phys2log, self.world.plan), f"rank {i} not on the plan"
                    s = ag.switch_step
                    d = min(self.world.pipeline_depth, len(self.expected_chunks))
                    assert self.copies[i] == [
                        (s + k + d, k, layers) for k, layers in enumerate(self.expected_chunks)]
                    if self.expected_chunks:
                        e = self.engines[i].epoch(EPOCH)
                        assert (e.starts, e.lands) == self.engines[i].expected(
                            EPOCH, self.expected_chunks)
                        assert e.done
        if not self.world.plan_valid:
            assert ag.phase is Phase.ABORTED
            if not self.any_loss and not any(self.left):
                assert all(len(r) == 1 and isinstance(r[0], Refuse) for r in self.replies_to_plan), (
                    "I5: every worker must refuse the invalid plan")
        if self.world.plan_valid:  # (a check of the generator itself)
            validate_placement(self.world.plan, E, self.world.num_physical, self.world.num_gpus, L)


AgreementNetwork.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_agreement_network = AgreementNetwork.TestCase


# --- direct properties --------------------------------------------------------------------------


@st.composite
def invalid_plans(draw):
    num_gpus = draw(st.integers(2, 4))
    num_physical = num_gpus * draw(st.sampled_from([math.ceil(E / num_gpus), math.ceil(E / num_gpus) + 1]))
    rows = placement_rows(E, num_physical)
    current = torch.tensor([draw(rows) for _ in range(L)], dtype=torch.int64)
    plan = torch.tensor([draw(rows) for _ in range(L)], dtype=torch.int64)
    layer, gone = draw(st.integers(0, L - 1)), draw(st.integers(0, E - 1))
    other = draw(st.integers(0, E - 2))
    plan[layer][plan[layer] == gone] = other + (other >= gone)
    return num_gpus, current, plan


@settings(max_examples=100, deadline=None)
@given(invalid_plans(), st.integers(0, 100))
def test_a_plan_missing_an_expert_is_refused_by_every_worker_and_never_commits(case, step):
    num_gpus, current, plan = case
    msg = Plan(epoch=EPOCH, phys2log=plan, plan_hash=placement_hash(plan), layers_per_chunk=1)
    leader = EpochAgreement(msg, frozenset(range(num_gpus)), 2, 0.0, 0.0)
    workers = [WorkerAgreement(r, E, num_gpus, current) for r in range(num_gpus)]
    replies = [r for w in workers for r in w.on_message(msg, step)]
    assert [type(r) for r in replies] == [Refuse] * num_gpus
    assert {r.rank for r in replies} == set(range(num_gpus))
    out = []
    for r in replies:
        out += leader.on_message(r, 0.1)
    assert leader.phase is Phase.ABORTED and [type(m) for m in out] == [Abort]
    for w in workers:
        out = w.on_message(Prepare(epoch=EPOCH, step=step + 5), step)
        assert isinstance(out[0], Refuse)
        assert w.on_message(Commit(epoch=EPOCH, step=step + 5), step) == []
        assert w.state is WorkerState.IDLE and torch.equal(w.phys2log, current)


@st.composite
def races(draw):
    """A valid epoch, and for each worker how far (``next step - S``) its decode loop has got when
    PREPARE reaches it: below, at or just past the boundary of "promise iff step < S"."""
    num_gpus = draw(st.integers(2, 5))
    num_physical = num_gpus * draw(st.sampled_from([math.ceil(E / num_gpus), math.ceil(E / num_gpus) + 1]))
    rows = placement_rows(E, num_physical)
    current = torch.tensor([draw(rows) for _ in range(L)], dtype=torch.int64)
    plan = torch.tensor([draw(rows) for _ in range(L)], dtype=torch.int64)
    acked = [draw(st.integers(0, 50)) for _ in range(num_gpus)]
    offsets = draw(st.lists(st.sampled_from([-3, -1, 0, 0, 1, 1, 2]), min_size=num_gpus,
                            max_size=num_gpus))
    return (num_gpus, current, plan, acked, offsets, draw(st.integers(0, 4)),
            draw(st.integers(1, 3)))


@settings(max_examples=150, deadline=None)
@given(races())
def test_every_worker_switches_at_s_or_nobody_does(race):
    """I1 at its boundary, deterministically: PREPARE reaches each worker at a chosen distance from
    S; the epoch commits iff every worker had started a step below S, and every decode step is run
    on one placement by all workers."""
    num_gpus, current, plan_tensor, acked, offsets, margin, per_chunk = race
    plan = Plan(epoch=EPOCH, phys2log=plan_tensor, plan_hash=placement_hash(plan_tensor),
                layers_per_chunk=per_chunk)
    leader = EpochAgreement(plan, frozenset(range(num_gpus)), margin, 0.0, 0.0)
    workers = [WorkerAgreement(r, E, num_gpus, current) for r in range(num_gpus)]
    engines = [RankCopies(w) for w in workers]
    next_step = [a + 1 for a in acked]  # worker r has started step acked[r]
    ran: dict[int, tuple[int, tuple[int, ...]]] = {}
    first_copy: dict[int, int] = {}

    def run(r: int, until: int) -> None:
        while next_step[r] < until:
            ok, replies = engines[r].run_step(next_step[r])
            if not ok:
                return
            to_leader.extend(replies)
            e = engines[r].epoch(EPOCH)
            if e is not None and e.lands:
                first_copy.setdefault(r, e.lands[0][0])
            mine = fingerprint(workers[r].phys2log)
            other = ran.setdefault(next_step[r], (r, mine))
            assert other[1] == mine, f"I1: step {next_step[r]} run on two placements"
            next_step[r] += 1

    to_leader: list = []
    prepare = []
    for r, w in enumerate(workers):
        assert w.on_message(plan, acked[r]) == [PlanAck(rank=r, epoch=EPOCH, step=acked[r])]
    for r in range(num_gpus):
        prepare += leader.on_message(PlanAck(rank=r, epoch=EPOCH, step=acked[r]), 0.1)
    assert [type(m) for m in prepare] == [Prepare]
    s = prepare[0].step
    assert s == max(acked) + max(2, margin)
    answers = []
    for r, w in enumerate(workers):
        run(r, s + offsets[r])  # the decode loop gets this far before PREPARE arrives
        assert next_step[r] == max(acked[r] + 1, s + offsets[r])
        answers += w.on_message(prepare[0], next_step[r] - 1)
    promised = [next_step[r] - 1 < s for r in range(num_gpus)]
    assert [type(a) for a in answers] == [Promise if p else Refuse for p in promised]
    outcome = []
    for answer in answers:
        outcome += leader.on_message(answer, 0.2)
    if all(promised):
        assert outcome == [Commit(epoch=EPOCH, step=s)] and leader.phase is Phase.COMMITTED
    else:
        assert [type(m) for m in outcome] == [Abort] and leader.phase is Phase.ABORTED
    for r in range(num_gpus):  # promised workers may now reach S before the outcome arrives
        run(r, s + 2)
        assert next_step[r] <= s or not promised[r]
    for r, w in enumerate(workers):
        to_leader.extend(w.on_message(outcome[0], next_step[r] - 1))
    chunks = changed_chunks(current, plan_tensor, per_chunk)
    for r in range(num_gpus):
        run(r, s + len(chunks) + 3)
    for message in to_leader:
        leader.on_message(message, 0.3)
    if all(promised):
        assert leader.phase is Phase.SUCCEEDED
        assert all(torch.equal(w.phys2log, plan_tensor) for w in workers)
        assert first_copy == ({r: s for r in range(num_gpus)} if chunks else {})
    else:
        assert first_copy == {} and all(torch.equal(w.phys2log, current) for w in workers)
