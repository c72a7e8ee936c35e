"""One simulated cluster: N nodes x R ranks, the real cores, a virtual clock.

Time is virtual seconds. Nothing sleeps and nothing touches a socket: every frame is a message
object handed from one core to another at a time the network model (:mod:`eplb.sim.network`)
computes. Every call into a core goes through :mod:`eplb.sim.cores`.

What is modelled, and how:

* **Decode steps, lockstep.** An EP group runs its all-to-alls every step, so no rank gets ahead
  of the others by more than the step in progress. Group step ``k`` starts at ``G_k``; rank ``r``
  calls its hook's ``on_step(k)`` at ``G_k + off_r`` (``off_r`` uniform in
  ``[0, rank_skew_s)``, the per-rank jitter) and the step lasts ``step_s`` with relative jitter
  ``step_jitter``. A rank holding at S, or copying a chunk, delays the whole group's next step
  (the others wait in the all-to-all). The slow node's steps take ``slow_factor`` times longer,
  which in lockstep paces the whole group.
* **Frames.** worker -> its sidecar over ipc (``ipc_s``), the follower relays at once over its
  TCP link to the leader (:class:`~eplb.sim.network.Network`); the leader's broadcasts go to
  each follower in turn (``send_s`` of the leader's CPU per frame) and on to its workers by ipc.
  Workers send what the hook sends: HELLO, HEARTBEAT (+ OUTCOME_QUERY while promised) every
  ``heartbeat_s``, COUNTS every ``flush_every`` steps (within the hook's 50 ms outbox poll), and
  the agreement's replies. Followers send NODE_HEARTBEAT every ``heartbeat_s``.
* **The leader is a queue.** It handles one item at a time, in arrival order, its tick (every
  ``tick_s``) first when due, as the sidecar's event loop does. Each item costs the CPU time the
  real core took on it in this process (``time.thread_time`` around the call; or a fixed cost,
  :class:`Costs`) plus the real decoder's time on that frame type (calibrated once), plus
  ``send_s`` per frame it sends to a follower and ``persist_s`` per decision it writes. Frames
  wait while it is busy.
* **Planning.** The real planner runs once per cluster shape (cached in-process) on the modelled
  load; every ComputePlan is answered ``planner_s`` later, alternately with that plan and with
  the start placement, so every epoch moves experts. Epochs are started one after another with
  the core's ``request_rebalance`` (``gap_s`` after the last one ended); the counts still flow,
  so the leader pays for them.
* **Membership.** Node heartbeats and node timeouts live in the sidecar today, not in the core:
  :func:`nodes_timed_out` is that logic, marked, to be replaced when it moves into the core.
* **Faults.** A slow node (frames delayed by ``slow_extra_s``, steps ``slow_factor`` slower);
  a dead node (stops stepping and sending when the leader sends the PLAN of epoch
  ``dead_at_epoch``); loss (:class:`~eplb.sim.network.NetworkModel`).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from eplb.sim import cores
from eplb.sim.cores import (EpochView, Kind, LeaderPort, LeaderSettings, NeedPlan, RankPort,
                            Step, ToAll, ToRank)
from eplb.sim.network import Network, NetworkModel

#: The hook's socket thread picks counts snapshots up within this long (hook.OUTBOX_POLL_S).
OUTBOX_POLL_S = 0.05


@dataclass(frozen=True)
class Costs:
    """What the leader's and workers' CPU is charged.

    ``measured``: the real core calls' own CPU time in this process (thread time) and the real
    decoder's median time per frame type; otherwise ``core_s`` per core call, ``decode_s`` per
    frame (``counts_decode_s`` for COUNTS) and ``worker_plan_s`` for a worker's PLAN (the
    deterministic mode the tests use).
    """

    measured: bool = True
    core_s: float = 20e-6
    decode_s: float = 5e-6
    counts_decode_s: float = 60e-6
    worker_plan_s: float = 1e-3
    send_s: float = 5e-6  # leader CPU per frame sent to a follower (ZeroMQ send)
    persist_s: float = 0.5e-3  # one decision-log append with fsync


@dataclass(frozen=True)
class Scenario:
    """One simulation. Shapes default to DeepSeek-V3 (58 MoE layers, 256 experts)."""

    nodes: int
    ranks_per_node: int = 8
    num_layers: int = 58
    num_experts: int = 256
    redundant: int = 32  # P = E + redundant, rounded up to a multiple of the EP size
    bytes_per_expert: int = 44_000_000
    step_s: float = 0.020
    step_jitter: float = 0.05
    rank_skew_s: float = 0.5e-3
    copy_chunk_s: float = 0.004
    flush_every: int = 64  # 0: one COUNTS per rank at the start, none after
    heartbeat_s: float = 0.5
    node_timeout_s: float = 3.0
    tick_s: float = 0.02
    join_spread_s: float = 0.2
    #: HELLOs handled before the clock starts (their CPU is reported, not queued): 8,000 ranks
    #: joining at once cost the leader about a minute, which would time out every follower.
    prejoin: bool = True
    epochs: int = 10
    first_epoch_s: float = 1.5  # after the group is complete (the leader needs 1 s of rate)
    gap_s: float = 0.5
    planner_s: float = 0.05
    hold_timeout_s: float = 30.0
    leader: LeaderSettings = field(default_factory=LeaderSettings)
    network: NetworkModel = field(default_factory=NetworkModel)
    costs: Costs = field(default_factory=Costs)
    slow_node: int | None = None
    slow_factor: float = 1.5
    dead_node: int | None = None
    dead_at_epoch: int = 1
    seed: int = 0
    max_virtual_s: float = 300.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def num_physical(self) -> int:
        g = self.world_size
        return -(-(self.num_experts + self.redundant) // g) * g


# --- MEMBERSHIP: the sidecar's node-timeout rule (eplb/coordinator/sidecar.py, _tick_loop). ----
# Replace this function when node membership moves into the leader core.
def nodes_timed_out(now: float, seen: dict[int, float], timeout_s: float) -> list[int]:
    """Followers not heard from (any frame) for more than ``timeout_s``."""
    return [node for node, last in seen.items() if now - last > timeout_s]
# --- end MEMBERSHIP ------------------------------------------------------------------------------


_PLANS: dict[tuple, Any] = {}


def cached_plan(sc: Scenario, load: torch.Tensor, start: torch.Tensor) -> tuple[Any, float]:
    """The real planner's result for this shape and load (computed once per process), and its
    wall seconds."""
    key = (sc.num_layers, sc.num_experts, sc.num_physical, sc.world_size, sc.seed)
    if key not in _PLANS:
        t0 = time.perf_counter()
        plan = cores.make_plan(load, start, sc.world_size)
        _PLANS[key] = (plan, time.perf_counter() - t0)
    return _PLANS[key]


def modelled_load(sc: Scenario) -> torch.Tensor:
    """One rank's counts over ``flush_every`` steps: ``[L, E]`` int64, Zipf(1) over the experts,
    shuffled per layer (32 tokens a step, 8 experts a token)."""
    gen = torch.Generator().manual_seed(sc.seed)
    weights = 1.0 / torch.arange(1, sc.num_experts + 1, dtype=torch.float64)
    weights /= weights.sum()
    per = max(1, sc.flush_every) * 32 * 8
    rows = [(weights[torch.randperm(sc.num_experts, generator=gen)] * per).round().to(torch.int64)
            for _ in range(sc.num_layers)]
    return torch.stack(rows)


@dataclass
class _Rank:
    port: RankPort
    node: int
    off: float
    alive: bool = True
    hold_since: float | None = None
    watched_step: int | None = None


@dataclass
class EpochTrace:
    """What the simulator saw of one epoch (besides the leader's own record)."""

    epoch: int
    plan_sent: float = math.nan
    prepare_sent: float = math.nan
    switch_step: int | None = None
    max_acked: int | None = None
    prepare_steps: dict[int, int] = field(default_factory=dict)  # rank -> step at PREPARE
    commit_steps: dict[int, int] = field(default_factory=dict)  # rank -> step at COMMIT
    last_prepare_at: float = 0.0
    last_commit_at: float = 0.0
    promised: set[int] = field(default_factory=set)
    copied_at: dict[int, int] = field(default_factory=dict)  # rank -> step of its chunk 0
    holds: int = 0
    max_hold_s: float = 0.0

    @property
    def margin(self) -> int | None:
        if self.switch_step is None or self.max_acked is None:
            return None
        return self.switch_step - self.max_acked

    @property
    def needed_margin(self) -> int | None:
        """The smallest margin with which no rank would have reached S before this epoch's
        outcome (COMMIT, else PREPARE) arrived: max step at arrival + 1 - max PLAN_ACK step."""
        steps = self.commit_steps or self.prepare_steps
        if not steps or self.max_acked is None:
            return None
        return max(steps.values()) + 1 - self.max_acked


@dataclass
class SimResult:
    scenario: Scenario
    history: list[EpochView]
    traces: dict[int, EpochTrace]
    virtual_s: float
    wall_s: float
    steady_s: float  # virtual seconds from the group's completion to the end
    leader_cpu: dict[str, float]  # seconds charged after the group was complete, by item kind
    join_cpu_s: float  # leader CPU on the HELLOs
    queue_waits: list[float]  # after the group was complete
    node_lost: list[tuple[int, float]]  # (node, when noticed)
    dead_at: float | None
    violations: list[str]
    failures: list[str]
    rtt: tuple[float, float]
    plan_wall_s: float
    retransmissions: int

    def summary(self) -> dict[str, Any]:
        """Plain values, equal for equal seeds under fixed costs."""
        return {
            "history": [(h.epoch, h.outcome, h.switch_step, h.margin,
                         None if h.agreement_ms is None else round(h.agreement_ms, 9))
                        for h in self.history],
            "traces": [(t.epoch, t.switch_step, t.max_acked, round(t.last_commit_at, 9),
                        sorted(t.commit_steps.items())) for t in self.traces.values()],
            "node_lost": self.node_lost, "virtual_s": round(self.virtual_s, 9),
            "violations": self.violations,
        }


class Simulation:
    """Build with a :class:`Scenario`, then :meth:`run`."""

    def __init__(self, sc: Scenario) -> None:
        torch.set_num_threads(1)
        self.sc = sc
        self.rng = random.Random(sc.seed)
        self.net = Network(sc.network, random.Random(sc.seed + 1), slow=sc.slow_node)
        self._q: list[tuple[float, int, Callable, tuple]] = []
        self._seq = 0
        self.now = 0.0
        L, E, P, G = sc.num_layers, sc.num_experts, sc.num_physical, sc.world_size
        self.start = cores.start_placement(L, E, P)
        self.load = modelled_load(sc)
        self.plan, self.plan_wall_s = cached_plan(sc, self.load * G, self.start)
        self.leader = LeaderPort(sc.leader)
        self.ranks = [_Rank(RankPort(r, r // sc.ranks_per_node, G, E, self.start,
                                     sc.bytes_per_expert), r // sc.ranks_per_node,
                            self.rng.uniform(0.0, sc.rank_skew_s)) for r in range(G)]
        self.node_ranks = [list(range(n * sc.ranks_per_node, (n + 1) * sc.ranks_per_node))
                           for n in range(sc.nodes)]
        self.node_alive = [True] * sc.nodes
        self._decode_s = self._calibrate_decode()
        # group step timeline
        self.k = 0
        self.Gk = 0.0
        self._base_next = 0.0
        self._extra = 0.0
        self._pending: set[int] = set()
        self._end_token = 0
        self._prepare_S: int | None = None
        # leader queue
        self._inbox: list[tuple[float, int, int, Any]] = []  # (arrival, seq, node, item)
        self._leader_free = 0.0
        self._wake_at = math.inf
        self._wake_token = 0
        self._next_tick = 0.0
        self._next_beat = 0.0
        self.node_seen: dict[int, float] = {}
        # bookkeeping
        self.traces: dict[int, EpochTrace] = {}
        self.cpu: dict[str, float] = defaultdict(float)
        self.join_cpu_s = 0.0
        self.queue_waits: list[float] = []  # seconds each item waited in the leader's queue
        self._cpu_at_complete: dict[str, float] = {}
        self._waits_at_complete = 0
        self.node_lost: list[tuple[int, float]] = []
        self.dead_at: float | None = None
        self.violations: list[str] = []
        self.failures: list[str] = []
        self.complete_at: float | None = None
        self._attempts_requested = 0
        self._idle_since: float | None = None
        self._sizes: dict[Kind, int] = {}
        self._plan_sizes: dict[int, int] = {}

    # --- event queue ---------------------------------------------------------------------------

    def at(self, t: float, fn: Callable, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._q, (t, self._seq, fn, args))

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        sc = self.sc
        for r, rk in enumerate(self.ranks):
            if sc.prejoin:
                hello = rk.port.hello(0)
                (error, _), cost = self._charge("HELLO", lambda: self.leader.hello(hello, 0.0))
                self.join_cpu_s += cost + self._decode_s[Kind.HELLO]
                if error:
                    self.failures.append(f"HELLO refused: {error}")
            else:
                self.at(self.rng.uniform(0.0, sc.join_spread_s), self._join, r)
            self.at(self.rng.uniform(0.0, sc.heartbeat_s), self._heartbeat, r)
            if not sc.flush_every:  # one COUNTS each: the leader starts no epoch on an empty window
                self.at(sc.join_spread_s + self.rng.uniform(0.0, sc.join_spread_s),
                        self._send_counts, r, 1)
        for node in range(1, sc.nodes):
            self.node_seen[node] = 0.0
            self.at(self.rng.uniform(0.0, sc.heartbeat_s), self._node_heartbeat, node)
        self.at(0.0, self._step_begin, 0)
        self._wake(0.0)
        self.at(0.1, self._driver)
        while self._q:
            t, _, fn, args = heapq.heappop(self._q)
            if t > sc.max_virtual_s:
                break
            self.now = t
            if fn(*args) is StopIteration:
                break
        self._final_checks()
        steady = self.now - (self.complete_at or 0.0)
        cpu = {k: v - self._cpu_at_complete.get(k, 0.0) for k, v in self.cpu.items()}
        return SimResult(sc, self.leader.history(), self.traces, self.now,
                         time.perf_counter() - wall0, steady, cpu, self.join_cpu_s,
                         self.queue_waits[self._waits_at_complete:], self.node_lost, self.dead_at,
                         self.violations, self.failures, self.net.rtt_quantiles(),
                         self.plan_wall_s, self.net.retransmissions)

    # --- the epochs: started one after another ----------------------------------------------------

    def _driver(self) -> Any:
        sc = self.sc
        if self.complete_at is None and self.leader.group_complete:
            self.complete_at = self.now
            self._cpu_at_complete = dict(self.cpu)
            self._waits_at_complete = len(self.queue_waits)
        history = self.leader.history()
        attempts = sum(1 for h in history if h.epoch is not None)
        busy = self.leader.epoch_in_flight() is not None or self._attempts_requested > len(history)
        if not busy:
            self._idle_since = self.now if self._idle_since is None else self._idle_since
        else:
            self._idle_since = None
        if not busy and self.node_lost and (self.dead_at is not None
                                            or not self.leader.group_complete):
            return StopIteration  # nothing more can start: the group is incomplete
        dead_pending = self.dead_at is not None and not self.node_lost
        if attempts >= sc.epochs and not busy and not dead_pending:
            return StopIteration  # (a dead node is waited for until it is noticed)
        if (self.complete_at is not None and not busy and self.leader.group_complete
                and self.now >= self.complete_at + sc.first_epoch_s
                and self._idle_since is not None and self.now - self._idle_since >= sc.gap_s):
            self._attempts_requested = len(history) + 1
            self._to_leader(0, self.now, ("control",))
        self.at(self.now + 0.05, self._driver)
        return None

    # --- group steps ---------------------------------------------------------------------------

    def _step_time(self) -> float:
        sc = self.sc
        d = sc.step_s * (1.0 + sc.step_jitter * self.rng.gauss(0.0, 1.0))
        if sc.slow_node is not None and self.node_alive[sc.slow_node]:
            d *= sc.slow_factor
        return max(0.5 * sc.step_s, d)

    def _step_begin(self, k: int) -> None:
        sc = self.sc
        self.k, self.Gk = k, self.now
        self._base_next = self.now + self._step_time()
        self._extra = 0.0
        for r, rk in enumerate(self.ranks):
            if not rk.alive:
                continue
            p = rk.port
            if ((p.promised or p.copying) and p.switch_step is not None and p.switch_step <= k) \
                    or (p.planned and self._prepare_S == k):
                self._watch(r, k)
        if sc.flush_every and k and k % sc.flush_every == 0:
            for r, rk in enumerate(self.ranks):
                if rk.alive:
                    self.at(self.now + rk.off + self.rng.uniform(0.0, OUTBOX_POLL_S),
                            self._send_counts, r, k)
        self._maybe_end_step()

    def _watch(self, r: int, k: int) -> None:
        rk = self.ranks[r]
        if rk.watched_step == k:
            return
        rk.watched_step = k
        self._pending.add(r)
        self.at(self.Gk + rk.off, self._rank_step, r, k)

    def _maybe_end_step(self) -> None:
        if self._pending:
            return
        self._end_token += 1
        self.at(self._base_next + self._extra, self._step_end, self._end_token)

    def _step_end(self, token: int) -> None:
        if token != self._end_token or self._pending:
            return
        self._step_begin(self.k + 1)

    def step_of(self, r: int, t: float) -> int:
        """The step rank ``r``'s decode loop has started at ``t``."""
        return self.k if t >= self.Gk + self.ranks[r].off else max(0, self.k - 1)

    def _rank_step(self, r: int, k: int) -> None:
        """Rank ``r``'s hook runs on_step(k) (only for the ranks the agreement concerns)."""
        rk = self.ranks[r]
        if not rk.alive or k != self.k:
            self._resolved(r, self.now)
            return
        self._act(r)

    def _act(self, r: int) -> None:
        rk = self.ranks[r]
        action = rk.port.action_at(self.k)
        if action is Step.HOLD:
            if rk.hold_since is None:
                rk.hold_since = self.now
                self.at(self.now + self.sc.hold_timeout_s, self._hold_timeout, r, self.k)
            return
        if rk.hold_since is not None:
            held = self.now - rk.hold_since
            rk.port.held(held)
            trace = self.traces.get(rk.port.epoch)
            if trace is not None:
                trace.holds += 1
                trace.max_hold_s = max(trace.max_hold_s, held)
            rk.hold_since = None
        if action is Step.COPY:
            epoch = rk.port.epoch
            if rk.port.chunk_index() == 0:
                self._check_i1(r, epoch)
            done_at = self.now + self.sc.copy_chunk_s
            for msg in rk.port.chunk_copied(self.sc.copy_chunk_s):
                self._rank_send(r, msg, done_at)
            self._resolved(r, done_at)
            return
        self._resolved(r, self.now)

    def _resolved(self, r: int, resume: float) -> None:
        if r not in self._pending:
            return
        self._pending.discard(r)
        self._extra = max(self._extra, resume - (self.Gk + self.ranks[r].off))
        self._maybe_end_step()

    def _hold_timeout(self, r: int, k: int) -> None:
        rk = self.ranks[r]
        if rk.alive and rk.hold_since is not None and self.k == k:
            self.failures.append(f"rank {r}: held at step {k} for {self.sc.hold_timeout_s:g}s "
                                 "without an outcome (HoldTimeout)")
            rk.alive = False
            rk.hold_since = None
            self._resolved(r, self.now)

    def _check_i1(self, r: int, epoch: int) -> None:
        """Invariant I1 from the workers' side: a rank starts copying only when every rank of
        the group promised this epoch, and all at the same step."""
        trace = self.traces.setdefault(epoch, EpochTrace(epoch))
        if not trace.copied_at:
            missing = set(range(self.sc.world_size)) - trace.promised
            if missing:
                self.violations.append(f"epoch {epoch}: rank {r} copies at step {self.k} but "
                                       f"ranks {sorted(missing)[:8]} never promised")
        trace.copied_at[r] = self.k
        if len(set(trace.copied_at.values())) > 1:
            self.violations.append(f"epoch {epoch}: ranks copy at steps "
                                   f"{sorted(set(trace.copied_at.values()))}")

    def _final_checks(self) -> None:
        for epoch, trace in self.traces.items():
            if trace.copied_at and len(trace.copied_at) != self.sc.world_size:
                live = {r for r, rk in enumerate(self.ranks) if rk.alive}
                if not live <= set(trace.copied_at):
                    self.violations.append(f"epoch {epoch}: only {len(trace.copied_at)} of "
                                           f"{self.sc.world_size} ranks copied")

    # --- workers -------------------------------------------------------------------------------

    def _join(self, r: int) -> None:
        rk = self.ranks[r]
        if rk.alive:
            self._rank_send(r, rk.port.hello(self.step_of(r, self.now)), self.now)

    def _heartbeat(self, r: int) -> None:
        rk = self.ranks[r]
        if not rk.alive:
            return
        self._rank_send(r, rk.port.heartbeat(self.step_of(r, self.now)), self.now)
        query = rk.port.outcome_query()
        if query is not None:
            self._rank_send(r, query, self.now)
        self.at(self.now + self.sc.heartbeat_s, self._heartbeat, r)

    def _send_counts(self, r: int, k: int) -> None:
        rk = self.ranks[r]
        if rk.alive:
            self._rank_send(r, rk.port.counts(max(0, k - self.sc.flush_every), k, self.load),
                            self.now)

    def _rank_receive(self, r: int, msg: Any) -> None:
        rk = self.ranks[r]
        if not rk.alive:
            return
        kind = cores.kind_of(msg)
        step = self.step_of(r, self.now)
        epoch = cores.epoch_of(msg)
        if kind is Kind.PLAN and not self.sc.costs.measured:
            replies = rk.port.on_message(msg, step)
            cost = self.sc.costs.worker_plan_s
        else:
            t0 = time.thread_time()
            replies = rk.port.on_message(msg, step)
            cost = time.thread_time() - t0 if self.sc.costs.measured else 0.0
        trace = self.traces.get(epoch) if epoch is not None else None
        if trace is not None:
            if kind is Kind.PREPARE:
                trace.prepare_steps[r] = step
                trace.last_prepare_at = max(trace.last_prepare_at, self.now)
            elif kind is Kind.COMMIT:
                trace.commit_steps.setdefault(r, step)
                trace.last_commit_at = max(trace.last_commit_at, self.now)
        for reply in replies:
            if cores.kind_of(reply) is Kind.PROMISE and trace is not None:
                trace.promised.add(r)
            self._rank_send(r, reply, self.now + cost)
        if rk.hold_since is not None:  # holding at S: the outcome may have come
            self._act(r)
        elif (rk.port.promised and rk.port.switch_step == self.k
              and self.now < self.Gk + rk.off):
            self._watch(r, self.k)  # promised S = the step starting now: it holds at on_step

    def _rank_send(self, r: int, msg: Any, t: float) -> None:
        if t > self.now:  # after the worker's CPU time: links must see frames in time order
            self.at(t, self._rank_send, r, msg, t)
            return
        node = self.ranks[r].node
        self._to_leader(node, t + self.sc.network.ipc_s, msg)

    def _node_heartbeat(self, node: int) -> None:
        if not self.node_alive[node]:
            return
        ranks = tuple(r for r in self.node_ranks[node] if self.ranks[r].alive)
        self._to_leader(node, self.now, cores.node_heartbeat(node, ranks))
        self.at(self.now + self.sc.heartbeat_s, self._node_heartbeat, node)

    def _kill_node(self, node: int) -> None:
        self.node_alive[node] = False
        self.dead_at = self.now
        for r in self.node_ranks[node]:
            self.ranks[r].alive = False
            self._resolved(r, self.now)

    # --- network -------------------------------------------------------------------------------

    def _size(self, msg: Any) -> int:
        kind = cores.kind_of(msg)
        if kind is Kind.PLAN:
            epoch = cores.epoch_of(msg)
            if epoch not in self._plan_sizes:
                self._plan_sizes[epoch] = cores.frame_bytes(msg)
            return self._plan_sizes[epoch]
        if kind not in self._sizes:
            self._sizes[kind] = cores.frame_bytes(msg)
        return self._sizes[kind]

    def _to_leader(self, node: int, t: float, item: Any) -> None:
        """``item`` (a message, or a tuple for the driver's own work) reaches the leader's queue."""
        if node != 0:
            t = self.net.deliver(node, 0, t, self._size(item))
        self._seq += 1
        heapq.heappush(self._inbox, (t, self._seq, node, item))
        self._wake(max(t, self._leader_free))

    # --- the leader ----------------------------------------------------------------------------

    def _calibrate_decode(self) -> dict[Kind, float]:
        c = self.sc.costs
        if not c.measured:
            return defaultdict(lambda: c.decode_s, {Kind.COUNTS: c.counts_decode_s})
        port = self.ranks[0].port
        samples = {Kind.HELLO: port.hello(0), Kind.HEARTBEAT: port.heartbeat(1),
                   Kind.COUNTS: port.counts(0, 64, self.load),
                   Kind.NODE_HEARTBEAT: cores.node_heartbeat(1, tuple(range(8)))}
        table = {kind: cores.decode_seconds(msg) for kind, msg in samples.items()}
        small = table[Kind.HEARTBEAT]
        return defaultdict(lambda: small, table)

    def _wake(self, t: float) -> None:
        if t < self._wake_at:
            self._wake_at = t
            self._wake_token += 1
            self.at(t, self._leader_run, self._wake_token)

    def _leader_run(self, token: int) -> None:
        if token != self._wake_token:
            return
        self._wake_at = math.inf
        t = self.now
        if self._next_tick <= t:
            cursor = self._leader_tick(t)
            self._next_tick = cursor + self.sc.tick_s
        elif self._inbox and self._inbox[0][0] <= t:
            arrival, _, node, item = heapq.heappop(self._inbox)
            self.queue_waits.append(t - arrival)
            cursor = self._leader_item(t, node, item)
        else:
            cursor = t
        self._leader_free = cursor
        nxt = self._next_tick
        if self._inbox:
            nxt = min(nxt, self._inbox[0][0])
        self._wake(max(cursor, nxt))

    def _charge(self, what: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        c = self.sc.costs
        t0 = time.thread_time()
        out = fn()
        cost = time.thread_time() - t0 if c.measured else c.core_s
        self.cpu[what] += cost
        return out, cost

    def _leader_item(self, t: float, node: int, item: Any) -> float:
        if isinstance(item, tuple):  # the driver's own work
            if item[0] == "control":
                _, cost = self._charge("control", self.leader.request_rebalance)
                return t + cost
            _, request_id, current = item
            target = cores.plan_to(self.plan, self.start) \
                if not torch.equal(current, self.start) else self.plan
            outs, cost = self._charge("plan_result", lambda: self.leader.plan_result(
                request_id, target, t))
            return self._execute(outs, t + cost)
        kind = cores.kind_of(item)
        decode = self._decode_s[kind]
        if node != 0:
            self.node_seen[node] = t
        if kind is Kind.NODE_HEARTBEAT:
            self.cpu["NODE_HEARTBEAT"] += decode
            return t + decode
        if kind is Kind.HELLO:
            (error, outs), cost = self._charge("HELLO", lambda: self.leader.hello(item, t))
            self.join_cpu_s += cost + decode
            if error:
                self.failures.append(f"HELLO refused: {error}")
        else:
            outs, cost = self._charge(kind.value, lambda: self.leader.message(item, t))
        self.cpu["decode"] += decode
        return self._execute(outs, t + cost + decode)

    def _leader_tick(self, t: float) -> float:
        sc = self.sc
        cursor = t
        # MEMBERSHIP: the sidecar's node timeouts, then the core's tick (as _tick_loop does)
        for node in nodes_timed_out(t, self.node_seen, sc.node_timeout_s):
            del self.node_seen[node]
            self.node_lost.append((node, t))
            for r in self.node_ranks[node]:
                outs, cost = self._charge("node_lost", lambda: self.leader.worker_left(
                    r, f"node {node} lost: no heartbeat for {sc.node_timeout_s:g}s", t))
                cursor = self._execute(outs, cursor + cost)
        outs, cost = self._charge("tick", lambda: self.leader.tick(t))
        cursor = self._execute(outs, cursor + cost)
        if t >= self._next_beat:  # NODE_HEARTBEAT to every follower
            self._next_beat = t + sc.heartbeat_s
            sends = sc.costs.send_s * len(self.node_seen)
            self.cpu["send"] += sends
            cursor += sends
        return cursor

    def _execute(self, outs: list, cursor: float) -> float:
        """Carry out the leader's outputs in order from ``cursor``; returns when it is done."""
        sc = self.sc
        for out in outs:
            if isinstance(out, cores.Durable):
                cursor += sc.costs.persist_s
                self.cpu["persist"] += sc.costs.persist_s
            elif isinstance(out, ToAll):
                cursor = self._broadcast(out.msg, cursor)
            elif isinstance(out, ToRank):
                node = self.ranks[out.rank].node
                if node != 0:
                    cursor += sc.costs.send_s
                    self.cpu["send"] += sc.costs.send_s
                self._to_node(node, out.msg, cursor, (out.rank,))
            elif isinstance(out, NeedPlan):
                self._to_leader(0, cursor + sc.planner_s, ("plan", out.request_id, out.current))
        return cursor

    def _broadcast(self, msg: Any, cursor: float) -> float:
        sc = self.sc
        kind = cores.kind_of(msg)
        epoch = cores.epoch_of(msg)
        if kind is Kind.PLAN:
            self.traces.setdefault(epoch, EpochTrace(epoch)).plan_sent = cursor
            if sc.dead_node is not None and epoch == sc.dead_at_epoch and self.dead_at is None:
                self._kill_node(sc.dead_node)
        elif kind is Kind.PREPARE:
            trace = self.traces.setdefault(epoch, EpochTrace(epoch))
            trace.prepare_sent = cursor
            trace.switch_step = cores.switch_step_of(msg)
            flight = self.leader.epoch_in_flight()
            if flight is not None and flight[0] == epoch and flight[2]:
                trace.max_acked = max(flight[2].values())
            self._prepare_S = trace.switch_step
        self._to_node(0, msg, cursor, None)
        for node in self.node_seen:  # the followers the leader knows, in order
            cursor += sc.costs.send_s
            self.cpu["send"] += sc.costs.send_s
            self._to_node(node, msg, cursor, None)
        return cursor

    def _to_node(self, node: int, msg: Any, t: float, ranks: tuple[int, ...] | None) -> None:
        if node != 0:
            t = self.net.deliver(0, node, t, self._size(msg))
        self.at(t, self._node_receive, node, msg, ranks)

    def _node_receive(self, node: int, msg: Any, ranks: tuple[int, ...] | None) -> None:
        if not self.node_alive[node]:
            return
        ipc = self.sc.network.ipc_s
        for r in ranks if ranks is not None else self.node_ranks[node]:
            self.at(self.now + ipc, self._rank_receive, r, msg)
