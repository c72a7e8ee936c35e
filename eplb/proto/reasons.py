"""Reasons that code acts on, as enums: the code travels on the wire next to the human text.

- :class:`RefuseCode`: why a worker answered a PLAN or PREPARE with REFUSE. Its
  :attr:`~RefuseCode.retryable` says whether the leader may try the epoch again with a larger
  margin (a refusal for timing) or not (the plan is invalid, the rank cannot copy).
- :class:`AbortCode`: why the leader aborted an epoch; :attr:`~AbortCode.metric_label` is the
  ``reason`` label of ``eplb_epochs_aborted_total``.
- :class:`EpochOutcome`: what became of one rebalance attempt (the leader's history). Its values
  are the strings the history and the decision log always used, so records on disk still load.

The enums are string enums: a value compares equal to its string, prints as it, and JSON writes it
as one (:class:`_Code`, as ``enum.StrEnum`` does from Python 3.11 on; we support 3.10).
"""

from __future__ import annotations

import enum


class _Code(str, enum.Enum):
    """A string enum that prints as its value (``enum.StrEnum`` is Python 3.11+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class RefuseCode(_Code):
    """Why a worker refused an epoch."""

    TOO_LATE = "too_late"          # already at or after S: a larger margin may succeed
    NO_PLAN = "no_plan"            # a PREPARE for an epoch it holds no plan of (lost PLAN)
    BUSY = "busy"                  # still promised to, or copying, another epoch
    INVALID_PLAN = "invalid_plan"  # the plan breaks the placement rules: retrying cannot help
    CANNOT_COPY = "cannot_copy"    # the rank has no copy engine: the configuration must change

    @property
    def retryable(self) -> bool:
        """Whether a new epoch of the same plan (with a larger margin) may succeed."""
        return self not in (RefuseCode.INVALID_PLAN, RefuseCode.CANNOT_COPY)


class AbortCode(_Code):
    """Why the leader aborted an epoch (before COMMIT; a committed epoch never aborts)."""

    REFUSED = "refused"            # a worker sent REFUSE
    TIMEOUT = "timeout"            # a PLAN_ACK or PROMISE did not come in time
    WORKER_LEFT = "worker_left"    # a worker of the epoch left (BYE, silence, process gone)
    NODE_LOST = "node_lost"        # a follower sidecar, and with it its workers, was lost
    SHUTDOWN = "shutdown"          # the leader is stopping
    LEADER_RESTARTED = "leader_restarted"  # the leader restarted before deciding the epoch
    NOT_ON_RECORD = "not_on_record"        # a worker asked about an epoch the leader never decided
    OTHER = "other"

    @property
    def metric_label(self) -> str:
        """The label of ``eplb_epochs_aborted_total`` (few values: see ``ABORT_REASONS``)."""
        if self in (AbortCode.LEADER_RESTARTED, AbortCode.NOT_ON_RECORD):
            return AbortCode.OTHER.value
        return self.value


class EpochOutcome(_Code):
    """What became of one rebalance attempt."""

    IN_PROGRESS = "in_progress"
    COMMITTED = "committed"
    SKIPPED = "skipped"
    ABORTED = "aborted"
    FAILED = "failed"
    PLAN_ERROR = "plan_error"


#: The ``reason`` labels of ``eplb_epochs_aborted_total``.
ABORT_LABELS = tuple(dict.fromkeys(code.metric_label for code in AbortCode))
