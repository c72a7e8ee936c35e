"""The multipart layouts: worker frames named by rank, relays, control, peer caps."""

from __future__ import annotations

import pytest

from eplb.proto import (MAX_FRAME_BYTES, ControlRequest, FrameTooLarge, Heartbeat, IdentityMismatch,
                        InvalidField, MalformedFrame, NodeHello, Relay, decode, encode)
from eplb.proto.envelope import (MAX_PEER_BYTES, MAX_PEER_PARTS, PEER_MAXMSGSIZE,
                                 WORKER_MAXMSGSIZE, check_peer_envelope, node_identity,
                                 open_control, open_peer, open_relayed, open_worker,
                                 rank_of_identity, relay)


def test_a_worker_identity_names_its_rank() -> None:
    beat = encode(Heartbeat(rank=12, step=1))
    for identity in (b"12", b"12.345.abcdef"):
        assert open_worker([identity, beat])[:2] == (identity, 12)
    for identity in (b"13", b"1x", b".12", b""):
        with pytest.raises(IdentityMismatch):
            open_worker([identity, beat])
    with pytest.raises(MalformedFrame):
        open_worker([b"12", beat, beat])
    assert rank_of_identity(b"1234567890") is None  # more than 9 digits is no rank


def test_a_relay_is_built_and_opened_with_one_frame_per_rank() -> None:
    beats = [encode(Heartbeat(rank=r, step=1)) for r in (2, 5)]
    parts = relay(1, [2, 5], beats)
    header, frames = open_peer(parts)
    assert header == Relay(node=1, ranks=(2, 5)) and frames == [(2, beats[0]), (5, beats[1])]
    with pytest.raises(ValueError):
        relay(1, [2], beats)
    with pytest.raises(MalformedFrame, match="names 2 ranks but carries 1"):
        open_peer(parts[:2])
    with pytest.raises(MalformedFrame, match="empty"):
        open_peer([])
    assert open_peer([encode(NodeHello(node=1, pid=2, incarnation="x"))])[1] == []


def test_a_relayed_frame_must_be_of_its_envelope_s_rank() -> None:
    beat = encode(Heartbeat(rank=2, step=1))
    assert decode(beat) == open_relayed(2, beat)
    with pytest.raises(IdentityMismatch, match="envelope for rank 5"):
        open_relayed(5, beat)


def test_control_takes_exactly_one_control_request() -> None:
    req = ControlRequest(request_id="r", op="status")
    assert open_control([encode(req)]) == req
    with pytest.raises(MalformedFrame):
        open_control([encode(req), b"x"])
    with pytest.raises(InvalidField, match="expected CONTROL"):
        open_control([encode(Heartbeat(rank=1, step=1))])


def test_peer_caps_hold_before_decoding() -> None:
    assert PEER_MAXMSGSIZE == WORKER_MAXMSGSIZE == MAX_FRAME_BYTES + 4096
    check_peer_envelope([b"x"] * MAX_PEER_PARTS)
    with pytest.raises(MalformedFrame):
        check_peer_envelope([b"x"] * (MAX_PEER_PARTS + 1))
    with pytest.raises(FrameTooLarge):
        check_peer_envelope([b"x" * (MAX_PEER_BYTES // 2)] * 2 + [b"y"])
    assert node_identity(3, "abc") == b"node-3-abc"
