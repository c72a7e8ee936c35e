"""The wire protocol alone: every message round-trips; every bad frame raises a typed error."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.placement.rules import default_placement, placement_hash
from eplb.proto.reasons import RefuseCode
from eplb.proto import (MAX_FRAME_BYTES, MESSAGE_TYPES, PROTOCOL_VERSION, Abort, Bye, Commit, ControlReply,
                        ControlRequest, Counts, Done, FrameTooLarge, Heartbeat, Hello,
                        InvalidField, MalformedFrame, NodeAcks, NodeCounts, NodeDone, NodeHeartbeat,
                        NodeHello, NodePromises, Plan, PlanAck,
                        OutcomeQuery, Prepare, Promise, ProtocolError, Refuse, Rejoin, Relay, UnknownMessageType,
                        UnsupportedVersion, Welcome, WorkerLeft, decode, encode)

P2L = default_placement(3, 4, 8)

EXAMPLES = [
    Hello(rank=1, node=0, world_size=2, num_layers=3, num_experts=4, num_physical=8,
          bytes_per_expert=44_000_000, step=7, pid=123, phys2log=P2L, applied_epoch=4),
    Welcome(rank=1, ok=False, error="placement differs"),
    Welcome(rank=1, ok=False, error="rank 1 is held by a live connection", retry=True),
    Rejoin(rank=1, reason="the leader does not know rank 1"),
    OutcomeQuery(rank=1, epoch=5),
    Heartbeat(rank=3, step=1 << 40),
    Counts(rank=0, from_step=10, to_step=26, counts=torch.arange(12, dtype=torch.int64).reshape(3, 4)),
    PlanAck(rank=2, epoch=5, step=99), Promise(rank=2, epoch=5),
    Refuse(rank=2, epoch=5, step=120, reason="already at step 120 >= S=101"),
    Done(rank=1, epoch=5, ok=True, error="", bytes_received=1 << 33, copy_seconds=0.25,
         hold_seconds=0.0),
    Bye(rank=0), Plan(epoch=5, phys2log=P2L, plan_hash=placement_hash(P2L), layers_per_chunk=2),
    Prepare(epoch=5, step=101), Commit(epoch=5, step=101), Abort(epoch=5, reason="timeout"),
    NodeHello(node=1, pid=9, incarnation="abc"), NodeHeartbeat(node=1, ranks=(2, 3)),
    WorkerLeft(node=1, rank=3, reason="no heartbeat"), Relay(node=0, ranks=(-1, 3)),
    ControlRequest(request_id="r1", op="rebalance", args={"force": True}),
    ControlReply(request_id="r1", ok=True, result={"message": "ok"}, error=""),
    NodeCounts(node=1, ranks=(8, 9), steps=(26, 30), from_step=10, to_step=26,
               counts=torch.arange(12, dtype=torch.int64).reshape(3, 4) * 5000),
    NodeAcks(node=1, epoch=5, ranks=(8, 9), steps=(99, 100)),
    NodePromises(node=1, epoch=5, promised=(8,), refused=((9, 120, "already at step 120 >= S=101", RefuseCode.TOO_LATE),)),
    NodeDone(node=1, epoch=5, results=((8, True, "", 1 << 33, 0.25, 0.0), (9, False, "nccl", 0, 1.5, 0.1))),
]


COUNTS_EXAMPLE = next(m for m in EXAMPLES if isinstance(m, Counts))
HELLO_EXAMPLE = next(m for m in EXAMPLES if isinstance(m, Hello))


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip_keeps_every_field(msg) -> None:
    back = decode(encode(msg))
    assert type(back) is type(msg)
    for name in msg.__dataclass_fields__:
        assert same(getattr(msg, name), getattr(back, name)), name


def raw(msg) -> dict:
    return msgpack.unpackb(encode(msg), raw=False)


def pack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"garbage bytes", pack([1, 2, 3]), pack("x"),
                                   encode(Bye(rank=0))[:-1], encode(Bye(rank=0)) + b"\x00"])
def test_garbage_is_a_malformed_frame(frame: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode(frame)


def test_wrong_or_missing_version_is_refused_with_advice() -> None:
    for version in (0, 1, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION), None):
        d = raw(Bye(rank=0))
        d["v"] = version
        with pytest.raises(UnsupportedVersion, match="same eplb version"):
            decode(pack(d))


def test_unknown_type_is_refused() -> None:
    with pytest.raises(UnknownMessageType):
        decode(pack({"v": PROTOCOL_VERSION, "type": "SHUTDOWN"}))


def test_oversized_frame_is_refused_unread() -> None:
    with pytest.raises(FrameTooLarge):
        decode(b"\x00" * (MAX_FRAME_BYTES + 1))
    huge = torch.zeros(MAX_FRAME_BYTES // 8 + 1, 1, dtype=torch.int64)
    with pytest.raises(FrameTooLarge):
        encode(Counts(rank=0, from_step=0, to_step=1, counts=huge))


@pytest.mark.parametrize("field, value", [
    ("rank", -1), ("rank", "0"), ("rank", True), ("rank", 1.0), ("from_step", -5),
])
def test_bad_scalar_fields_are_invalid(field: str, value) -> None:
    d = raw(COUNTS_EXAMPLE)
    d[field] = value
    with pytest.raises(InvalidField, match=field):
        decode(pack(d))


def test_missing_and_extra_fields_are_invalid() -> None:
    d = raw(Heartbeat(rank=0, step=1))
    del d["step"]
    with pytest.raises(InvalidField, match="lacks"):
        decode(pack(d))
    d = raw(Heartbeat(rank=0, step=1))
    d["admin"] = True
    with pytest.raises(InvalidField, match="unknown fields"):
        decode(pack(d))


def counts_frame(values: list[float], dtype: str, shape: list[int]) -> bytes:
    t = torch.tensor(values, dtype=getattr(torch, dtype))
    from eplb.placement.rules import tensor_bytes

    d = raw(COUNTS_EXAMPLE)
    d["counts"] = {"dtype": dtype, "shape": shape, "data": tensor_bytes(t)}
    return pack(d)


def test_negative_nan_inf_and_fractional_counts_are_invalid() -> None:
    with pytest.raises(InvalidField, match="negative"):
        decode(counts_frame([1, -1, 0, 0], "int64", [2, 2]))
    with pytest.raises(InvalidField, match="NaN"):
        decode(counts_frame([1, math.nan, 0, 0], "float32", [2, 2]))
    with pytest.raises(InvalidField, match="NaN or infinite"):
        decode(counts_frame([1, math.inf, 0, 0], "float64", [2, 2]))
    with pytest.raises(InvalidField, match="fractional"):
        decode(counts_frame([1, 0.5, 0, 0], "float32", [2, 2]))
    ok = decode(counts_frame([1, 2, 0, 3], "float32", [2, 2]))
    assert ok.counts.dtype == torch.int64 and ok.counts.tolist() == [[1, 2], [0, 3]]


def test_tensor_shape_and_byte_count_must_agree() -> None:
    with pytest.raises(InvalidField, match="needs 32 bytes"):
        decode(counts_frame([1, 2, 3], "int64", [2, 2]))
    with pytest.raises(InvalidField, match="2 dimensions"):
        decode(counts_frame([1, 2, 3, 4], "int64", [4]))
    with pytest.raises(InvalidField, match="dtype"):
        decode(counts_frame([1, 2, 3, 4], "int16", [2, 2]))


def test_hello_placement_must_match_its_declared_shape() -> None:
    d = raw(HELLO_EXAMPLE)
    d["num_physical"] = 6
    with pytest.raises(InvalidField, match="expected \\[3, 6\\]"):
        decode(pack(d))


def test_unknown_control_op_is_invalid() -> None:
    with pytest.raises(InvalidField, match="unknown control op"):
        decode(encode(ControlRequest(request_id="x", op="shutdown")))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_mutated_valid_frames_decode_or_raise_protocol_errors(msg, data) -> None:
    """Take a valid frame, replace one field with an arbitrary value: decode either accepts a
    well-typed value or raises a ProtocolError, never anything else."""
    d = raw(msg)
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_values)
    try:
        decode(pack(d))
    except ProtocolError:
        pass
