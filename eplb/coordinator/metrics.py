"""The sidecar's Prometheus metrics, in a registry of its own.

The event loop updates them, and the HTTP server (on the same loop) renders them, so a scrape
never reads the leader's state while the loop changes it. Epoch metrics
come from the leader's history (:class:`~eplb.coordinator.history.EpochRecord`) and are zero on
followers; sum over sidecars, or select ``role="leader"`` through ``eplb_sidecar_info``.

A value that is not known (no counts yet, the leader never heard, a leader-only value on a
follower) is no sample at all, never a sentinel such as -1 (:class:`OptionalGauge`): a query or
an alert on it then gives nothing rather than a wrong number. No ``_created`` series are
exported, and the registry carries the process's own metrics (``process_*``, ``python_info``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               PlatformCollector, ProcessCollector, disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily, Metric

from eplb import __version__
from eplb.coordinator.leader import LeaderCore
from eplb.placement.load import balancedness
from eplb.proto.reasons import ABORT_LABELS, AbortCode, EpochOutcome

log = logging.getLogger("eplb.sidecar")

#: The values of the ``reason`` label of ``eplb_epochs_aborted_total`` (AbortCode.metric_label).
ABORT_REASONS = ABORT_LABELS
#: The values of the ``reason`` label of ``eplb_frames_rejected_total`` (ProtocolError.reason).
FRAME_REASONS = ("protocol", "too_large", "malformed", "version", "unknown_type", "invalid_field",
                 "identity_mismatch", "unauthenticated", "impostor", "stale_incarnation")
#: The values of the ``outcome`` label of ``eplb_last_rebalance_timestamp_seconds``.
OUTCOMES = tuple(o.value for o in EpochOutcome if o is not EpochOutcome.IN_PROGRESS)

# ``eplb_epochs_committed_created`` and the like only double the series; counters start at 0 with
# the process (process_start_time_seconds says when). This is process-wide in prometheus_client.
disable_created_metrics()


class OptionalGauge:
    """A gauge that has no sample until it is set, and loses it again on :meth:`clear`: the
    Prometheus way to say "unknown" (an absent series), instead of a sentinel value."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = float(value)

    def clear(self) -> None:
        self.value = None

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family


class SidecarMetrics:
    """Every metric one sidecar exports.

    Args:
        node: this sidecar's node rank; role: ``leader`` or ``follower``; num_nodes: its
            ``--num-nodes``; interval_steps: the leader's ``--interval``.
    """

    def __init__(self, node: int, role: str, num_nodes: int = 1,
                 interval_steps: int | None = None) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes..
        PlatformCollector(registry=r)  # python_info
        info = Gauge("eplb_sidecar_info", "Constant 1, labelled with this sidecar's identity",
                     ["node", "role", "version"], registry=r)
        info.labels(str(node), role, __version__).set(1)
        leader = role == "leader"
        self.ready = Gauge("eplb_ready", "1 when /readyz (local readiness) answers 200",
                           registry=r)
        self.workers_connected = Gauge(
            "eplb_workers_connected", "Workers of this node that have joined and are alive",
            registry=r)
        self.group_workers = Gauge(
            "eplb_group_workers_joined", "Leader: workers of the whole EP group that have joined",
            registry=r)
        self.group_size = OptionalGauge(
            "eplb_group_world_size", "Leader: the EP group's size (absent until a worker joined)",
            r)
        self.followers = Gauge("eplb_follower_sidecars", "Leader: follower sidecars heard from",
                               registry=r)
        self.num_nodes = Gauge("eplb_num_nodes", "This sidecar's --num-nodes", registry=r)
        self.num_nodes.set(num_nodes)
        self.node_count_mismatch = Gauge(
            "eplb_node_count_mismatch", "1 while the nodes seen contradict --num-nodes (a "
            "follower's rank >= --num-nodes, or the whole group joined through fewer nodes)",
            registry=r)
        self.leader_reachable = OptionalGauge(
            "eplb_leader_reachable", "Follower: 1 when the leader was heard within "
            "--node-timeout, else 0 (absent on the leader)", r)
        self.leader_last_seen = OptionalGauge(
            "eplb_leader_last_seen_seconds", "Follower: seconds since the leader was last heard "
            "from (absent until it was heard once, and on the leader)", r)
        self.unsafe = Gauge("eplb_unsafe", "Leader: 1 after an epoch failed after COMMIT; the "
                            "engine must be restarted", registry=r)
        self.step_rate = OptionalGauge(
            "eplb_decode_steps_per_second", "Leader: decode steps per second of the slowest "
            "rank, as the leader measures it for the switch margin (absent until measured)", r)
        self.epoch_in_flight = OptionalGauge(
            "eplb_epoch_in_flight", "Leader: the number of the epoch in flight (PLAN sent, not "
            "ended); 0 when none (absent on followers)", r)
        self.interval = OptionalGauge(
            "eplb_rebalance_interval_steps", "Leader: --interval, decode steps between rebalance "
            "attempts", r)
        if leader:
            self.epoch_in_flight.set(0)
            if interval_steps is not None:
                self.interval.set(interval_steps)
        self.last_rebalance = Gauge(
            "eplb_last_rebalance_timestamp_seconds", "Leader: Unix time at which the last "
            "rebalance with this outcome ended (absent until one did)", ["outcome"], registry=r)
        self.epochs_started = Counter("eplb_epochs_started", "Epochs whose PLAN was sent",
                                      registry=r)
        self.epochs_committed = Counter(
            "eplb_epochs_committed", "Epochs committed and DONE on every worker", registry=r)
        self.epochs_aborted = Counter("eplb_epochs_aborted", "Epochs aborted before COMMIT",
                                      ["reason"], registry=r)
        self.epochs_skipped = Counter(
            "eplb_epochs_skipped", "Rebalances not started: the plan gains less than --min-gain "
            "or equals the placement",
            registry=r)
        self.epochs_failed = Counter(
            "eplb_epochs_failed", "Epochs that failed after COMMIT (copy error or missing DONE)",
            registry=r)
        self.plan_errors = Counter("eplb_plan_errors", "Planner calls that raised", registry=r)
        self.plan_seconds = Histogram(
            "eplb_plan_seconds", "Planner compute time per rebalance", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.agreement_seconds = Histogram(
            "eplb_agreement_seconds", "PREPARE sent to COMMIT sent, per committed epoch",
            registry=r, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                 1, 2.5))
        self.moved_bytes = Counter(
            "eplb_moved_bytes", "Expert weight bytes received by all ranks in finished epochs",
            registry=r)
        self.moved_slots = Counter(
            "eplb_moved_slots", "Physical expert slots whose expert changed, in committed epochs",
            registry=r)
        self.balancedness = OptionalGauge(
            "eplb_balancedness", "Leader: mean/max GPU load over the count window, averaged "
            "over layers (1 is perfect; absent until there are counts)", r)
        self.layer_balancedness = Gauge(
            "eplb_layer_balancedness", "Leader: mean/max GPU load over the count window, per "
            "MoE layer", ["layer"], registry=r)
        self.frames_rejected = Counter(
            "eplb_frames_rejected", "Frames dropped as malformed, of an unknown version or type, "
            "invalid or spoofed (invariant I4)", ["reason"], registry=r)
        for reason in ABORT_REASONS:
            self.epochs_aborted.labels(reason)
        for reason in FRAME_REASONS:
            self.frames_rejected.labels(reason)
        self._records_seen = 0
        self._started_seen = 0

    def follow_leader(self, core: LeaderCore) -> None:
        """Count what the leader's history gained since the last call (cheap; call per tick)."""
        started = core.counters.get("started", 0)
        if started > self._started_seen:
            self.epochs_started.inc(started - self._started_seen)
            self._started_seen = started
        history = core.history
        if len(history) < self._records_seen:  # history was trimmed: count from its end
            self._records_seen = len(history)
        for record in history[self._records_seen:]:
            outcome = record.outcome
            if outcome == EpochOutcome.COMMITTED:
                self.epochs_committed.inc()
                self.moved_slots.inc(record.experts_moved)
                if record.agreement_ms is not None:
                    self.agreement_seconds.observe(record.agreement_ms / 1e3)
            elif outcome == EpochOutcome.ABORTED:
                self.epochs_aborted.labels((record.abort_code or AbortCode.OTHER).metric_label).inc()
            elif outcome == EpochOutcome.SKIPPED:
                self.epochs_skipped.inc()
            elif outcome == EpochOutcome.FAILED:
                self.epochs_failed.inc()
            elif outcome == EpochOutcome.PLAN_ERROR:
                self.plan_errors.inc()
            if outcome in OUTCOMES:
                self.last_rebalance.labels(outcome).set(time.time())
            if record.bytes_received:
                self.moved_bytes.inc(record.bytes_received)
            if outcome in (EpochOutcome.COMMITTED, EpochOutcome.ABORTED, EpochOutcome.FAILED,
                           EpochOutcome.SKIPPED):
                log.info("epoch %s ended: %s", "-" if record.epoch is None else record.epoch, outcome,
                         extra={"epoch": record.epoch, "outcome": outcome,
                                "step": record.switch_step, "reason": record.reason or None,
                                "bytes_moved": record.bytes_received,
                                "experts_moved": record.experts_moved})
        self._records_seen = len(history)
        self.unsafe.set(1 if core.unsafe_reason else 0)
        self.group_workers.set(len(core.workers))
        if core.world_size:
            self.group_size.set(core.world_size)
        else:
            self.group_size.clear()
        self.epoch_in_flight.set(core.agreement.epoch if core.agreement is not None else 0)
        rate = core.measured_step_rate() if core.workers else None
        if rate is None:
            self.step_rate.clear()
        else:
            self.step_rate.set(round(rate, 3))

    def follow_link(self, now: float, leader_seen: float, node_timeout_s: float) -> None:
        """Follower: the leader's reachability (``leader_seen``: monotonic time it was last
        heard, 0 never)."""
        if not leader_seen:
            self.leader_reachable.set(0)
            return
        age = now - leader_seen
        self.leader_last_seen.set(round(age, 3))
        self.leader_reachable.set(1 if age <= node_timeout_s else 0)

    def leader_balancedness(self, core: LeaderCore) -> None:
        """Balancedness of the served placement over the current count window (sums the window:
        call it every second or so, not per tick)."""
        load = None
        if core.placement is not None and core.world_size and core.shape is not None:
            load = core.window_load()  # [L, E]
        if load is None or not bool(load.any()):  # no counts in the window: unknown
            self.balancedness.clear()
            self.layer_balancedness.clear()
            return
        per_layer = balancedness(load, core.placement, core.world_size)  # [L]
        self.balancedness.set(float(per_layer.mean()))
        for layer, value in enumerate(per_layer.tolist()):
            self.layer_balancedness.labels(str(layer)).set(value)


class HttpMetrics:
    """The HTTP server's own metrics (:mod:`eplb.coordinator.health`), in the registry it serves.

    Args:
        registry: the sidecar's registry (:attr:`SidecarMetrics.registry`).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge("eplb_http_connections_open", "HTTP connections open now",
                          registry=registry)
        self.refused = Counter(
            "eplb_http_connections_refused", "HTTP connections closed unread because the "
            "server already held its most connections", registry=registry)
        self.closed = Counter(
            "eplb_http_connections_closed", "HTTP connections served and then closed, by why",
            ["reason"], registry=registry)
        self.answers = Counter("eplb_http_responses", "HTTP answers sent, by status code",
                               ["code"], registry=registry)
