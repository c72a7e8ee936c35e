"""The per-node aggregate messages (NODE_COUNTS, NODE_ACKS, NODE_PROMISES, NODE_DONE): round
trips, the narrowest integer encoding of summed counts, size caps and typed errors."""

from __future__ import annotations

import msgpack
import pytest
import torch

from eplb.placement.rules import tensor_bytes
from eplb.proto.reasons import RefuseCode
from eplb.proto import (MAX_NODE_RANKS, InvalidField, MalformedFrame, NodeAcks, NodeCounts, NodeDone,
                        NodePromises, decode, encode)


def raw(msg) -> dict:
    return msgpack.unpackb(encode(msg), raw=False)


def pack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def node_counts(values: torch.Tensor, ranks=(0, 1)) -> NodeCounts:
    return NodeCounts(node=1, ranks=tuple(ranks), steps=tuple(64 for _ in ranks), from_step=0,
                      to_step=64, counts=values)


@pytest.mark.parametrize("top, dtype, width", [(0, "int16", 2), (32767, "int16", 2),
                                                (32768, "int32", 4), ((1 << 31) - 1, "int32", 4),
                                                (1 << 31, "int64", 8)])
def test_node_counts_travel_in_the_narrowest_integer_type_that_holds_them(top, dtype, width):
    counts = torch.zeros(58, 256, dtype=torch.int64)
    counts[3, 7] = top
    msg = node_counts(counts)
    wire = raw(msg)["counts"]
    assert wire["dtype"] == dtype and len(wire["data"]) == 58 * 256 * width
    back = decode(encode(msg))
    assert back.counts.dtype == torch.int64 and torch.equal(back.counts, counts)


def test_a_deepseek_v3_node_flush_is_an_eighth_of_its_workers_frames_or_less():
    """8 ranks x 64 steps x 64 tokens x top-8 over [58, 256]: the sum fits int32."""
    per_rank = torch.full((58, 256), 1024, dtype=torch.int64)
    from eplb.proto import Counts
    worker = len(encode(Counts(rank=0, from_step=0, to_step=64, counts=per_rank)))
    node = len(encode(node_counts(per_rank * 8, ranks=range(8))))
    assert node * 16 <= worker * 8 + 1024, (node, worker)


def test_node_counts_need_ranks_matching_steps_and_a_forward_range():
    good = raw(node_counts(torch.ones(2, 3, dtype=torch.int64)))
    for key, value, match in [("ranks", [], "empty"), ("steps", [64], "2 ranks but 1 steps"),
                              ("ranks", [3, 3], "twice"), ("ranks", [-1, 0], ">= 0"),
                              ("ranks", [0, 1 << 21], "<= "), ("to_step", -1, ">= 0"),
                              ("from_step", 65, "reversed"), ("steps", [1, True], "integer")]:
        d = dict(good, **{key: value})
        with pytest.raises(InvalidField, match=match):
            decode(pack(d))


def test_node_counts_reject_negative_float_and_misshaped_tensors():
    good = raw(node_counts(torch.ones(2, 3, dtype=torch.int64)))
    cases = [({"dtype": "int32", "shape": [2, 3], "data": tensor_bytes(torch.tensor([1, -1, 0, 0, 0, 0], dtype=torch.int32))}, "negative"),
             ({"dtype": "float32", "shape": [2, 3], "data": bytes(24)}, "dtype"),
             ({"dtype": "int32", "shape": [2, 3], "data": bytes(20)}, "needs 24 bytes"),
             ({"dtype": "int32", "shape": [6], "data": bytes(24)}, "2 dimensions"),
             ({"dtype": "int32", "shape": [1 << 21, 1], "data": bytes(4)}, "shape")]
    for tensor, match in cases:
        with pytest.raises(InvalidField, match=match):
            decode(pack(dict(good, counts=tensor)))


def test_rank_lists_longer_than_the_cap_are_refused_before_their_entries_are_read():
    too_many = list(range(MAX_NODE_RANKS + 1))
    d = raw(NodeAcks(node=1, epoch=2, ranks=(0,), steps=(5,)))
    d["ranks"], d["steps"] = too_many, too_many
    with pytest.raises(InvalidField, match=f"at most {MAX_NODE_RANKS}"):
        decode(pack(d))
    d = raw(NodeDone(node=1, epoch=2, results=((0, True, "", 0, 0.0, 0.0),)))
    d["results"] = [["not", "read"]] * (MAX_NODE_RANKS + 1)
    with pytest.raises(InvalidField, match=f"at most {MAX_NODE_RANKS}"):
        decode(pack(d))


def test_node_acks_checks():
    good = raw(NodeAcks(node=1, epoch=2, ranks=(0, 1), steps=(5, 6)))
    for key, value, match in [("ranks", [], "empty"), ("steps", [5], "2 ranks but 1"),
                              ("ranks", [1, 1], "twice"), ("epoch", -2, ">= 0"),
                              ("steps", [5, "6"], "integer")]:
        with pytest.raises(InvalidField, match=match):
            decode(pack(dict(good, **{key: value})))


def test_node_promises_checks():
    good = raw(NodePromises(node=1, epoch=2, promised=(0,), refused=((1, 9, "late", RefuseCode.TOO_LATE),)))
    for key, value, match in [("promised", [1], "both promised and refused"),
                              ("refused", [[2, 9, "a", "too_late"], [2, 9, "b", "too_late"]], "twice"),
                              ("refused", [[2, 9, "late"]], "list of 4 values"),
                              ("refused", [[2, -9, "late", "too_late"]], "step"),
                              ("refused", [[2, 9, 7, "too_late"]], "reason"),
                              ("refused", [[2, 9, "late", "bogus"]], "code"),
                              ("refused", "x", "list of at most")]:
        with pytest.raises(InvalidField, match=match):
            decode(pack(dict(good, **{key: value})))
    with pytest.raises(InvalidField, match="no answer"):
        decode(pack(dict(good, promised=[], refused=[])))


def test_node_done_checks():
    good = raw(NodeDone(node=1, epoch=2, results=((0, True, "", 10, 0.5, 0.0),)))
    for rows, match in [([], "empty"), ([[0, 1, "", 10, 0.5, 0.0]], "ok"),
                        ([[0, True, "", -1, 0.5, 0.0]], "bytes_received"),
                        ([[0, True, "", 10, float("nan"), 0.0]], "copy_seconds"),
                        ([[0, True, "", 10, 0.5, -1.0]], "hold_seconds"),
                        ([[0, True, "", 10, 0.5, 0.0]] * 2, "twice"),
                        ([[0, True, "", 10, 0.5]], "list of 6 values")]:
        with pytest.raises(InvalidField, match=match):
            decode(pack(dict(good, results=rows)))


def test_a_truncated_node_frame_is_malformed():
    frame = encode(node_counts(torch.ones(58, 256, dtype=torch.int64)))
    with pytest.raises(MalformedFrame):
        decode(frame[:-10])
