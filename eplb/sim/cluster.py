"""One simulated cluster: N nodes x R ranks, the real cores, a virtual clock.

Time is virtual seconds. Nothing sleeps and nothing touches a socket: a worker's message is
encoded as its hook would and handed with its frame to its sidecar; between a follower and the
leader the real envelopes (``list[bytes]``) cross, at times the network model
(:mod:`eplb.sim.network`) computes from their size. Every call into a core goes through
:mod:`eplb.sim.cores`.

What is modelled, and how:

* **Decode steps, lockstep.** An EP group runs its all-to-alls every step, so no rank gets ahead
  of the others by more than the step in progress. Group step ``k`` starts at ``G_k``; rank ``r``
  calls its hook's ``on_step(k)`` at ``G_k + off_r`` (``off_r`` uniform in
  ``[0, rank_skew_s)``, the per-rank jitter) and the step lasts ``step_s`` with relative jitter
  ``step_jitter``. A rank holding at S, or copying a chunk, delays the whole group's next step
  (the others wait in the all-to-all). The slow node's steps take ``slow_factor`` times longer,
  which in lockstep paces the whole group.
* **Frames.** worker -> its sidecar over ipc (``ipc_s``). Each follower sidecar is a real
  :class:`~eplb.coordinator.follower.FollowerCore`: on the per-node path (``aggregate``, the
  default) with its :class:`~eplb.coordinator.aggregate.NodeAggregator` (counts summed into one
  NODE_COUNTS a flush round, PLAN_ACK / PROMISE+REFUSE / DONE of its ranks up as one NODE_ACKS /
  NODE_PROMISES / NODE_DONE, the rest relayed), on the per-worker path without (every burst of
  worker frames relayed as one RELAY). What it sends up crosses the node's TCP link to the
  leader (:class:`~eplb.sim.network.Network`) as the real envelope (its bytes set the wire
  time); the leader's broadcasts go to each follower in turn (``send_s`` of the leader's CPU per
  follower), through the leader->node link, into that follower's queue, and on to its workers
  by ipc. Workers send what the hook sends: HELLO, HEARTBEAT (+ OUTCOME_QUERY while promised)
  every ``heartbeat_s``, COUNTS every ``flush_every`` steps (within the hook's 50 ms outbox
  poll), and the agreement's replies. Followers send NODE_HEARTBEAT every ``heartbeat_s``, the
  leader one to each follower as often.
* **Every sidecar is a queue.** The leader and each follower handle one item at a time, in
  arrival order, their tick first when due, as the sidecar's event loop does. Each item costs
  the CPU time the real core took on it in this process (``time.thread_time`` around the call:
  for the leader ``open_peer`` + ``LeaderCore.on_peer``, relayed frames' decoding included; or a
  fixed cost, :class:`Costs`), plus the real decoder's time on a frame a sidecar admits from its
  own workers (calibrated once per type), plus ``send_s`` per message it sends to another node
  and ``persist_s`` per decision the leader writes. Frames wait while it is busy. A follower
  reads its workers' frames in bursts of up to 64 (the sidecar's ``MAX_BURST``), ticks every
  ``follower_tick_s`` while its aggregator holds something (a tick with nothing held does
  nothing), and the leader every ``tick_s``.
* **Planning.** The real planner runs once per cluster shape (cached in-process) on the modelled
  load; every ComputePlan is answered ``planner_s`` later, alternately with that plan and with
  the start placement, so every epoch moves experts. Epochs are started one after another with
  the core's ``request_rebalance`` (``gap_s`` after the last one ended); the counts still flow,
  so the leader pays for them.
* **Membership** is the leader core's (:class:`~eplb.coordinator.membership.NodeMembership`):
  followers say NODE_HELLO and NODE_HEARTBEAT through ``on_peer``, and the core's tick loses a
  node not heard for ``node_timeout_s`` (AbortCode.NODE_LOST); the simulator only reads which
  nodes a tick lost, and when.
* **Faults.** A slow node (frames delayed by ``slow_extra_s``, steps ``slow_factor`` slower);
  a dead node (its follower and ranks stop, frames to it are lost, when the leader sends the
  PLAN of epoch ``dead_at_epoch``); loss (:class:`~eplb.sim.network.NetworkModel`).

Not modelled: a node the leader lost stays out (no rejoin, no follower restart or new
incarnation); the dead node does not stall the others' steps (a real EP group would block in
the all-to-all); the sidecars' own overhead beyond the cores, the decoder and ``send_s``
(ZeroMQ, asyncio) is not charged, so their CPU here is a lower bound; a worker's CPU is only
its agreement's (it delays that worker's replies); the planner runs off the leader's CPU (an
executor); no control requests.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from eplb.sim import cores
from eplb.sim.cores import (FOLLOWER_BURST, EpochView, FollowerPort, Kind, LeaderPort,
                            LeaderSettings, NeedPlan, RankPort, Step, ToAll, ToLeader, ToRank,
                            ToWorkers)
from eplb.sim.network import Network, NetworkModel

#: The hook's socket thread picks counts snapshots up within this long (hook.OUTBOX_POLL_S).
OUTBOX_POLL_S = 0.05


@dataclass(frozen=True)
class Costs:
    """What the leader's and workers' CPU is charged.

    ``measured``: the real core calls' own CPU time in this process (thread time) and the real
    decoder's median time per frame type a sidecar admits from its own workers; otherwise
    ``core_s`` per core call, ``decode_s`` per admitted frame (``counts_decode_s`` for COUNTS)
    and ``worker_plan_s`` for a worker's PLAN (the deterministic mode the tests use).
    """

    measured: bool = True
    core_s: float = 20e-6
    decode_s: float = 5e-6
    counts_decode_s: float = 60e-6
    worker_plan_s: float = 1e-3
    send_s: float = 5e-6  # a sidecar's CPU per message sent to another node (ZeroMQ send)
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
    follower_tick_s: float = 0.02
    #: followers aggregate their workers' frames (per-node path); False: per-worker path
    aggregate: bool = True
    join_spread_s: float = 0.2
    #: NODE_HELLOs and HELLOs handled before the clock starts (their CPU is reported, not
    #: queued): 8,000 ranks joining at once cost the leader seconds, which would time out
    #: every follower.
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


#: Virtual seconds between the simulator's own garbage collections (see :meth:`Simulation.run`).
GC_EVERY_S = 2.0

#: What a worker's agreement takes from the leader.
_TO_WORKER = {Kind.PLAN, Kind.PREPARE, Kind.COMMIT, Kind.ABORT}

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
    leader_msgs: dict[str, int]  # messages the leader handled after that, by header type
    leader_frames: int  # frames it decoded after that (a RELAY's header and each frame in it)
    follower_cpu_max_s: float  # the busiest follower's CPU after that
    join_cpu_s: float  # leader CPU on the joins before the clock starts (prejoin), else on
    #                    its own node's HELLOs only (relayed ones are in leader_cpu["RELAY"])
    queue_waits: list[float]  # the leader's, after the group was complete
    node_lost: list[tuple[int, float]]  # (node, when the leader core lost it)
    dead_at: float | None
    violations: list[str]
    failures: list[str]
    rtt: tuple[float, float]
    plan_wall_s: float
    retransmissions: int
    capped: bool = False  # stopped at the scenario's max_virtual_s, not because it was done

    def summary(self) -> dict[str, Any]:
        """Plain values, equal for equal seeds under fixed costs."""
        return {
            "history": [(h.epoch, h.outcome, h.switch_step, h.margin,
                         None if h.agreement_ms is None else round(h.agreement_ms, 9))
                        for h in self.history],
            "traces": [(t.epoch, t.switch_step, t.max_acked, round(t.last_commit_at, 9),
                        sorted(t.commit_steps.items())) for t in self.traces.values()],
            "node_lost": self.node_lost, "virtual_s": round(self.virtual_s, 9),
            "violations": self.violations, "leader_msgs": sorted(self.leader_msgs.items()),
        }


class _Loop:
    """One sidecar's event loop as a queue: one item at a time in arrival order, its tick first
    when due (``next_tick``). ``handle(t, kind, payload)`` and ``tick(t)`` do the work and
    return when the loop is free again (virtual seconds). Worker frames (kind ``"worker"``)
    are taken in bursts: every one that has arrived, up to ``burst``."""

    def __init__(self, sim: "Simulation", handle: Callable[[float, str, Any], float],
                 tick: Callable[[float], float], next_tick: float, burst: int = 1) -> None:
        self.sim = sim
        self.handle, self.tick = handle, tick
        self.next_tick = next_tick
        self.burst = burst
        self.inbox: list[tuple[float, int, str, Any]] = []  # (arrival, seq, kind, payload)
        self.free = 0.0
        self.waits: list[float] = []
        self._wake_at = math.inf
        self._token = 0

    def put(self, t: float, kind: str, payload: Any) -> None:
        self.sim._seq += 1
        heapq.heappush(self.inbox, (t, self.sim._seq, kind, payload))
        self.wake(max(t, self.free))

    def wake(self, t: float) -> None:
        if t < self._wake_at:
            self._wake_at = t
            self._token += 1
            self.sim.at(t, self._run, self._token)

    def _run(self, token: int) -> None:
        if token != self._token:
            return
        self._wake_at = math.inf
        t = self.sim.now
        inbox = self.inbox
        if self.next_tick <= t:
            cursor = self.tick(t)
        elif inbox and inbox[0][0] <= t:
            arrival, _, kind, payload = heapq.heappop(inbox)
            self.waits.append(t - arrival)
            if kind == "worker":
                batch = [payload]
                while (len(batch) < self.burst and inbox and inbox[0][0] <= t
                       and inbox[0][2] == "worker"):
                    batch.append(heapq.heappop(inbox)[3])
                payload = batch
            cursor = self.handle(t, kind, payload)
        else:
            cursor = t
        self.free = cursor
        nxt = min(self.next_tick, inbox[0][0] if inbox else math.inf)
        if nxt < math.inf:
            self.wake(max(cursor, nxt))


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
        self.ranks = [_Rank(RankPort(r, r // sc.ranks_per_node, G, E, self.start,
                                     sc.bytes_per_expert), r // sc.ranks_per_node,
                            self.rng.uniform(0.0, sc.rank_skew_s)) for r in range(G)]
        self.node_ranks = [list(range(n * sc.ranks_per_node, (n + 1) * sc.ranks_per_node))
                           for n in range(sc.nodes)]
        self.node_alive = [True] * sc.nodes
        self.leader = LeaderPort(sc.leader, sc.nodes, sc.node_timeout_s,
                                 tuple(self.node_ranks[0]))
        self.leader_loop = _Loop(self, self._leader_item, self._leader_tick, 0.0)
        self.followers: dict[int, FollowerPort] = {}
        self.follower_loops: dict[int, _Loop] = {}
        for node in range(1, sc.nodes):
            self.followers[node] = FollowerPort(node, sc.aggregate, sc.node_timeout_s)
            self.follower_loops[node] = _Loop(
                self, lambda t, kind, payload, n=node: self._follower_item(n, t, kind, payload),
                lambda t, n=node: self._follower_tick(n, t), math.inf, burst=FOLLOWER_BURST)
        self._tick_phase = [self.rng.uniform(0.0, sc.follower_tick_s) for _ in range(sc.nodes)]
        self._decode_s = self._calibrate_decode()
        # group step timeline
        self.k = 0
        self.Gk = 0.0
        self._base_next = 0.0
        self._extra = 0.0
        self._pending: set[int] = set()
        self._end_token = 0
        self._prepare_S: int | None = None
        self._next_beat = 0.0
        # bookkeeping
        self.traces: dict[int, EpochTrace] = {}
        self.cpu: dict[str, float] = defaultdict(float)
        self.msgs: dict[str, int] = defaultdict(int)
        self.frames = 0  # frames the leader decoded (peer headers, relayed and local frames)
        self.follower_cpu: dict[int, float] = defaultdict(float)
        self.join_cpu_s = 0.0
        self._cpu_at_complete: dict[str, float] = {}
        self._msgs_at_complete: dict[str, int] = {}
        self._frames_at_complete = 0
        self._fcpu_at_complete: dict[int, float] = {}
        self._waits_at_complete = 0
        self.node_lost: list[tuple[int, float]] = []
        self.dead_at: float | None = None
        self.violations: list[str] = []
        self.failures: list[str] = []
        self.complete_at: float | None = None
        self._attempts_requested = 0
        self._idle_since: float | None = None
        self._next_gc = GC_EVERY_S

    # --- event queue ---------------------------------------------------------------------------

    def at(self, t: float, fn: Callable, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._q, (t, self._seq, fn, args))

    def run(self) -> SimResult:
        """Run the scenario to its end (or ``max_virtual_s``). Python's cyclic garbage
        collector is off meanwhile (and the heap built so far frozen), collecting only between
        events, in :meth:`_driver`: a collection of this process's heap (thousands of worker
        agreements) inside a measured core call would be charged to that sidecar, whose own
        heap is small."""
        enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            return self._run()
        finally:
            gc.unfreeze()
            if enabled:
                gc.enable()

    def _run(self) -> SimResult:
        wall0 = time.perf_counter()
        sc = self.sc
        if sc.prejoin:
            self._prejoin()
        else:
            for node in self.followers:
                self.follower_loops[node].put(0.0, "start", None)
            for r in range(sc.world_size):
                self.at(self.rng.uniform(0.0, sc.join_spread_s), self._join, r)
        for r in range(sc.world_size):
            if sc.prejoin:  # otherwise a rank's heartbeats start once it said HELLO (_join)
                self.at(self.rng.uniform(0.0, sc.heartbeat_s), self._heartbeat, r)
            if not sc.flush_every:  # one COUNTS each: the leader starts no epoch on an empty window
                self.at(sc.join_spread_s + self.rng.uniform(0.0, sc.join_spread_s),
                        self._send_counts, r, 1)
        for node in self.followers:
            self.follower_loops[node].put(self.rng.uniform(0.0, sc.heartbeat_s), "beat", None)
        self.at(0.0, self._step_begin, 0)
        self.leader_loop.wake(0.0)
        self.at(0.1, self._driver)
        capped = False
        while self._q:
            t, _, fn, args = heapq.heappop(self._q)
            if t > sc.max_virtual_s:
                capped = True
                break
            self.now = t
            if fn(*args) is StopIteration:
                break
        self._final_checks()
        steady = self.now - (self.complete_at or 0.0)
        cpu = {k: v - self._cpu_at_complete.get(k, 0.0) for k, v in self.cpu.items()}
        msgs = {k: v - self._msgs_at_complete.get(k, 0) for k, v in self.msgs.items()}
        fcpu = max((v - self._fcpu_at_complete.get(n, 0.0) for n, v in self.follower_cpu.items()),
                   default=0.0)
        return SimResult(sc, self.leader.history(), self.traces, self.now,
                         time.perf_counter() - wall0, steady, cpu, msgs,
                         self.frames - self._frames_at_complete, fcpu, self.join_cpu_s,
                         self.leader_loop.waits[self._waits_at_complete:], self.node_lost,
                         self.dead_at, self.violations, self.failures, self.net.rtt_quantiles(),
                         self.plan_wall_s, self.net.retransmissions, capped)

    def _prejoin(self) -> None:
        """Every follower's NODE_HELLO, then every rank's HELLO through its node (a burst per
        node), the WELCOMEs back down through the followers (their aggregators learn which
        ranks joined), all at time 0. The leader's CPU on it goes to ``join_cpu_s``."""
        def to_leader(node: int, fouts: list) -> None:
            for fo in fouts:
                if isinstance(fo, ToLeader):
                    t0 = time.thread_time()
                    _, _, louts = self.leader.peer(node, fo.parts, 0.0)
                    self.join_cpu_s += time.thread_time() - t0
                    for lo in louts:
                        if isinstance(lo, ToRank) and lo.node:
                            self._follower_outs(self.followers[lo.node].from_leader(
                                cores.down_parts(lo.msg, lo.rank), 0.0), None)
                        elif isinstance(lo, cores.Dropped):
                            self.failures.append(f"join: {lo.where}: {lo.error}")
                elif isinstance(fo, cores.Dropped):
                    self.failures.append(f"join: {fo.where}: {fo.error}")
        for node, follower in self.followers.items():
            to_leader(node, follower.start())
        for r in self.node_ranks[0]:
            t0 = time.thread_time()
            self.leader.local(r, cores.encode_frame(self.ranks[r].port.hello(0)), 0.0)
            self.join_cpu_s += time.thread_time() - t0 + self._decode_s[Kind.HELLO]
        for node, follower in self.followers.items():
            burst = []
            for r in self.node_ranks[node]:
                hello = self.ranks[r].port.hello(0)
                burst.append((r, hello, cores.encode_frame(hello)))
            to_leader(node, follower.relay(burst, 0.0))
        if not self.leader.group_complete:
            self.failures.append("join: the group is not complete after every HELLO")

    # --- the epochs: started one after another ----------------------------------------------------

    def _driver(self) -> Any:
        sc = self.sc
        if self.complete_at is None and self.leader.group_complete:
            self.complete_at = self.now
            self._cpu_at_complete = dict(self.cpu)
            self._msgs_at_complete = dict(self.msgs)
            self._frames_at_complete = self.frames
            self._fcpu_at_complete = dict(self.follower_cpu)
            self._waits_at_complete = len(self.leader_loop.waits)
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
            self.leader_loop.put(self.now, "control", None)
        if self.now >= self._next_gc:  # outside every measured call
            self._next_gc = self.now + GC_EVERY_S
            gc.collect()
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
            self.at(self.now + self.rng.uniform(0.0, self.sc.heartbeat_s), self._heartbeat, r)

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
        if kind not in _TO_WORKER:
            if kind is Kind.REJOIN:  # the leader lost track of it: never on a healthy run
                self.failures.append(f"rank {r} asked to join again at {self.now:.3f}s")
            return  # WELCOME (the simulator's ranks joined at HELLO) and heartbeats
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
        """Rank ``r``'s hook sends ``msg`` at ``t``: to its sidecar over ipc."""
        if t > self.now:  # after the worker's CPU time: links must see frames in time order
            self.at(t, self._rank_send, r, msg, t)
            return
        node = self.ranks[r].node
        frame = cores.encode_frame(msg)
        if node == 0:
            self.leader_loop.put(t + self.sc.network.ipc_s, "local", (r, msg, frame))
        elif self.node_alive[node]:
            self.follower_loops[node].put(t + self.sc.network.ipc_s, "worker", (r, msg, frame))

    def _kill_node(self, node: int) -> None:
        self.node_alive[node] = False
        self.dead_at = self.now
        for r in self.node_ranks[node]:
            self.ranks[r].alive = False
            self._resolved(r, self.now)

    # --- followers -----------------------------------------------------------------------------

    def _follower_charge(self, node: int, fn: Callable[[], Any]) -> tuple[Any, float]:
        return self._charged(self.follower_cpu, node, fn)

    def _charged(self, bucket: Any, key: Any, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run ``fn``; its cost (the thread time it took, or the fixed per-call cost when CPU
        is not measured) is added to ``bucket[key]``."""
        c = self.sc.costs
        t0 = time.thread_time()
        out = fn()
        cost = time.thread_time() - t0 if c.measured else c.core_s
        bucket[key] += cost
        return out, cost

    def _follower_item(self, node: int, t: float, kind: str, payload: Any) -> float:
        if not self.node_alive[node]:
            return t
        follower = self.followers[node]
        if kind == "worker":  # a burst: admission decodes each frame, then relay
            admit = sum(self._decode_s[cores.kind_of(m)] for _, m, _ in payload)
            self.follower_cpu[node] += admit
            outs, cost = self._follower_charge(node, lambda: follower.relay(payload, t))
            cost += admit
        elif kind == "leader":
            outs, cost = self._follower_charge(node, lambda: follower.from_leader(payload, t))
        elif kind == "beat":
            ranks = [r for r in self.node_ranks[node] if self.ranks[r].alive]
            outs, cost = self._follower_charge(node, lambda: follower.heartbeat(ranks))
            self.follower_loops[node].put(t + self.sc.heartbeat_s, "beat", None)
        elif kind == "start":
            outs, cost = self._follower_charge(node, follower.start)
        else:
            raise ValueError(kind)
        cursor = self._follower_outs(outs, t + cost, node)
        self._plan_follower_tick(node, cursor)
        return cursor

    def _follower_tick(self, node: int, t: float) -> float:
        loop = self.follower_loops[node]
        loop.next_tick = math.inf
        if not self.node_alive[node]:
            return t
        outs, cost = self._follower_charge(node, lambda: self.followers[node].tick(t))
        cursor = self._follower_outs(outs, t + cost, node)
        self._plan_follower_tick(node, cursor)
        return cursor

    def _plan_follower_tick(self, node: int, after: float) -> None:
        """The follower ticks every ``follower_tick_s``; a tick does something only once what
        its aggregator holds is due, so the next one that does is planned, on the tick grid."""
        deadline = self.followers[node].next_deadline()
        loop = self.follower_loops[node]
        if deadline is None:
            loop.next_tick = math.inf
            return
        step = self.sc.follower_tick_s
        phase = self._tick_phase[node]
        t = max(deadline, after)
        loop.next_tick = phase + math.ceil((t - phase) / step) * step

    def _follower_outs(self, outs: list, cursor: float | None, node: int | None = None) -> float:
        """Carry out a follower's outputs from ``cursor`` (None: at join time, only what goes
        to its workers, which are not running yet); returns when it is done."""
        sc = self.sc
        for out in outs:
            if isinstance(out, ToLeader):
                if cursor is None or node is None:
                    continue
                cursor += sc.costs.send_s
                self.follower_cpu[node] += sc.costs.send_s
                arrive = self.net.deliver(node, 0, cursor, cores.peer_bytes(out.parts))
                self.leader_loop.put(arrive, "peer", (node, out.parts))
            elif isinstance(out, ToWorkers):
                if cursor is None or node is None:
                    continue
                ranks = self.node_ranks[node] if out.rank is None else (out.rank,)
                for r in ranks:
                    self.at(cursor + sc.network.ipc_s, self._rank_receive, r, out.msg)
            elif isinstance(out, cores.Dropped):
                self.failures.append(f"follower dropped a frame: {out.where}: {out.error}")
        return cursor if cursor is not None else 0.0

    # --- the leader ----------------------------------------------------------------------------

    def _calibrate_decode(self) -> dict[Kind, float]:
        c = self.sc.costs
        if not c.measured:
            return defaultdict(lambda: c.decode_s, {Kind.COUNTS: c.counts_decode_s})
        port = self.ranks[0].port
        samples = {Kind.HELLO: port.hello(0), Kind.HEARTBEAT: port.heartbeat(1),
                   Kind.COUNTS: port.counts(0, 64, self.load)}
        table = {kind: cores.decode_seconds(msg) for kind, msg in samples.items()}
        small = table[Kind.HEARTBEAT]
        return defaultdict(lambda: small, table)

    def _charge(self, what: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        return self._charged(self.cpu, what, fn)

    def _leader_item(self, t: float, kind: str, payload: Any) -> float:
        if kind == "control":
            _, cost = self._charge("control", self.leader.request_rebalance)
            return t + cost
        if kind == "plan":
            request_id, current = payload
            target = cores.plan_to(self.plan, self.start) \
                if not torch.equal(current, self.start) else self.plan
            outs, cost = self._charge("plan_result", lambda: self.leader.plan_result(
                request_id, target, t))
            return self._execute(outs, t + cost)
        if kind == "peer":
            node, parts = payload
            c = self.sc.costs
            t0 = time.thread_time()
            header, frames, outs = self.leader.peer(node, parts, t)
            cost = time.thread_time() - t0 if c.measured else c.core_s
            self.cpu[header] += cost
            self.msgs[header] += 1
            self.frames += frames
            return self._execute(outs, t + cost)
        if kind == "local":
            r, msg, frame = payload
            decode = self._decode_s[cores.kind_of(msg)]
            self.cpu["decode"] += decode
            self.msgs["local"] += 1
            self.frames += 1
            what = "HELLO" if cores.kind_of(msg) is Kind.HELLO else "local"
            outs, cost = self._charge(what, lambda: self.leader.local(r, frame, t))
            if what == "HELLO":
                self.join_cpu_s += cost + decode
            return self._execute(outs, t + cost + decode)
        raise ValueError(kind)

    def _leader_tick(self, t: float) -> float:
        sc = self.sc
        (outs, lost), cost = self._charge("tick", lambda: self.leader.tick(t))
        for node in lost:
            self.node_lost.append((node, t))
        cursor = self._execute(outs, t + cost)
        if t >= self._next_beat:  # NODE_HEARTBEAT to every follower
            self._next_beat = t + sc.heartbeat_s
            parts = cores.leader_heartbeat(tuple(self.node_ranks[0]))
            for node in self.leader.followers():
                cursor += sc.costs.send_s
                self.cpu["send"] += sc.costs.send_s
                self._to_node(node, parts, cursor)
        self.leader_loop.next_tick = cursor + sc.tick_s
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
                if out.node is None:
                    continue  # the leader knows no node for the rank: the driver drops it
                if out.node == 0:
                    self._local_down(out.rank, out.msg, cursor)
                    continue
                (parts, cost) = self._charge("encode", lambda: cores.down_parts(out.msg, out.rank))
                cursor += cost + sc.costs.send_s
                self.cpu["send"] += sc.costs.send_s
                self._to_node(out.node, parts, cursor)
            elif isinstance(out, NeedPlan):
                self.leader_loop.put(cursor + sc.planner_s, "plan",
                                     (out.request_id, out.current))
            elif isinstance(out, cores.Dropped):
                self.failures.append(f"leader dropped a frame: {out.where}: {out.error}")
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
        parts, cost = self._charge("encode", lambda: cores.down_parts(msg, None))
        cursor += cost
        self._local_down(None, msg, cursor)
        for node in self.leader.followers():  # the followers the leader knows, in its order
            cursor += sc.costs.send_s
            self.cpu["send"] += sc.costs.send_s
            self._to_node(node, parts, cursor)
        return cursor

    def _to_node(self, node: int, parts: list[bytes], t: float) -> None:
        """The leader's message to follower ``node`` (lost if the node is dead)."""
        arrive = self.net.deliver(0, node, t, cores.peer_bytes(parts))
        if self.node_alive[node]:
            self.follower_loops[node].put(arrive, "leader", parts)

    def _local_down(self, rank: int | None, msg: Any, t: float) -> None:
        """The leader's message to its own node's worker ``rank`` (None: all of them)."""
        for r in self.node_ranks[0] if rank is None else (rank,):
            self.at(t + self.sc.network.ipc_s, self._rank_receive, r, msg)
