"""The numbers of one simulation run, as the benchmark table shows them."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from eplb.sim.cluster import SimResult


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


@dataclass
class Row:
    """One line of the table. Times in milliseconds of virtual time unless named otherwise."""

    scenario: str
    path: str  # node (per-node aggregation) | worker (every worker frame relayed)
    nodes: int
    ranks: int
    layers: int
    rtt_p50_ms: float
    rtt_p99_ms: float
    attempts: int
    committed: int
    aborted: int
    abort_causes: str
    failed: int
    agree_p50_ms: float | None  # PREPARE sent -> COMMIT sent, the leader's clock
    agree_p99_ms: float | None
    e2e_p50_ms: float | None  # PREPARE leaves the leader -> the last rank has its COMMIT
    e2e_p99_ms: float | None
    margin_min: int | None  # S - max PLAN_ACK step, as the leader chose it
    margin_max: int | None
    needed_max: int | None  # the margin each epoch needed (max over epochs)
    missed: int  # epochs whose margin was smaller than needed (a rank reached S first)
    epochs_with_holds: int
    max_hold_ms: float
    dead_noticed_s: float | None  # node death -> the leader declared it lost
    false_node_losses: int
    leader_cpu_ms_per_flush: float  # all charged leader CPU per flush interval (steady state)
    leader_core_ms_per_flush: float  # of which inside LeaderCore
    leader_frames_per_flush: float  # frames the leader decoded per flush interval
    follower_cpu_ms_per_flush: float  # the busiest follower's CPU per flush interval
    leader_cpu_by_kind: str  # the biggest items of it: "KIND ms/flush (messages/flush)", ...
    leader_busy_pct: float
    queue_wait_p99_ms: float | None
    join_cpu_s: float
    retransmissions: int
    i1_violations: int
    hold_timeouts: int
    virtual_s: float
    capped: bool  # the run reached its virtual-time cap (max_virtual_s) before it ended
    wall_s: float
    plan_wall_s: float

    def as_dict(self) -> dict:
        return asdict(self)


#: leader CPU items that are not inside a core call (a peer message's decoding is: on_peer opens
#: its relayed frames itself)
_DRIVER = {"decode", "encode", "send", "persist"}


def summarize(name: str, res: SimResult) -> Row:
    sc = res.scenario
    history = [h for h in res.history if h.epoch is not None]
    committed = [h for h in history if h.outcome == "committed"]
    aborted = [h for h in history if h.outcome == "aborted"]
    causes = Counter(h.cause.name for h in aborted if h.cause is not None)
    agree = [h.agreement_ms for h in committed if h.agreement_ms is not None]
    committed_ids = {h.epoch for h in committed}
    e2e = [(t.last_commit_at - t.prepare_sent) * 1e3 for t in res.traces.values()
           if t.epoch in committed_ids and t.commit_steps]
    traces = [t for t in res.traces.values() if t.margin is not None]
    margins = [t.margin for t in traces]
    needed = [t.needed_margin for t in traces if t.needed_margin is not None]
    missed = sum(1 for t in traces if t.needed_margin is not None and t.needed_margin > t.margin)
    flush_s = (sc.flush_every or 64) * sc.step_s
    intervals = res.steady_s / flush_s if flush_s > 0 and res.steady_s > 0 else 1.0
    total = sum(res.leader_cpu.values())
    core = sum(v for k, v in res.leader_cpu.items() if k not in _DRIVER)
    dead = [node for node, _ in res.node_lost if node == sc.dead_node]
    noticed = None
    if dead and res.dead_at is not None:
        noticed = next(t for node, t in res.node_lost if node == sc.dead_node) - res.dead_at
    waits = [w * 1e3 for w in res.queue_waits]
    return Row(
        scenario=name, path="node" if sc.aggregate else "worker", nodes=sc.nodes, ranks=sc.world_size, layers=sc.num_layers,
        rtt_p50_ms=res.rtt[0] * 1e3, rtt_p99_ms=res.rtt[1] * 1e3,
        attempts=len(history), committed=len(committed), aborted=len(aborted),
        abort_causes=", ".join(f"{k} x{v}" for k, v in sorted(causes.items())) or "-",
        failed=sum(1 for h in history if h.outcome == "failed"),
        agree_p50_ms=quantile(agree, 0.5), agree_p99_ms=quantile(agree, 0.99),
        e2e_p50_ms=quantile(e2e, 0.5), e2e_p99_ms=quantile(e2e, 0.99),
        margin_min=min(margins, default=None), margin_max=max(margins, default=None),
        needed_max=max(needed, default=None), missed=missed,
        epochs_with_holds=sum(1 for t in res.traces.values() if t.holds),
        max_hold_ms=max((t.max_hold_s for t in res.traces.values()), default=0.0) * 1e3,
        dead_noticed_s=noticed,
        false_node_losses=sum(1 for node, _ in res.node_lost if node != sc.dead_node),
        leader_cpu_ms_per_flush=total / intervals * 1e3,
        leader_core_ms_per_flush=core / intervals * 1e3,
        leader_frames_per_flush=res.leader_frames / intervals,
        leader_cpu_by_kind=", ".join(
            f"{k} {v / intervals * 1e3:.0f} ms"
            + (f" ({res.leader_msgs[k] / intervals:.0f})" if res.leader_msgs.get(k) else "")
            for k, v in sorted(res.leader_cpu.items(), key=lambda kv: -kv[1])[:5]),
        follower_cpu_ms_per_flush=res.follower_cpu_max_s / intervals * 1e3,
        leader_busy_pct=100.0 * total / res.steady_s if res.steady_s > 0 else 0.0,
        queue_wait_p99_ms=quantile(waits, 0.99), join_cpu_s=res.join_cpu_s,
        retransmissions=res.retransmissions, i1_violations=len(res.violations),
        hold_timeouts=sum(1 for f in res.failures if "HoldTimeout" in f),
        virtual_s=res.virtual_s, capped=res.capped, wall_s=res.wall_s, plan_wall_s=res.plan_wall_s)
