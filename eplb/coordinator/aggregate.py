"""Per-node aggregation, with no I/O: a follower answers for its node, the leader expands.

Follower side, :class:`NodeAggregator`: fed the decoded messages of the node's local workers,
the leader's messages as they pass down (PLAN, PREPARE, COMMIT, ABORT), the set of local ranks
that joined, ranks leaving, and clock ticks. It returns what to send up:

* :class:`SendUp` a per-node message (:class:`~eplb.proto.NodeCounts`,
  :class:`~eplb.proto.NodeAcks`, :class:`~eplb.proto.NodePromises`, :class:`~eplb.proto.NodeDone`);
* :class:`PassThrough` the worker's own frame, relayed as it came (HELLO, BYE, OUTCOME_QUERY,
  and anything the aggregator does not hold: a frame of a rank that has not joined, an answer for
  an epoch that has ended, a late or duplicate counts frame).

A joined rank's HEARTBEAT stops here: its step is kept, and goes up with the node's own heartbeat
(:meth:`NodeAggregator.progress`).

What it holds, and for how long (every hold is bounded in time, invariant I2):

* counts: one flush round per step range ``[from_step, to_step)``, summed; it goes up when every
  local rank awaited for it contributed, or ``counts_wait`` after its first frame came (2 x the
  flush interval seen, clamped), so one slow rank does not hold the node's counts;
* PLAN_ACK, PROMISE, DONE of epoch ``e``: one message once every local rank awaited for ``e``
  answered, or :attr:`AggregatorConfig.answer_wait_s` after the first unsent answer. A REFUSE or
  a DONE with an error goes up at once (it decides the epoch: no reason to wait). A rank that
  leaves is no longer awaited: what is known goes up (the leader learns of the departure through
  WORKER_LEFT and decides);
* everything of an epoch is dropped when the epoch ends: acks and promises at its COMMIT or ABORT,
  every kind at its ABORT or at a PLAN of a later epoch, done when every rank answered.

The ranks awaited for an epoch are the joined local ranks when its PLAN passed (or when its first
answer came, if no PLAN was seen), less those that left since. Once a PLAN has passed, only answers
for its epoch are held; others pass through (a stray epoch number cannot make the node hold).

Leader side, pure functions: :func:`expand` turns NodeAcks / NodePromises / NodeDone into the
exact per-rank :class:`~eplb.proto.PlanAck` / :class:`~eplb.proto.Promise` /
:class:`~eplb.proto.Refuse` / :class:`~eplb.proto.Done` messages the leader core handles today, so
the agreement decides on the same facts (I1: COMMIT only when every rank promised).
:func:`node_counts_for_window` turns a NodeCounts into one window entry and each rank's step.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from eplb.proto import (Abort, Commit, Counts, Done, Heartbeat, Message, NodeAcks, NodeCounts,
                        NodeDone, NodePromises, Plan, PlanAck, Promise, Refuse)

log = logging.getLogger("eplb.aggregate")


# --- outputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SendUp:
    """Send this per-node message to the leader."""

    msg: Message


@dataclass(frozen=True)
class PassThrough:
    """Relay ``msg`` (the worker message just fed in, or one held earlier) as its own frame."""

    msg: Message


Up = SendUp | PassThrough


class AnswerKind(enum.Enum):
    """The agreement answers a node aggregates, one kind per leader question."""

    ACK = "plan_ack"          # to PLAN
    PROMISE = "promise"       # to PREPARE (a REFUSE may also answer PLAN)
    DONE = "done"             # after COMMIT


@dataclass(frozen=True)
class AggregatorConfig:
    """How long the aggregator may hold what it has (seconds on the driver's monotonic clock).

    Args:
        counts_wait_factor: a flush round goes up this many flush intervals (as measured between
            the first frames of successive rounds) after its first frame, complete or not.
        counts_wait_min_s, counts_wait_max_s: bounds of that wait; before an interval is
            measured the wait is ``counts_wait_max_s``.
        answer_wait_s: an answer (ack, promise, done) waits at most this long for the rest of
            the node's ranks; keep it well under the leader's phase timeouts.
        max_rounds: flush rounds remembered at most (complete ones, and partial ones waiting for
            stragglers); beyond it the oldest is forgotten, what it held going up first.
    """

    counts_wait_factor: float = 2.0
    counts_wait_min_s: float = 0.05
    counts_wait_max_s: float = 5.0
    answer_wait_s: float = 1.0
    max_rounds: int = 64


@dataclass
class _Held:
    """What is held for one question: a flush round's counts, or one kind of answer of one epoch."""

    awaited: set[int]
    answers: dict[int, Any] = field(default_factory=dict)  # rank -> its fact, not yet sent
    sent: set[int] = field(default_factory=set)
    since: float | None = None  # when the oldest unsent answer came
    urgent: bool = False        # a REFUSE or a DONE error: goes up now
    total: torch.Tensor | None = None  # counts rounds: [L, E] int64 sum of the unsent answers

    def add(self, rank: int, fact: Any, now: float) -> None:
        self.answers[rank] = fact
        if self.since is None:
            self.since = now

    def complete(self) -> bool:
        return self.awaited <= self.sent

    def ready(self, now: float, wait_s: float) -> bool:
        if not self.answers:
            return False
        return (self.urgent or self.awaited <= self.sent | self.answers.keys()
                or (self.since is not None and now >= self.since + wait_s))

    def take(self) -> dict[int, Any]:
        answers, self.answers = self.answers, {}
        self.sent |= answers.keys()
        self.since, self.urgent = None, False
        return answers


class NodeAggregator:
    """A follower's aggregation of its local workers' messages (see the module docstring).

    Args:
        node: this sidecar's node rank (named in every message it sends up).
        config: the hold times.
    """

    def __init__(self, node: int, config: AggregatorConfig | None = None) -> None:
        self.node = node
        self.config = config or AggregatorConfig()
        self.joined: set[int] = set()
        self._latest: dict[int, int] = {}  # rank -> latest decode step heard from it
        self._rounds: OrderedDict[tuple[int, int], _Held] = OrderedDict()  # (from, to) -> round
        self._round_gap_s: float | None = None  # smoothed time between new rounds
        self._last_round: tuple[int, float] | None = None  # (to_step, opened at) of the newest
        self._members: dict[int, frozenset[int]] = {}  # epoch -> ranks awaited for it
        self._answers: dict[tuple[AnswerKind, int], _Held] = {}
        self._plan_epoch: int | None = None  # the epoch of the latest PLAN seen
        self._ended: dict[AnswerKind, int] = {kind: -1 for kind in AnswerKind}  # per kind: epochs <= are over

    # --- membership -----------------------------------------------------------------------------

    def set_joined(self, ranks: Iterable[int], now: float) -> list[Up]:
        """The local ranks that joined (the leader welcomed them) are ``ranks``; ranks missing
        from it left."""
        ranks = set(ranks)
        out: list[Up] = []
        for rank in sorted(self.joined - ranks):
            out += self.on_left(rank, now)
        self.joined = ranks
        return out

    def on_joined(self, rank: int) -> None:
        """A local rank joined: rounds and epochs that open from now on wait for it."""
        self.joined.add(rank)

    def on_left(self, rank: int, now: float) -> list[Up]:
        """A local rank left (BYE, silence, its process gone): nothing waits for it any more,
        and what was waiting only for it goes up now."""
        self.joined.discard(rank)
        self._latest.pop(rank, None)
        for held in [*self._rounds.values(), *self._answers.values()]:
            held.awaited.discard(rank)
        return self._flush(now)

    # --- events ---------------------------------------------------------------------------------

    def on_worker(self, msg: Message, now: float) -> list[Up]:
        """One decoded message of a local worker (its identity already checked)."""
        rank = getattr(msg, "rank", None)
        if rank not in self.joined:
            return [PassThrough(msg)]  # the leader decides about ranks it may not know
        if isinstance(msg, Heartbeat):  # its step goes up in the node's heartbeat (progress())
            self._heard(msg.rank, msg.step)
            return []
        if isinstance(msg, Counts):
            return self._on_counts(msg, now)
        if isinstance(msg, PlanAck):
            self._heard(msg.rank, msg.step)
            return self._on_answer(AnswerKind.ACK, msg, msg.step, now)
        if isinstance(msg, Promise):
            return self._on_answer(AnswerKind.PROMISE, msg, None, now)
        if isinstance(msg, Refuse):
            return self._on_answer(AnswerKind.PROMISE, msg, (msg.step, msg.reason, msg.code), now,
                                   urgent=True)
        if isinstance(msg, Done):
            fact = (msg.ok, msg.error, msg.bytes_received, msg.copy_seconds, msg.hold_seconds)
            return self._on_answer(AnswerKind.DONE, msg, fact, now, urgent=not msg.ok)
        return [PassThrough(msg)]

    def on_leader(self, msg: Message, now: float) -> list[Up]:
        """A leader message on its way down to the local workers: it opens and ends epochs."""
        if isinstance(msg, Plan):
            self._plan_epoch = max(msg.epoch, self._plan_epoch or 0)
            for kind in AnswerKind:
                self._end(kind, msg.epoch - 1)
            self._members.setdefault(msg.epoch, frozenset(self.joined))
        elif isinstance(msg, Commit):
            self._end(AnswerKind.ACK, msg.epoch)
            self._end(AnswerKind.PROMISE, msg.epoch)
        elif isinstance(msg, Abort):
            for kind in AnswerKind:
                self._end(kind, msg.epoch)
        return self._flush(now)

    def on_tick(self, now: float) -> list[Up]:
        """Advance the clock: whatever has waited its bound goes up."""
        return self._flush(now)

    def next_deadline(self) -> float | None:
        """When :meth:`on_tick` next has something to send (None: nothing is held)."""
        times = [h.since + self.counts_wait_s() for h in self._rounds.values() if h.since is not None]
        times += [h.since + self.config.answer_wait_s for h in self._answers.values()
                  if h.since is not None]
        return min(times, default=None)

    def counts_wait_s(self) -> float:
        """How long a flush round waits for its slowest rank."""
        cfg = self.config
        if self._round_gap_s is None:
            return cfg.counts_wait_max_s
        return min(cfg.counts_wait_max_s,
                   max(cfg.counts_wait_min_s, cfg.counts_wait_factor * self._round_gap_s))

    def progress(self) -> tuple[tuple[int, int], ...]:
        """``(rank, step)`` for every joined rank: the latest decode step heard from it (by
        HEARTBEAT, COUNTS or PLAN_ACK), for the node's heartbeat to the leader."""
        return tuple((rank, self._latest[rank]) for rank in sorted(self.joined)
                     if rank in self._latest)

    @property
    def held(self) -> int:
        """Worker messages held now (for status and tests)."""
        return sum(len(h.answers) for h in [*self._rounds.values(), *self._answers.values()])

    # --- counts ---------------------------------------------------------------------------------

    def _heard(self, rank: int, step: int) -> None:
        if rank in self.joined:
            self._latest[rank] = max(self._latest.get(rank, 0), step)

    def _on_counts(self, msg: Counts, now: float) -> list[Up]:
        key = (msg.from_step, msg.to_step)
        held = self._rounds.get(key)
        if held is None:
            held = self._open_round(key, now)
        elif (msg.rank in held.sent or msg.rank in held.answers
              or (held.total is not None and held.total.shape != msg.counts.shape)):
            return [PassThrough(msg)]  # a duplicate or a misshaped frame: the leader judges it
        counts = msg.counts.to(torch.int64)
        held.total = counts.clone() if held.total is None else held.total + counts
        self._heard(msg.rank, msg.to_step)
        held.add(msg.rank, msg.to_step, now)
        out = self._flush(now)
        while len(self._rounds) > self.config.max_rounds:  # the oldest goes up as it is
            old_key, old = self._rounds.popitem(last=False)
            out += self._round_up(old_key, old)
        return out

    def _open_round(self, key: tuple[int, int], now: float) -> _Held:
        if self._last_round is not None and key[1] > self._last_round[0]:
            gap = now - self._last_round[1]
            if gap > 0:
                self._round_gap_s = gap if self._round_gap_s is None else \
                    0.5 * self._round_gap_s + 0.5 * gap
        if self._last_round is None or key[1] > self._last_round[0]:
            self._last_round = (key[1], now)
        held = _Held(awaited=set(self.joined))
        self._rounds[key] = held
        return held

    def _round_up(self, key: tuple[int, int], held: _Held) -> list[Up]:
        total = held.total
        answers = held.take()
        held.total = None
        if not answers:
            return []
        assert total is not None
        ranks = tuple(sorted(answers))
        steps = tuple(max(answers[r], self._latest.get(r, 0)) for r in ranks)
        return [SendUp(NodeCounts(node=self.node, ranks=ranks, steps=steps, from_step=key[0],
                                  to_step=key[1], counts=total))]

    # --- answers --------------------------------------------------------------------------------

    def _on_answer(self, kind: AnswerKind, msg: Message, fact: Any, now: float,
                   urgent: bool = False) -> list[Up]:
        epoch: int = msg.epoch  # type: ignore[attr-defined]
        rank: int = msg.rank  # type: ignore[attr-defined]
        if epoch <= self._ended[kind] or (self._plan_epoch is not None and epoch != self._plan_epoch):
            # The epoch (or this phase of it) is over, or is not the one whose PLAN passed last:
            # the leader judges. (Holding only the current epoch bounds what a confused worker
            # can make this hold.)
            return [PassThrough(msg)]
        held = self._answers.get((kind, epoch))
        if held is None:
            members = self._members.setdefault(epoch, frozenset(self.joined))
            held = self._answers[(kind, epoch)] = _Held(awaited=set(members) & self.joined)
        if rank not in held.awaited or rank in held.sent or rank in held.answers:
            return [PassThrough(msg)]  # not expected here, or said twice: relay it as it came
        held.add(rank, fact, now)
        held.urgent |= urgent
        return self._flush(now)

    def _answer_up(self, kind: AnswerKind, epoch: int, held: _Held) -> list[Up]:
        answers = held.take()
        if not answers:
            return []
        ranks = sorted(answers)
        node = self.node
        if kind is AnswerKind.ACK:
            msg: Message = NodeAcks(node=node, epoch=epoch, ranks=tuple(ranks),
                                    steps=tuple(answers[r] for r in ranks))
        elif kind is AnswerKind.PROMISE:
            msg = NodePromises(node=node, epoch=epoch,
                               promised=tuple(r for r in ranks if answers[r] is None),
                               refused=tuple((r, *answers[r]) for r in ranks
                                             if answers[r] is not None))
        else:
            msg = NodeDone(node=node, epoch=epoch, results=tuple((r, *answers[r]) for r in ranks))
        return [SendUp(msg)]

    def _end(self, kind: AnswerKind, epoch: int) -> None:
        """Answers of ``kind`` for epochs up to ``epoch`` are no longer wanted: drop them."""
        if epoch <= self._ended[kind]:
            return
        self._ended[kind] = epoch
        for key in [k for k in self._answers if k[0] is kind and k[1] <= epoch]:
            dropped = self._answers.pop(key)
            if dropped.answers:
                log.debug("node %d: epoch %d ended; dropped %d held %s answer(s)", self.node,
                          key[1], len(dropped.answers), kind.value)
        if kind is AnswerKind.DONE:
            done = min(self._ended.values())
            for e in [e for e in self._members if e <= done]:
                del self._members[e]

    # --- flushing -------------------------------------------------------------------------------

    def _flush(self, now: float) -> list[Up]:
        out: list[Up] = []
        wait = self.counts_wait_s()
        for key, held in list(self._rounds.items()):
            if held.ready(now, wait):
                out += self._round_up(key, held)
            # A complete round stays (with no tensor) until it is among the oldest beyond
            # max_rounds, so that a duplicate frame of it passes through instead of opening it again.
        for (kind, epoch), held in list(self._answers.items()):
            if self._answers.get((kind, epoch)) is not held:
                continue  # dropped while this loop ran (its kind ended)
            if held.ready(now, self.config.answer_wait_s):
                out += self._answer_up(kind, epoch, held)
            if held.complete() and not held.answers:
                del self._answers[(kind, epoch)]
                self._end(kind, epoch)  # every rank answered: later copies pass through
        return out


# --- leader side --------------------------------------------------------------------------------

def expand(msg: NodeAcks | NodePromises | NodeDone) -> list[Message]:
    """The per-rank messages a node message stands for, exactly as the ranks sent them:
    ``NodeAcks`` -> PlanAck per rank; ``NodePromises`` -> Refuse per refused rank, then Promise per
    promised rank (refusals first: they end the epoch); ``NodeDone`` -> Done per rank.
    The leader checks each one's rank against the node that sent it, as it does a relayed frame.
    Raises TypeError for anything else (NodeCounts goes to :func:`node_counts_for_window`)."""
    if isinstance(msg, NodeAcks):
        return [PlanAck(rank=r, epoch=msg.epoch, step=s) for r, s in zip(msg.ranks, msg.steps)]
    if isinstance(msg, NodePromises):
        refused: list[Message] = [Refuse(rank=r, epoch=msg.epoch, step=s, reason=why, code=code)
                                  for r, s, why, code in msg.refused]
        return refused + [Promise(rank=r, epoch=msg.epoch) for r in msg.promised]
    if isinstance(msg, NodeDone):
        return [Done(rank=r, epoch=msg.epoch, ok=ok, error=error, bytes_received=nbytes,
                     copy_seconds=copy_s, hold_seconds=hold_s)
                for r, ok, error, nbytes, copy_s, hold_s in msg.results]
    raise TypeError(f"{type(msg).__name__} has no per-rank expansion")


def node_counts_for_window(msg: NodeCounts) -> tuple[Counts, dict[int, int]]:
    """A node's summed counts as the leader's window takes them: once, as one entry.

    Expanding a NodeCounts into per-rank COUNTS is impossible (the sum is one frame) and would be
    wrong if faked (each rank's share unknown). The window only uses a frame's ``from_step``,
    ``to_step`` and ``counts: [L, E]``, so the node's sum is one window entry covering the same
    steps; every rank's progress is reported apart.

    Returns:
        ``(entry, progress)``: ``entry`` a :class:`~eplb.proto.Counts` with the node's ``[L, E]``
        int64 sum over ``[from_step, to_step)`` (its ``rank`` is the node's lowest contributing
        rank, a label only); ``progress`` maps each contributing rank to the latest decode step
        the node reported for it (>= ``to_step``).
    """
    entry = Counts(rank=min(msg.ranks), from_step=msg.from_step, to_step=msg.to_step,
                   counts=msg.counts)
    return entry, dict(zip(msg.ranks, msg.steps))
