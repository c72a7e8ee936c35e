"""The leader's side of one epoch's two-phase step agreement (DESIGN.md §4), with no I/O.

An :class:`EpochAgreement` is fed events — a worker message, a worker leaving, a clock tick —
and returns the messages to broadcast to every worker. Time is a number passed in (seconds on any
monotonic clock), so tests can drive it with plain values.

Phases, and the only transitions there are::

    PLANNED ──all PLAN_ACK──▶ PREPARING ──all PROMISE──▶ COMMITTED ──all DONE ok──▶ SUCCEEDED
       │                         │                           │
       └─refuse/timeout/left─────┴──▶ ABORTED                └─error/timeout──▶ FAILED

ABORTED is reachable only before COMMIT is sent, so no worker can start copies in an aborted
epoch (invariant I1). A COMMITTED epoch never aborts: a failure after it is FAILED, which the
leader reports loudly, because the instance may hold mismatched maps (DESIGN.md §4.7). FAILED
needs evidence (a DONE with an error) or the DONE deadline; a worker leaving after COMMIT is not
evidence, and DONEs ok from every rank after the deadline turn a FAILED epoch into SUCCEEDED
(:meth:`EpochAgreement.on_late_done`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from eplb.proto import Abort, Commit, Done, Message, Plan, PlanAck, Prepare, Promise, Refuse
from eplb.proto.reasons import AbortCode


class Phase(enum.Enum):
    PLANNED = "planned"
    PREPARING = "preparing"
    COMMITTED = "committed"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    FAILED = "failed"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.ABORTED, Phase.FAILED})


@dataclass(frozen=True)
class AgreementTimeouts:
    """Seconds each phase may wait for every worker before it ends (invariant I2)."""

    ack_s: float = 5.0
    promise_s: float = 5.0
    done_s: float = 120.0


@dataclass
class EpochAgreement:
    """One epoch, leader side.

    Args:
        plan: the PLAN to broadcast (its ``epoch`` is this agreement's epoch).
        ranks: every worker that must take part (the whole EP group).
        margin: minimum steps between the highest reported step and S; never below 2.
        steps_per_second: the workers' measured decode rate, used to stretch the margin so that
            PREPARE and COMMIT arrive before a worker reaches S.
        now: the clock at creation.
    """

    plan: Plan
    ranks: frozenset[int]
    margin: int
    steps_per_second: float
    now: float
    timeouts: AgreementTimeouts = field(default_factory=AgreementTimeouts)

    phase: Phase = field(init=False, default=Phase.PLANNED)
    switch_step: int | None = field(init=False, default=None)
    reason: str = field(init=False, default="")
    retryable: bool = field(init=False, default=False)
    abort_code: AbortCode | None = field(init=False, default=None)
    acked_steps: dict[int, int] = field(init=False, default_factory=dict)
    promised: set[int] = field(init=False, default_factory=set)
    done: dict[int, Done] = field(init=False, default_factory=dict)
    plan_sent_at: float = field(init=False)
    prepare_sent_at: float | None = field(init=False, default=None)
    commit_sent_at: float | None = field(init=False, default=None)
    ended_at: float | None = field(init=False, default=None)
    deadline: float = field(init=False)
    effective_margin: int = field(init=False, default=0)
    failed_on_timeout: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ValueError("an epoch needs at least one worker")
        self.margin = max(2, int(self.margin))
        self.plan_sent_at = self.now
        self.deadline = self.now + self.timeouts.ack_s

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    @property
    def agreement_seconds(self) -> float | None:
        """PREPARE sent → COMMIT sent."""
        if self.prepare_sent_at is None or self.commit_sent_at is None:
            return None
        return self.commit_sent_at - self.prepare_sent_at

    def start(self) -> list[Message]:
        """The first messages: the PLAN itself."""
        return [self.plan]

    # --- events ---------------------------------------------------------------------------------

    def on_message(self, msg: Message, now: float) -> list[Message]:
        """Feed one worker message; returns what to broadcast. Messages of other epochs, from
        ranks outside the group, or arriving in the wrong phase are ignored (they change nothing)."""
        if getattr(msg, "epoch", None) != self.epoch or getattr(msg, "rank", None) not in self.ranks:
            return []
        if isinstance(msg, PlanAck) and self.phase is Phase.PLANNED:
            self.acked_steps[msg.rank] = msg.step
            if len(self.acked_steps) == len(self.ranks):
                return self._prepare(now)
        elif isinstance(msg, Promise) and self.phase is Phase.PREPARING:
            self.promised.add(msg.rank)
            if len(self.promised) == len(self.ranks):
                return self._commit(now)
        elif isinstance(msg, Refuse) and self.phase in (Phase.PLANNED, Phase.PREPARING):
            where = f"S={self.switch_step}" if self.switch_step is not None else "before PREPARE"
            return self._abort(now, f"rank {msg.rank} refused at step {msg.step} ({where}): "
                                    f"{msg.reason}",
                               AbortCode.REFUSED, retryable=msg.code.retryable)
        elif isinstance(msg, Done) and self.phase is Phase.COMMITTED:
            self.done[msg.rank] = msg
            if not msg.ok:
                self._fail(now, f"rank {msg.rank} failed its copies: {msg.error}")
            elif len(self.done) == len(self.ranks):
                self.phase = Phase.SUCCEEDED
                self.ended_at = now
        return []

    def on_acks(self, epoch: int, steps: Mapping[int, int], now: float) -> list[Message]:
        """PLAN_ACKs of several ranks at once (a node's NODE_ACKS), ``steps``: rank -> the step
        it acked at. Decides exactly as one PLAN_ACK per rank fed to :meth:`on_message` would
        (ranks are distinct), in one call: what a node answers for costs the leader O(node)."""
        if epoch != self.epoch or self.phase is not Phase.PLANNED:
            return []
        for rank, step in steps.items():
            if rank in self.ranks:
                self.acked_steps[rank] = step
        if len(self.acked_steps) == len(self.ranks):
            return self._prepare(now)
        return []

    def on_promises(self, epoch: int, ranks: Iterable[int], now: float) -> list[Message]:
        """PROMISEs of several ranks at once (a node's NODE_PROMISES without refusals): exactly
        as one PROMISE per rank fed to :meth:`on_message`, in one call. COMMIT only once every
        rank of the group promised (I1)."""
        if epoch != self.epoch or self.phase is not Phase.PREPARING:
            return []
        self.promised.update(rank for rank in ranks if rank in self.ranks)
        if len(self.promised) == len(self.ranks):
            return self._commit(now)
        return []

    def on_worker_left(self, rank: int, why: str, now: float,
                       code: AbortCode = AbortCode.WORKER_LEFT) -> list[Message]:
        """A worker of the group is gone (process died, sidecar lost). Before COMMIT the epoch
        aborts. After COMMIT silence is not evidence: the rank may be paused, or its sidecar
        restarting with its DONE queued; the epoch waits for it until the DONE deadline."""
        if rank not in self.ranks or self.finished or self.phase is Phase.COMMITTED:
            return []
        return self._abort(now, f"rank {rank} left: {why}", code, retryable=False)

    @classmethod
    def resume_committed(cls, plan: Plan, ranks: frozenset[int], switch_step: int, now: float,
                         timeouts: AgreementTimeouts) -> "EpochAgreement":
        """A committed epoch taken over by a restarted leader (from its decision log): waiting
        for every DONE, with a fresh DONE deadline."""
        agreement = cls(plan, ranks, 2, 0.0, now, timeouts)
        agreement.phase = Phase.COMMITTED
        agreement.switch_step = switch_step
        agreement.commit_sent_at = now
        agreement.deadline = now + timeouts.done_s
        return agreement

    def on_late_done(self, msg: Done, now: float) -> bool:
        """A DONE for this epoch after it FAILED on the DONE deadline (silence, not evidence).
        Returns True when every rank has now reported DONE ok: the failure is cleared and the
        epoch SUCCEEDED after all."""
        if (self.phase is not Phase.FAILED or msg.epoch != self.epoch or msg.rank not in self.ranks
                or not self.failed_on_timeout):
            return False
        self.done[msg.rank] = msg
        if not msg.ok:
            self.failed_on_timeout = False
            self.reason = f"rank {msg.rank} failed its copies: {msg.error}"
            return False
        if len(self.done) == len(self.ranks) and all(d.ok for d in self.done.values()):
            self.phase = Phase.SUCCEEDED
            self.reason = ""
            self.ended_at = now
            return True
        return False

    def on_tick(self, now: float) -> list[Message]:
        """Advance the clock; a phase past its deadline ends (invariant I2)."""
        if self.finished or now < self.deadline:
            return []
        if self.phase is Phase.PLANNED:
            missing = sorted(self.ranks - set(self.acked_steps))
            return self._abort(now, f"timeout: no PLAN_ACK from ranks {missing} within "
                                    f"{self.timeouts.ack_s:g}s", AbortCode.TIMEOUT, retryable=True)
        if self.phase is Phase.PREPARING:
            missing = sorted(self.ranks - self.promised)
            return self._abort(now, f"timeout: no PROMISE from ranks {missing} within "
                                    f"{self.timeouts.promise_s:g}s", AbortCode.TIMEOUT,
                               retryable=True)
        missing = sorted(self.ranks - set(self.done))
        self._fail(now, f"timeout: no DONE from ranks {missing} within {self.timeouts.done_s:g}s "
                        "after COMMIT")
        self.failed_on_timeout = True
        return []

    # --- transitions ----------------------------------------------------------------------------

    def _prepare(self, now: float) -> list[Message]:
        # Between a worker's PLAN_ACK and its COMMIT lie about two round trips (ack in, PREPARE
        # out, PROMISE in, COMMIT out); cover them at the measured step rate, with 50 % to spare.
        round_trip = max(0.0, now - self.plan_sent_at)
        steps_in_flight = math.ceil(3.0 * round_trip * max(0.0, self.steps_per_second))
        self.effective_margin = max(self.margin, steps_in_flight + 1)
        self.switch_step = max(self.acked_steps.values()) + self.effective_margin
        self.phase = Phase.PREPARING
        self.prepare_sent_at = now
        self.deadline = now + self.timeouts.promise_s
        return [Prepare(epoch=self.epoch, step=self.switch_step)]

    def _commit(self, now: float) -> list[Message]:
        assert self.switch_step is not None
        self.phase = Phase.COMMITTED
        self.commit_sent_at = now
        # DONE can only come after the workers reach S: add the time that takes at the measured
        # rate, so a large margin does not eat into done_s.
        to_switch = (self.effective_margin / self.steps_per_second
                     if self.steps_per_second > 0 else 0.0)
        self.deadline = now + to_switch + self.timeouts.done_s
        return [Commit(epoch=self.epoch, step=self.switch_step)]

    def _abort(self, now: float, reason: str, code: AbortCode, retryable: bool) -> list[Message]:
        assert self.phase in (Phase.PLANNED, Phase.PREPARING), "a committed epoch never aborts"
        self.phase = Phase.ABORTED
        self.reason = reason
        self.abort_code = code
        self.retryable = retryable
        self.ended_at = now
        return [Abort(epoch=self.epoch, reason=reason, code=code)]

    def _fail(self, now: float, reason: str) -> None:
        self.phase = Phase.FAILED
        self.reason = reason
        self.ended_at = now
