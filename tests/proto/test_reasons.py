"""Reason codes on the wire (protocol v3) and the refusal of the version before them."""

from __future__ import annotations

import msgpack
import pytest

from eplb.proto import (PROTOCOL_VERSION, Abort, InvalidField, Refuse, UnsupportedVersion, decode,
                        encode)
from eplb.proto.reasons import ABORT_LABELS, AbortCode, EpochOutcome, RefuseCode


def test_refuse_and_abort_carry_their_code_across_the_wire() -> None:
    for code in RefuseCode:
        msg = Refuse(rank=1, epoch=2, step=3, reason="why", code=code)
        assert decode(encode(msg)) == msg and decode(encode(msg)).code is code
    for code in AbortCode:
        msg = Abort(epoch=2, reason="why", code=code)
        assert decode(encode(msg)).code is code
    assert msgpack.unpackb(encode(Abort(epoch=2, reason="x", code=AbortCode.TIMEOUT)))["code"] \
        == "timeout"


def test_an_unknown_code_is_an_invalid_field() -> None:
    raw = msgpack.unpackb(encode(Refuse(rank=1, epoch=2, step=3, reason="r")))
    raw["code"] = "invalid plan"  # the v2 text prefix is no code
    with pytest.raises(InvalidField, match="REFUSE.code"):
        decode(msgpack.packb(raw))
    del raw["code"]
    with pytest.raises(InvalidField, match="lacks fields"):
        decode(msgpack.packb(raw))


def test_a_version_2_frame_is_refused_with_advice() -> None:
    """What a v2 worker or sidecar sends (a REFUSE without a code) is refused before its fields
    are read, with the existing advice to run one eplb version everywhere."""
    assert PROTOCOL_VERSION == 3
    v2 = {"v": 2, "type": "REFUSE", "rank": 1, "epoch": 2, "step": 3,
          "reason": "invalid plan: expert 3 missing"}
    with pytest.raises(UnsupportedVersion, match=r"protocol version 2 is not supported \(this "
                                                 r"build speaks 3\); run the same eplb version"):
        decode(msgpack.packb(v2))


def test_only_timing_refusals_are_retryable() -> None:
    assert {c for c in RefuseCode if c.retryable} == {RefuseCode.TOO_LATE, RefuseCode.NO_PLAN,
                                                      RefuseCode.BUSY}


def test_abort_metric_labels_are_few_and_keep_their_names() -> None:
    assert ABORT_LABELS == ("refused", "timeout", "worker_left", "node_lost", "shutdown", "other")
    assert AbortCode.NOT_ON_RECORD.metric_label == "other"


def test_outcomes_keep_the_strings_the_history_always_had() -> None:
    assert [o.value for o in EpochOutcome] == ["in_progress", "committed", "skipped", "aborted",
                                               "failed", "plan_error"]
    assert EpochOutcome.COMMITTED == "committed" and f"{EpochOutcome.FAILED}" == "failed"
