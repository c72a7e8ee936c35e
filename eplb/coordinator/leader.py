"""The leader's logic with no I/O: who has joined, the window of counts, when to rebalance,
the running epoch, its decisions and the history. The leader driver
(:mod:`eplb.coordinator.leader_driver`) feeds it events and carries out what it returns
(:mod:`eplb.coordinator.outputs`), in order: records to write durably (:class:`Persist`, before
anything after it is sent), messages to broadcast, messages to one worker through a node
(:class:`SendTo`), frames to count as rejected (:class:`Reject`), and plan computations to run in
an executor (:class:`ComputePlan`, answered with :meth:`LeaderCore.on_plan_result`).

It owns every decision, the driver none: which follower incarnation speaks for a node and when
a node is lost (:class:`~eplb.coordinator.membership.NodeMembership`), a relayed HELLO that
conflicts with a live node, the WELCOME, the REJOIN (once a second per rank), the answers to
``eplbctl``, and at shutdown whether the epoch in flight is aborted or its COMMIT repeated.

Surviving a restart: every epoch start and every decision goes through :class:`Persist` first
(:mod:`eplb.coordinator.decision_log`). A restarted leader is handed those records
(:meth:`LeaderCore.restore`): it aborts, and logs, an epoch that was never decided, takes over a
committed epoch that never ended, and answers every :class:`~eplb.proto.OutcomeQuery` of a
promised worker with the decision on record. Membership is rebuilt from the ranks that rejoin.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from eplb.coordinator.aggregate import expand, node_counts_for_window
from eplb.coordinator.agreement import AgreementTimeouts, EpochAgreement, Phase
from eplb.coordinator.decision_log import EpochDecided, EpochEnded, EpochStarted, LogRecord
from eplb.coordinator.history import EpochRecord, describe, waiting_for
from eplb.coordinator.membership import NodeMembership
from eplb.coordinator.outputs import Broadcast, ComputePlan, Output, Persist, Reject, SendTo
from eplb.coordinator.worker_registry import Impostor, relayed_hello_conflict
from eplb.placement.load import overall_balancedness
from eplb.placement.planner import PlannerSpec, PlanResult
from eplb.placement.rules import InvalidPlacement, placement_hash, validate_placement
from eplb.proto import (Abort, Commit, ControlReply, ControlRequest, Counts, Done, Heartbeat, Hello,
                        InvalidField, Message, NodeAcks, NodeCounts, NodeDone, NodeHeartbeat,
                        NodeHello, NodePromises, OutcomeQuery, Plan, PlanAck, Promise,
                        ProtocolError, Refuse, Rejoin, Relay, Unauthenticated, Welcome,
                        WorkerLeft)
from eplb.proto.envelope import open_relayed
from eplb.proto.reasons import AbortCode, EpochOutcome

log = logging.getLogger("eplb.leader")

#: What a follower sidecar may send: its own messages, its workers' frames relayed, and the
#: per-node messages that answer for its workers (:mod:`eplb.coordinator.aggregate`).
NODE_ANSWERS = (NodeAcks, NodePromises, NodeDone)
PEER_MESSAGES = (NodeHello, NodeHeartbeat, Relay, WorkerLeft, NodeCounts, *NODE_ANSWERS)


@dataclass(frozen=True)
class LeaderConfig:
    """Rebalance policy. Steps are decode steps as the workers count them."""

    interval_steps: int = 1000
    window_steps: int = 1000
    min_gain: float = 0.01
    min_margin: int = 2
    max_retries: int = 3
    layers_per_chunk: int = 1
    bytes_per_chunk: int = 0
    planner: PlannerSpec = field(default_factory=PlannerSpec)
    timeouts: AgreementTimeouts = field(default_factory=AgreementTimeouts)



#: The ABORT reason of an epoch the stopping leader aborts.
SHUTDOWN_REASON = "sidecar shutting down"

#: Progress reports closer together than this count as one sample of the step rate: a burst of
#: reports queued while the leader was paused or restarting says nothing about the rate.
RATE_SAMPLE_SPACING_S = 0.1
#: The step rate needs samples spanning at least this long.
RATE_MIN_SPAN_S = 1.0


@dataclass
class WorkerInfo:
    rank: int
    node: int
    step: int
    last_seen: float


class LeaderCore:
    """Everything the leader decides, fed by the driver.

    Args:
        config: the policy.
        members: the follower sidecars (a single node's when not given).
    """

    def __init__(self, config: LeaderConfig, members: NodeMembership | None = None) -> None:
        self.config = config
        self.members = members if members is not None else NodeMembership()
        self._rejoin_asked: dict[int, float] = {}  # rank -> when it was last asked to rejoin
        self.workers: dict[int, WorkerInfo] = {}
        self._lowest_rank: int | None = None  # min(self.workers), kept as they join and leave
        self.world_size: int | None = None
        self.shape: tuple[int, int, int] | None = None  # (L, E, P)
        self.bytes_per_expert = 0
        self.placement: torch.Tensor | None = None  # [L, P]
        self.unsafe_reason = ""
        self.history: list[EpochRecord] = []
        self.agreement: EpochAgreement | None = None
        self.counters: dict[str, int] = {"started": 0, "committed": 0, "aborted": 0, "skipped": 0,
                                         "failed": 0, "joined": 0, "rejected_hello": 0}
        self._window: deque[Counts] = deque()
        self._window_sum: torch.Tensor | None = None  # [L, E] int64: sum of _window's counts
        self._window_newest = 0
        self.decided: dict[int, Commit | Abort] = {}  # every decision on record, by epoch
        self._committed_old: torch.Tensor | None = None  # [L, P] before the committed epoch
        self._late: EpochAgreement | None = None  # failed on its DONE deadline: late DONEs count
        self._after_switch: list[Counts] = []
        self._next_epoch = 1
        self._next_request = 1
        self._pending: tuple[int, bool] | None = None  # (request_id, forced) of the plan running
        self._plan_result: PlanResult | None = None
        self._retries = 0
        self._margin = config.min_margin
        self._next_trigger_step = config.interval_steps
        self._requested: bool | None = None  # eplbctl rebalance pending: its --force flag
        self._switch_end = 0
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._current: EpochRecord | None = None

    # --- membership -----------------------------------------------------------------------------

    def on_hello(self, hello: Hello, now: float) -> str:
        """A worker joins. Returns an error message (empty when accepted)."""
        shape = (hello.num_layers, hello.num_experts, hello.num_physical)
        try:
            validate_placement(hello.phys2log, hello.num_experts, hello.num_physical,
                               hello.world_size, hello.num_layers)
        except InvalidPlacement as exc:
            self.counters["rejected_hello"] += 1
            return f"rank {hello.rank} serves an invalid placement: {exc}"
        if self.shape is not None and not self.workers and self.agreement is None \
                and self._pending is None and hello.applied_epoch == 0 \
                and not self._serves_group_placement(hello.phys2log):
            # A fresh engine (never rebalanced) while no rank is joined: a new instance.
            self.shape = self.world_size = self.placement = None
        if self.shape is None:
            self.shape, self.world_size = shape, hello.world_size
            self.bytes_per_expert = hello.bytes_per_expert
            self.placement = hello.phys2log.clone()
            self._clear_window()
        elif shape != self.shape or hello.world_size != self.world_size:
            self.counters["rejected_hello"] += 1
            return (f"rank {hello.rank} reports (L, E, P)={shape}, world_size={hello.world_size}; "
                    f"the group has {self.shape}, world_size={self.world_size}")
        elif not self._serves_group_placement(hello.phys2log):
            self.counters["rejected_hello"] += 1
            served, group = placement_hash(hello.phys2log), placement_hash(self.placement)
            if hello.applied_epoch > 0:
                # Evidence, not suspicion: a rank that took part in rebalances serves a placement
                # the group does not. Its maps differ from the others'.
                self._declare_unsafe(f"rank {hello.rank} rejoined serving placement {served} "
                                     f"(its last applied epoch: {hello.applied_epoch}); the group "
                                     f"serves {group}")
            return (f"rank {hello.rank} serves placement {served}, the group serves {group}; "
                    "restart it with the group's placement")
        self.workers[hello.rank] = WorkerInfo(hello.rank, 0, hello.step, now)
        if self._lowest_rank is None or hello.rank < self._lowest_rank:
            self._lowest_rank = hello.rank
        self.counters["joined"] += 1
        log.info("rank %d joined (%d/%d workers)", hello.rank, len(self.workers), self.world_size)
        return ""

    def on_joined(self, rank: int) -> list[Output]:
        """After :meth:`on_hello` accepted ``rank``: a committed epoch waiting for its DONE is
        sent its COMMIT again (the rank may never have had it; one that finished answers with its
        DONE again, one still copying ignores it)."""
        agreement = self.agreement
        if (agreement is not None and agreement.phase is Phase.COMMITTED
                and rank in agreement.ranks and rank not in agreement.done):
            assert agreement.switch_step is not None
            return [SendTo(rank, Commit(epoch=agreement.epoch, step=agreement.switch_step))]
        return []

    def _serves_group_placement(self, phys2log: torch.Tensor) -> bool:
        """The group's placement, or, while a committed epoch copies, any layer-by-layer mix of
        its old and new placements (a rank rejoining mid-copy)."""
        if self.placement is None or phys2log.shape != self.placement.shape:
            return False
        if torch.equal(phys2log, self.placement):
            return True
        agreement = self.agreement
        if agreement is None or agreement.phase is not Phase.COMMITTED:
            return False
        old, new = self.placement, agreement.plan.phys2log
        per_layer = (phys2log == old).all(dim=1) | (phys2log == new).all(dim=1)
        return bool(per_layer.all())

    def _declare_unsafe(self, reason: str) -> None:
        if not self.unsafe_reason:
            self.unsafe_reason = reason
            self._count("unsafe")
            log.critical("the instance is unsafe to serve: %s. Stop the engine and restart it "
                         "from a known placement.", reason)

    def on_worker_left(self, rank: int, why: str, now: float,
                       code: AbortCode = AbortCode.WORKER_LEFT) -> list[Output]:
        """A worker is gone: it leaves the group; an epoch in flight aborts (or fails if committed)."""
        if self.workers.pop(rank, None) is None:
            return []
        if rank == self._lowest_rank:
            self._lowest_rank = min(self.workers, default=None)
        log.warning("rank %d left: %s", rank, why)
        if self.agreement is None:
            return []
        return self._broadcast(self.agreement.on_worker_left(rank, why, now, code), now)

    # --- frames as they arrive: workers through nodes, follower sidecars ------------------------

    def on_worker(self, node: int, msg: Message, now: float,
                  local_ranks: Collection[int] = ()) -> list[Output]:
        """A worker frame that came through ``node`` (0: the leader's own sidecar, whose
        registry admitted it; ``local_ranks``: the ranks joined there). A HELLO is answered with
        WELCOME: refused for now while another live node holds the rank, else as
        :meth:`on_hello` decides. Any other frame of a rank that did not join through ``node``
        (the leader restarted since its HELLO) asks the rank to say HELLO again."""
        if isinstance(msg, Hello):
            return self._on_worker_hello(node, msg, now, local_ranks)
        rank = getattr(msg, "rank", -1)
        if self.members.node_of(rank) != node:
            return self._stranger(node, rank, now)
        return self.on_message(msg, now)

    def _on_worker_hello(self, node: int, msg: Hello, now: float,
                         local_ranks: Collection[int]) -> list[Output]:
        members = self.members
        conflict = relayed_hello_conflict(msg.rank, node, members.rank_node,
                                          members.listed(local_ranks))
        if conflict:  # a second claim to a rank that a live node holds: it stays there
            return [Reject(f"node {node}, rank {msg.rank} (pid {msg.pid})", Impostor(conflict)),
                    SendTo(msg.rank, Welcome(rank=msg.rank, ok=False, error=conflict,
                                             retry=True), node)]
        before = members.node_of(msg.rank)
        if node != 0 and before is not None and before != node:
            log.warning("rank %d moved from node %d to node %d", msg.rank, before, node)
        error = self.on_hello(msg, now)
        if error:
            log.error("rank %d refused: %s", msg.rank, error, extra={"rank": msg.rank})
            return [SendTo(msg.rank, Welcome(rank=msg.rank, ok=False, error=error), node)]
        members.joined(msg.rank, node)
        return [SendTo(msg.rank, Welcome(rank=msg.rank, ok=True, error=""), node),
                *self.on_joined(msg.rank)]

    def _joined_through(self, node: int, rank: int) -> WorkerInfo | None:
        """``rank``'s entry if it joined through ``node`` and has not left since, else None."""
        info = self.workers.get(rank)
        return info if info is not None and self.members.node_of(rank) == node else None

    def _stranger(self, node: int, rank: int, now: float) -> list[Output]:
        """``node`` spoke for ``rank``, which did not join through it (the leader restarted
        since, or the rank moved): ask the rank to join again."""
        return self._ask_rejoin(node, rank, f"the leader does not know rank {rank}", now)

    def _ask_rejoin(self, node: int, rank: int, why: str, now: float) -> list[Output]:
        """Tell ``rank`` (through ``node``) to say HELLO again, at most once a second."""
        if now - self._rejoin_asked.get(rank, float("-inf")) < 1.0:
            return []
        self._rejoin_asked[rank] = now
        log.info("asking rank %d to join again: %s", rank, why, extra={"rank": rank})
        return [SendTo(rank, Rejoin(rank=rank, reason=why), node)]

    def on_peer(self, identity: bytes, header: Message, frames: list[tuple[int, bytes]],
                now: float, local_ranks: Collection[int] = ()) -> list[Output]:
        """A follower sidecar's message from socket ``identity``: ``header`` and, for a RELAY,
        its ``(rank, frame)`` pairs, not decoded yet (:func:`eplb.proto.envelope.open_peer`).
        ``local_ranks``: the ranks joined at the leader's own sidecar (a relayed HELLO for one
        of them is refused).
        A new incarnation of a node releases the ranks of the one it replaces
        (:meth:`NodeMembership.identify` says when, and why a RELAY counts as a NODE_HELLO).
        A per-node answer (NODE_ACKS, NODE_PROMISES, NODE_DONE) is taken as the per-rank
        messages it stands for (:func:`~eplb.coordinator.aggregate.expand`), each checked like a
        relayed frame of its rank; NODE_COUNTS is one window entry (:meth:`_on_node_counts`).

        Raises:
            ProtocolError: the message is refused as a whole and changes nothing.
        """
        if not isinstance(header, PEER_MESSAGES):
            raise InvalidField(f"unexpected {header.TYPE} from a follower")
        members = self.members
        node = members.check_node(header, now)
        out: list[Output] = []
        if members.identify(node, identity, header, now):
            out += self._node_lost(node, "its sidecar restarted", members.release(node), now)
        if isinstance(header, NodeHeartbeat):
            members.nodes[node].ranks = frozenset(header.ranks)
            out += self._on_node_progress(node, header.progress, now)
        elif isinstance(header, WorkerLeft):
            if members.node_of(header.rank) == node:
                out += self.on_worker_left(header.rank, f"{header.reason} (node {node})", now)
        elif isinstance(header, Relay):
            for rank, frame in frames:
                try:
                    msg = open_relayed(rank, frame)
                except ProtocolError as exc:
                    out.append(Reject(f"node {node}, rank {rank}", exc))
                    continue
                out += self.on_worker(node, msg, now, local_ranks)
        elif isinstance(header, NodeCounts):
            out += self._on_node_counts(node, header, now)
        elif isinstance(header, NODE_ANSWERS):
            out += self._on_node_answers(node, header, now, local_ranks)
        return out

    def _on_node_answers(self, node: int, msg: NodeAcks | NodePromises | NodeDone, now: float,
                         local_ranks: Collection[int]) -> list[Output]:
        """A node's answers: the same as the per-rank messages they stand for
        (:func:`~eplb.coordinator.aggregate.expand`), each fed to :meth:`on_worker`. The common
        case, acks or promises of ranks that all joined through ``node``, is taken in one call
        to the agreement (:meth:`EpochAgreement.on_acks`, :meth:`~EpochAgreement.on_promises`),
        which decides exactly as the per-rank messages would: the leader's cost per node, not
        per rank, is what lets PREPARE -> COMMIT stay short at hundreds of nodes."""
        batch: tuple[int, ...] = ()
        if isinstance(msg, NodeAcks):
            batch = msg.ranks
        elif isinstance(msg, NodePromises) and not msg.refused:
            batch = msg.promised
        if not batch or any(self._joined_through(node, r) is None for r in batch):
            out: list[Output] = []
            for m in expand(msg):  # refusals, DONEs, or a rank the leader does not know here
                out += self.on_worker(node, m, now, local_ranks)
            return out
        workers = self.workers
        for rank in batch:
            workers[rank].last_seen = now
        agreement = self.agreement
        if isinstance(msg, NodeAcks):
            for rank, step in zip(msg.ranks, msg.steps):
                self._progress(workers[rank], step, now)
            return [] if agreement is None else self._broadcast(
                agreement.on_acks(msg.epoch, msg.steps_by_rank, now), now)
        return [] if agreement is None else self._broadcast(
            agreement.on_promises(msg.epoch, batch, now), now)

    def _on_node_progress(self, node: int, progress: tuple[tuple[int, int], ...],
                          now: float) -> list[Output]:
        """A node's heartbeat reports the steps of the ranks it answers for; one the leader
        does not know through ``node`` (it restarted since) is asked to join again."""
        out: list[Output] = []
        for rank, step in progress:
            info = self._joined_through(node, rank)
            if info is None:
                out += self._stranger(node, rank, now)
                continue
            info.last_seen = now
            self._progress(info, step, now)
        return out

    def _on_node_counts(self, node: int, msg: NodeCounts, now: float) -> list[Output]:
        """A node's summed counts: every rank's progress, and one window entry. The sum cannot
        be split, so it is dropped whole when it names a rank that did not join through
        ``node`` (the leader restarted since, or the rank moved): that rank is asked to join
        again, the others' progress still counts."""
        entry, progress = node_counts_for_window(msg)
        joined = {rank: self._joined_through(node, rank) for rank in msg.ranks}
        strangers = [rank for rank, info in joined.items() if info is None]
        out: list[Output] = []
        for rank in strangers:
            out += self._stranger(node, rank, now)
        for rank, step in progress.items():
            info = joined[rank]
            if info is not None:
                info.last_seen = now
                self._progress(info, step, now)
        if strangers:
            self._count("rejected_counts")
            log.info("node %d: counts over steps [%d, %d) name rank(s) %s that did not join "
                     "through it; dropped", node, msg.from_step, msg.to_step, strangers)
        elif self.shape is not None:
            self._add_to_window(entry, f"node {node}")
        return out

    def _node_lost(self, node: int, why: str, ranks: list[int], now: float) -> list[Output]:
        log.error("node %d lost (%s); its ranks %s leave the group", node, why, ranks)
        out: list[Output] = []
        for rank in ranks:
            out += self.on_worker_left(rank, f"node {node} lost: {why}", now, AbortCode.NODE_LOST)
        return out

    def node_count_mismatch(self, now: float) -> str:
        """Why the nodes seen contradict --num-nodes, as the leader sees it (empty: they do
        not): a node outside it says hello (within the last 3 x --node-timeout), or every rank
        of the group joined through fewer nodes."""
        num_nodes = self.members.num_nodes
        outside = self.members.outside_nodes(now)
        if outside:
            return (f"node(s) {outside} say hello but --num-nodes is {num_nodes}: more nodes "
                    "run than --num-nodes says (StatefulSet replicas > num-nodes?)")
        through = {self.members.rank_node.get(rank, 0) for rank in self.workers}
        if self.group_complete and len(through) < num_nodes:
            return (f"all {self.world_size} ranks of the group joined through "
                    f"{len(through)} node(s) {sorted(through)} but --num-nodes is "
                    f"{num_nodes} (StatefulSet replicas < num-nodes?)")
        return ""

    # --- control --------------------------------------------------------------------------------

    def on_control(self, msg: ControlRequest, via: str, local_status: dict[str, Any],
                   incarnation: str, now: float) -> ControlReply:
        """``eplbctl status`` or ``rebalance``, asked ``via`` a node. ``local_status``: the
        leader sidecar's own view; ``incarnation``: its process's."""
        if msg.op == "status":
            result = self.status()
            result["leader"] = local_status
            result["nodes"] = {str(n): round(now - follower.seen, 3)
                               for n, follower in self.members.nodes.items()}
            return ControlReply(request_id=msg.request_id, ok=True, result=result, error="")
        by = str(msg.args.get("by") or "a control client")[:200].encode("ascii", "replace")
        accepted, text = self.request_rebalance(bool(msg.args.get("force", False)),
                                                f"{by.decode()} via {via}")
        return ControlReply(request_id=msg.request_id, ok=accepted,
                            result={"message": text, "request": self.next_request,
                                    "incarnation": incarnation},
                            error="" if accepted else text)

    def on_peer_control(self, identity: bytes, peer_user_id: str | None, msg: ControlRequest,
                        local_status: dict[str, Any], incarnation: str,
                        now: float) -> ControlReply:
        """A control request over TCP: from an authenticated follower (``peer_user_id``, the
        CURVE key's name), or on plain TCP from a follower that has spoken for its node.

        Raises:
            Unauthenticated: from neither (not answered).
        """
        node = self.members.node_named(identity)
        if peer_user_id is None and node is None:
            raise Unauthenticated(f"control request {msg.op!r} from a peer that is no "
                                  "authenticated follower (not answered)")
        via = f"node {node}" if node is not None else (peer_user_id or "a TCP peer")
        return self.on_control(msg, via, local_status, incarnation, now)

    @property
    def group_complete(self) -> bool:
        return self.world_size is not None and len(self.workers) == self.world_size

    # --- worker messages ------------------------------------------------------------------------

    def on_message(self, msg: Message, now: float) -> list[Output]:
        """A validated worker message (HELLO goes to :meth:`on_hello`)."""
        rank = getattr(msg, "rank", None)
        info = self.workers.get(rank) if rank is not None else None
        if info is None:
            return []
        info.last_seen = now
        if isinstance(msg, OutcomeQuery):
            return self.on_outcome_query(msg)
        if isinstance(msg, Done) and self._late is not None and msg.epoch == self._late.epoch:
            return self._on_late_done(msg, now)
        if isinstance(msg, Heartbeat):
            self._progress(info, msg.step, now)
        elif isinstance(msg, Counts):
            self._on_counts(msg, info, now)
        elif isinstance(msg, PlanAck):
            self._progress(info, msg.step, now)
        if isinstance(msg, (PlanAck, Promise, Refuse, Done)) and self.agreement is not None:
            return self._broadcast(self.agreement.on_message(msg, now), now)
        return []

    def on_outcome_query(self, query: OutcomeQuery) -> list[Output]:
        """A promised worker asks what became of ``query.epoch``: the decision on record, or, for
        an epoch this leader never decided and is not deciding now (its log was lost, or the
        epoch is from before a restart that aborted it), an ABORT that is logged first, so it can
        never be committed later. Nothing while the epoch is still being decided."""
        epoch = query.epoch
        decided = self.decided.get(epoch)
        if decided is not None:
            return [SendTo(query.rank, decided)]
        agreement = self.agreement
        if agreement is not None and agreement.epoch == epoch:
            return []  # PLANNED or PREPARING: the outcome goes to everyone when decided
        reason = (f"epoch {epoch} is not on the leader's record (a leader restart lost it); "
                  "it was never committed")
        self._next_epoch = max(self._next_epoch, epoch + 1)
        abort = Abort(epoch=epoch, reason=reason, code=AbortCode.NOT_ON_RECORD)
        self.decided[epoch] = abort
        log.warning("epoch %d: rank %d asked for its outcome; none on record, so aborted",
                    epoch, query.rank)
        return [Persist(EpochDecided(epoch, commit=False, reason=reason)),
                SendTo(query.rank, abort)]

    def _progress(self, info: WorkerInfo, step: int, now: float) -> None:
        info.step = max(info.step, step)
        if info.rank != self._lowest_rank:  # the rate follows the lowest rank (O(1): O(ranks) per
            return                          # frame made 1,000 x 8 ranks saturate the leader)
        samples = self._rate_samples
        if samples and now - samples[-1][0] < RATE_SAMPLE_SPACING_S:
            samples[-1] = (samples[-1][0], max(samples[-1][1], info.step))  # one burst, one sample
        else:
            samples.append((now, info.step))

    def _clear_window(self) -> None:
        self._window.clear()
        self._window_sum = None
        self._window_newest = 0

    def _on_counts(self, msg: Counts, info: WorkerInfo, now: float) -> None:
        """One rank's COUNTS frame: its progress, and one window entry."""
        if self._add_to_window(msg, f"rank {msg.rank}"):
            self._progress(info, msg.to_step, now)

    def _add_to_window(self, msg: Counts, source: str) -> bool:
        """Add one counts entry (``counts: [L, E]`` over ``[from_step, to_step)``, of one rank
        or summed over a node's) to the window in O(entry): a running sum, oldest entries
        subtracted as they fall out. Returns False (and drops it) when its shape is wrong."""
        assert self.shape is not None
        if list(msg.counts.shape) != [self.shape[0], self.shape[1]]:
            log.warning("%s sent counts of shape %s, expected [%d, %d]; dropped", source,
                        list(msg.counts.shape), self.shape[0], self.shape[1])
            self._count("rejected_counts")
            return False
        counts = msg.counts.to(torch.int64)
        if self._window_sum is None:
            self._window_sum = torch.zeros_like(counts)
        self._window.append(msg)
        self._window_sum += counts
        self._window_newest = max(self._window_newest, msg.to_step)
        while self._window and \
                self._window[0].to_step <= self._window_newest - self.config.window_steps:
            self._window_sum -= self._window.popleft().counts.to(torch.int64)
        self._observe_after_switch(msg)
        return True

    def _count(self, counter: str) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + 1

    def steps_per_second(self) -> float:
        """Decode rate measured from the lowest rank's progress reports, over samples at least
        :data:`RATE_SAMPLE_SPACING_S` apart spanning at least :data:`RATE_MIN_SPAN_S` (0 until
        then: the margin then falls back to its minimum)."""
        rate = self.measured_step_rate()
        return 0.0 if rate is None else rate

    def measured_step_rate(self) -> float | None:
        """:meth:`steps_per_second`, or None while too few samples were taken to say."""
        if len(self._rate_samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._rate_samples[0], self._rate_samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 - t0 >= RATE_MIN_SPAN_S else None

    def min_step(self) -> int:
        return min((w.step for w in self.workers.values()), default=0)

    def max_step(self) -> int:
        return max((w.step for w in self.workers.values()), default=0)

    def window_load(self) -> torch.Tensor:
        """``[L, E]`` int64: counts of every rank over the window."""
        assert self.shape is not None
        if self._window_sum is None:
            return torch.zeros(self.shape[0], self.shape[1], dtype=torch.int64)
        return self._window_sum.clone()

    # --- triggering and planning ----------------------------------------------------------------

    def request_rebalance(self, force: bool, by: str = "") -> tuple[bool, str]:
        """``eplbctl rebalance``: start an epoch at the next tick. Returns (accepted, message).
        Once accepted, :attr:`next_request` is the request number its history records carry
        (``request``); ``by`` says who asked, for the log."""
        accepted, text = self._may_rebalance()
        last = self.history[-1] if self.history else None
        context = {"epoch": self._next_epoch} if accepted else {}
        asked = (f"rebalance{' (forced)' if force else ''} requested by {by or 'eplbctl'}; last "
                 f"attempt: {describe(last)}")
        if not accepted:
            log.warning("%s; refused: %s", asked, text, extra=context)
            return False, text
        self._requested = force
        log.info("%s; request %d, next epoch %d", asked, self._next_request, self._next_epoch,
                 extra=context)
        return True, "rebalance requested"

    def _may_rebalance(self) -> tuple[bool, str]:
        if self.unsafe_reason:
            return False, f"the instance is unsafe after a failed epoch: {self.unsafe_reason}"
        if not self.group_complete:
            return False, (f"only {len(self.workers)} of "
                           f"{self.world_size if self.world_size else 'an unknown number of'} "
                           "ranks have joined; a rebalance needs the whole group")
        if self.agreement is not None or self._pending is not None:
            return False, "a rebalance is already in progress"
        return True, ""

    @property
    def next_request(self) -> int:
        """The number the next plan request gets (an accepted ``eplbctl rebalance`` is it)."""
        return self._next_request

    def on_tick(self, now: float) -> list[Output]:
        """Advance time: lose silent follower nodes (their ranks leave), end overdue phases,
        retry aborted epochs, start new ones when due."""
        out: list[Output] = []
        for node, silent in self.members.tick(now):
            out += self._node_lost(node, f"no heartbeat for {silent:.1f}s (limit "
                                         f"{self.members.node_timeout_s:g}s)",
                                   self.members.lose(node), now)
        if self.agreement is not None:
            out += self._broadcast(self.agreement.on_tick(now), now)
        if self.agreement is not None or self._pending is not None or self.unsafe_reason:
            return out
        if not self.group_complete or not self._window:
            return out
        forced = bool(self._requested)
        if self._requested is None and self.min_step() < self._next_trigger_step:
            return out
        self._requested = None
        assert self.placement is not None and self.world_size is not None
        request_id = self._next_request
        self._next_request += 1
        self._pending = (request_id, forced)
        self._next_trigger_step = self.min_step() + self.config.interval_steps
        out.append(ComputePlan(request_id, self.window_load(), self.placement.clone(),
                               self.world_size, self.config.min_gain, forced, self.config.planner))
        return out

    def on_plan_result(self, request_id: int, result: PlanResult | BaseException,
                       now: float) -> list[Output]:
        """The executor finished planning: skip, or start the epoch's agreement."""
        if self._pending is None or self._pending[0] != request_id:
            return []
        forced = self._pending[1]
        self._pending = None
        if isinstance(result, BaseException):
            self.history.append(EpochRecord(None, EpochOutcome.PLAN_ERROR, f"{type(result).__name__}: {result}",
                                            started_at_step=self.min_step(), forced=forced,
                                            request=request_id))
            log.error("planning failed: %s", result)
            return []
        record = EpochRecord(None, EpochOutcome.SKIPPED, result.skip_reason, started_at_step=self.min_step(),
                             balancedness_before=result.balancedness_before,
                             balancedness_predicted=result.balancedness_after,
                             experts_moved=result.experts_moved,
                             plan_ms=result.plan_seconds * 1e3, forced=forced,
                             request=request_id)
        if result.skip_reason:
            self.counters["skipped"] += 1
            self.history.append(record)
            log.info("rebalance skipped: %s", result.skip_reason)
            return []
        self._plan_result = result
        self._retries = 0
        self._margin = self.config.min_margin
        return self._start_epoch(record, now)

    def _start_epoch(self, record: EpochRecord, now: float) -> list[Output]:
        assert self._plan_result is not None
        epoch = self._next_epoch
        self._next_epoch += 1
        plan = Plan(epoch=epoch, phys2log=self._plan_result.phys2log,
                    plan_hash=placement_hash(self._plan_result.phys2log),
                    layers_per_chunk=self.config.layers_per_chunk,
                    bytes_per_chunk=self.config.bytes_per_chunk)
        self.agreement = EpochAgreement(plan, frozenset(self.workers), self._margin,
                                        self.steps_per_second(), now, self.config.timeouts)
        record.epoch = epoch
        record.outcome = EpochOutcome.IN_PROGRESS
        record.started_at_step = self.max_step()
        self._current = record
        self.counters["started"] += 1
        log.info("epoch %d: PLAN to %d workers (margin >= %d, retry %d)", epoch, len(self.workers),
                 self._margin, self._retries)
        return [Persist(EpochStarted(epoch)), *(Broadcast(m) for m in self.agreement.start())]

    def _broadcast(self, msgs: list[Message], now: float) -> list[Output]:
        """Broadcast the agreement's messages; a decision (COMMIT or ABORT) is put on record
        first."""
        out: list[Output] = []
        for m in msgs:
            if isinstance(m, (Commit, Abort)):
                out.append(Persist(self._decision_record(m)))
                self.decided[m.epoch] = m
            out.append(Broadcast(m))
        if self.agreement is not None and self.agreement.finished:
            out += self._epoch_ended(now)
        return out

    def _decision_record(self, m: Commit | Abort) -> EpochDecided:
        if isinstance(m, Abort):
            return EpochDecided(m.epoch, commit=False, reason=m.reason)
        agreement = self.agreement
        assert agreement is not None and self.placement is not None
        self._committed_old = self.placement.clone()
        return EpochDecided(m.epoch, commit=True, switch_step=m.step,
                            old=self.placement.tolist(), new=agreement.plan.phys2log.tolist(),
                            world_size=self.world_size or 0,
                            num_experts=self.shape[1] if self.shape else 0,
                            layers_per_chunk=agreement.plan.layers_per_chunk,
                            bytes_per_chunk=agreement.plan.bytes_per_chunk)

    def _epoch_ended(self, now: float) -> list[Output]:
        agreement, record = self.agreement, self._current
        assert agreement is not None and record is not None
        self.agreement, self._current = None, None
        record.switch_step = agreement.switch_step
        record.margin = agreement.effective_margin or None
        if agreement.agreement_seconds is not None:
            record.agreement_ms = agreement.agreement_seconds * 1e3
        record.bytes_received = sum(d.bytes_received for d in agreement.done.values())
        record.max_hold_ms = max((d.hold_seconds for d in agreement.done.values()), default=0) * 1e3
        record.reason = agreement.reason
        if agreement.phase is Phase.SUCCEEDED:
            self._adopt(agreement)
            record.outcome = EpochOutcome.COMMITTED
            self.counters["committed"] += 1
            log.info("epoch %d: committed at S=%s; placement adopted", agreement.epoch,
                     agreement.switch_step)
            self.history.append(record)
            return [Persist(EpochEnded(agreement.epoch, succeeded=True))]
        if agreement.phase is Phase.FAILED:
            record.outcome = EpochOutcome.FAILED
            self.counters["failed"] += 1
            if agreement.failed_on_timeout:
                self._late = agreement  # DONEs ok from every rank may still clear it
            self._declare_unsafe(f"epoch {agreement.epoch}: {agreement.reason}")
            self.history.append(record)
            return [Persist(EpochEnded(agreement.epoch, succeeded=False, reason=agreement.reason))]
        record.outcome = EpochOutcome.ABORTED
        record.abort_code = agreement.abort_code
        self.counters["aborted"] += 1
        self.history.append(record)
        log.warning("epoch %d aborted: %s", agreement.epoch, agreement.reason)
        if agreement.retryable and self._retries < self.config.max_retries and self.group_complete:
            self._retries += 1
            self._margin = max(self._margin * 2, agreement.effective_margin * 2, 4)
            retry = EpochRecord(None, EpochOutcome.IN_PROGRESS, "", forced=record.forced,
                                balancedness_before=record.balancedness_before,
                                balancedness_predicted=record.balancedness_predicted,
                                experts_moved=record.experts_moved, plan_ms=record.plan_ms,
                                request=record.request)
            return self._start_epoch(retry, now)
        return []

    def _adopt(self, agreement: EpochAgreement) -> None:
        self.placement = agreement.plan.phys2log.clone()
        self._committed_old = None
        self._after_switch = []
        self._switch_end = self.max_step()

    def _on_late_done(self, msg: Done, now: float) -> list[Output]:
        """A DONE of the epoch that failed on its deadline: every rank ok clears the failure."""
        late = self._late
        assert late is not None
        if not late.on_late_done(msg, now):
            if late.phase is Phase.FAILED and not late.failed_on_timeout:
                self._late = None  # a DONE error: now failed on evidence, for good
                self.unsafe_reason = f"epoch {late.epoch}: {late.reason}"
            return []
        self._late = None
        self._adopt(late)
        self.unsafe_reason = ""
        self.counters["committed"] += 1
        self.counters["failed"] -= 1
        record = next((r for r in reversed(self.history) if r.epoch == late.epoch), None)
        if record is not None:
            record.outcome, record.reason = EpochOutcome.COMMITTED, "every DONE came after the deadline"
        log.warning("epoch %d: every rank reported DONE ok after the deadline; the failure is "
                    "cleared and the placement adopted", late.epoch)
        return [Persist(EpochEnded(late.epoch, succeeded=True))]

    # --- restart --------------------------------------------------------------------------------

    def restore(self, records: list[LogRecord], now: float) -> list[Output]:
        """A restarted leader takes over from its decision log. Epoch numbers continue after the
        highest on record; an epoch started and never decided is aborted (returned as a
        :class:`Persist` and an ABORT broadcast; promised workers that missed it get it when they
        ask); a committed epoch that never ended is resumed, waiting for every DONE. Membership
        is not restored: it is rebuilt from the ranks that rejoin."""
        started: set[int] = set()
        ended: set[int] = set()
        last_commit: EpochDecided | None = None
        adopted: EpochDecided | None = None
        for r in records:
            self._next_epoch = max(self._next_epoch, r.epoch + 1)
            if isinstance(r, EpochStarted):
                started.add(r.epoch)
            elif isinstance(r, EpochDecided):
                self.decided[r.epoch] = (Commit(epoch=r.epoch, step=r.switch_step) if r.commit
                                         else Abort(epoch=r.epoch, reason=r.reason))
                if r.commit:
                    last_commit = r
            elif isinstance(r, EpochEnded):
                ended.add(r.epoch)
                if r.succeeded and last_commit is not None and last_commit.epoch == r.epoch:
                    adopted = last_commit
        out: list[Output] = []
        for epoch in sorted(started - set(self.decided)):
            reason = "the leader restarted before deciding this epoch"
            abort = Abort(epoch=epoch, reason=reason, code=AbortCode.LEADER_RESTARTED)
            self.decided[epoch] = abort
            log.warning("epoch %d: never decided before the restart; aborted", epoch)
            out += [Persist(EpochDecided(epoch, commit=False, reason=reason)), Broadcast(abort)]
        resume = last_commit if last_commit is not None and last_commit.epoch not in ended else None
        group = resume or adopted
        if group is not None and group.old is not None and group.new is not None:
            old, new = group.placements()
            self.world_size = group.world_size
            self.shape = (int(old.shape[0]), group.num_experts, int(old.shape[1]))
            self.placement = old if resume is not None else new
        if resume is not None and resume.new is not None:
            old, new = resume.placements()
            plan = Plan(epoch=resume.epoch, phys2log=new, plan_hash=placement_hash(new),
                        layers_per_chunk=resume.layers_per_chunk,
                        bytes_per_chunk=resume.bytes_per_chunk)
            self.agreement = EpochAgreement.resume_committed(
                plan, frozenset(range(resume.world_size)), resume.switch_step, now,
                self.config.timeouts)
            self._committed_old = old
            self._current = EpochRecord(resume.epoch, EpochOutcome.IN_PROGRESS, "resumed after a restart",
                                        switch_step=resume.switch_step)
            log.warning("epoch %d: committed at S=%d before the restart and not finished; "
                        "waiting for every rank's DONE", resume.epoch, resume.switch_step)
        log.info("restored %d decision(s) from the log; next epoch %d", len(self.decided),
                 self._next_epoch)
        return out

    # --- shutdown -------------------------------------------------------------------------------

    def shutdown(self, now: float, reason: str = SHUTDOWN_REASON) -> list[Output]:
        """The leader is stopping: ABORT an epoch that has not committed (on record first), so
        promised workers stop holding at S; repeat the COMMIT of a committed one, in case the
        broadcast that carried it was cut short (workers ignore a COMMIT they already have), and
        never abort it (invariant I1): the workers finish their copies, and a restarted leader
        resumes it from its decision log."""
        agreement = self.agreement
        if agreement is None or agreement.finished:
            return []
        fields = {"epoch": agreement.epoch, "phase": agreement.phase.value,
                  "step": agreement.switch_step}
        if agreement.phase in (Phase.PLANNED, Phase.PREPARING):
            log.warning("epoch %d: aborting it (%s, not committed): %s", agreement.epoch,
                        agreement.phase.value, reason, extra=fields)
            abort = Abort(epoch=agreement.epoch, reason=reason, code=AbortCode.SHUTDOWN)
            self.decided[agreement.epoch] = abort
            self.agreement = None
            return [Persist(EpochDecided(agreement.epoch, commit=False, reason=reason)),
                    Broadcast(abort)]
        assert agreement.switch_step is not None
        log.warning("epoch %d: committed at S=%d, so it is not aborted; the workers finish "
                    "their copies, and a restarted leader resumes it from its decision log",
                    agreement.epoch, agreement.switch_step, extra=fields)
        return [Broadcast(Commit(epoch=agreement.epoch, step=agreement.switch_step))]

    def _observe_after_switch(self, msg: Counts) -> None:
        """Fill in the measured balancedness of the last committed epoch from counts taken
        entirely after its switch."""
        last = next((r for r in reversed(self.history) if r.outcome is EpochOutcome.COMMITTED), None)
        if last is None or last.balancedness_observed is not None or self.placement is None:
            return
        if msg.from_step < self._switch_end:
            return
        self._after_switch.append(msg)
        covered = max(c.to_step for c in self._after_switch) - min(c.from_step for c in self._after_switch)
        if covered >= max(1, min(self.config.interval_steps, self.config.window_steps) // 2):
            load = sum((c.counts for c in self._after_switch), torch.zeros_like(msg.counts))
            last.balancedness_observed = overall_balancedness(load, self.placement, self.world_size)

    # --- reporting ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything ``eplbctl status`` shows (plain JSON-able values)."""
        current = None
        if self.placement is not None and self._window and self.world_size:
            current = overall_balancedness(self.window_load(), self.placement, self.world_size)
        agreement = self.agreement
        return {
            "world_size": self.world_size,
            "workers": sorted(self.workers),
            "shape": list(self.shape) if self.shape else None,
            "min_step": self.min_step(),
            "max_step": self.max_step(),
            "steps_per_second": round(self.steps_per_second(), 2),
            "placement_hash": placement_hash(self.placement) if self.placement is not None else None,
            "balancedness": current,
            "unsafe": self.unsafe_reason,
            "epoch_in_flight": None if agreement is None else {
                "epoch": agreement.epoch, "phase": agreement.phase.value,
                "switch_step": agreement.switch_step,
                "waiting_for": sorted(waiting_for(agreement)),
                "request": self._current.request if self._current is not None else None,
            },
            "planning": self._pending is not None,
            "planning_request": self._pending[0] if self._pending is not None else None,
            "rebalance_requested": self._requested is not None,
            "next_trigger_step": self._next_trigger_step,
            "counters": dict(self.counters),
            "history": [r.as_dict() for r in self.history[-50:]],
        }
