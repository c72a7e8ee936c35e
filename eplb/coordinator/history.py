"""The leader's history of rebalance attempts: one :class:`EpochRecord` per attempt (what
``eplbctl status`` lists and the metrics count), and how to say where an epoch stands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eplb.coordinator.agreement import EpochAgreement, Phase
from eplb.proto.reasons import AbortCode, EpochOutcome


@dataclass
class EpochRecord:
    """One line of history: what happened to a rebalance attempt. Steps are decode steps;
    ``*_ms`` milliseconds; ``bytes_received`` summed over the ranks' DONE reports."""

    epoch: int | None
    outcome: EpochOutcome
    reason: str = ""
    abort_code: AbortCode | None = None  # an aborted epoch's code (the metric's label)
    started_at_step: int = 0
    switch_step: int | None = None
    margin: int | None = None
    balancedness_before: float | None = None
    balancedness_predicted: float | None = None
    balancedness_observed: float | None = None
    experts_moved: int = 0
    plan_ms: float | None = None
    agreement_ms: float | None = None
    bytes_received: int = 0
    max_hold_ms: float = 0.0
    forced: bool = False
    request: int | None = None  # the plan request it came from (its retries share it)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe(record: EpochRecord | None) -> str:
    """One attempt in a few words, for the log."""
    if record is None:
        return "none yet"
    what = f"epoch {record.epoch} {record.outcome}" if record.epoch else str(record.outcome)
    if record.switch_step is not None and record.outcome is EpochOutcome.COMMITTED:
        what += f" at S={record.switch_step}"
    return what


def waiting_for(agreement: EpochAgreement) -> set[int]:
    """The ranks whose answer the epoch's current phase still waits for."""
    if agreement.phase is Phase.PLANNED:
        return set(agreement.ranks - set(agreement.acked_steps))
    if agreement.phase is Phase.PREPARING:
        return set(agreement.ranks - agreement.promised)
    if agreement.phase is Phase.COMMITTED:
        return set(agreement.ranks - set(agreement.done))
    return set()
