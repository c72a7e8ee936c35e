"""The multipart layouts of every socket, in one place: how frames are wrapped, addressed and
capped. :mod:`eplb.proto.messages` knows single frames; this module knows the parts around them.

==============================  ===========================================================
socket                          parts of one ZeroMQ message
==============================  ===========================================================
workers (sidecar ROUTER,        ``[identity, frame]``; ``identity`` names the worker's rank:
worker DEALER, ipc)             ``b"<rank>"`` or ``b"<rank>.<pid>..."`` (:func:`rank_of_identity`);
                                the frame's ``rank`` must equal it (:func:`open_worker`)
peers (leader ROUTER,           ``[identity, header, frames...]`` as the leader reads it; the
follower DEALER, TCP)           follower's identity is ``node-<K>-<incarnation>``
                                (:func:`node_identity`). ``header`` is NODE_HELLO,
                                NODE_HEARTBEAT, WORKER_LEFT, CONTROL or CONTROL_REPLY alone, or
                                RELAY followed by one worker frame per entry of its ``ranks``
                                (:func:`relay`, :func:`open_peer`). Towards the leader each
                                relayed frame's ``rank`` equals its entry (:func:`open_relayed`);
                                towards a follower an entry of :data:`BROADCAST` means every
                                worker of that node.
control (sidecar ROUTER,        ``[identity, frame]``, one CONTROL each way (:func:`open_control`)
eplbctl DEALER, ipc)
==============================  ===========================================================

Caps, checked before anything is decoded: one part at most :data:`WORKER_MAXMSGSIZE` (workers)
or :data:`PEER_MAXMSGSIZE` (peers) bytes (ZeroMQ's ``MAXMSGSIZE`` drops bigger ones unread), one
peer message at most :data:`MAX_PEER_PARTS` parts and :data:`MAX_PEER_BYTES` bytes
(:func:`check_peer_envelope`), a control part :data:`CONTROL_MAXMSGSIZE`. Nothing here touches a
socket; every check raises a :class:`~eplb.proto.messages.ProtocolError` subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eplb.proto.messages import (MAX_FRAME_BYTES, MAX_RELAY_RANKS, ControlRequest, FrameTooLarge,
                                 IdentityMismatch, InvalidField, MalformedFrame, Message, Relay,
                                 decode, encode)

#: A relay entry addressed to every worker of the receiving sidecar.
BROADCAST = -1
#: Largest part a worker socket takes (one frame, with room for ZeroMQ's own framing).
WORKER_MAXMSGSIZE = MAX_FRAME_BYTES + 4096
#: Largest part a control socket takes.
CONTROL_MAXMSGSIZE = 1024 * 1024
#: Largest single part on the peer link (a RELAY envelope carries whole worker frames).
PEER_MAXMSGSIZE = MAX_FRAME_BYTES + 4096
#: Most parts in one peer message: ROUTER identity, RELAY header, one frame per relayed rank.
MAX_PEER_PARTS = 2 + MAX_RELAY_RANKS
#: Most bytes in one peer message, all parts together.
MAX_PEER_BYTES = 4 * MAX_FRAME_BYTES


# --- workers ------------------------------------------------------------------------------------

def rank_of_identity(identity: bytes) -> int | None:
    """The rank a worker's routing identity names: ``b"<rank>"`` or ``b"<rank>.<anything>"``."""
    head = identity.split(b".", 1)[0]
    return int(head) if head.isdigit() and len(head) <= 9 else None


def open_worker(parts: Sequence[bytes]) -> tuple[bytes, int, Message]:
    """``[identity, frame]`` from a worker -> ``(identity, rank, message)``.

    Raises:
        MalformedFrame: not two parts. IdentityMismatch: the identity does not name the
        message's rank. Any decode error of the frame.
    """
    if len(parts) != 2:
        raise MalformedFrame(f"expected 2 parts, got {len(parts)}")
    identity, frame = parts
    msg = decode(frame)
    rank = rank_of_identity(identity)
    if rank is None or getattr(msg, "rank", None) != rank:
        raise IdentityMismatch(f"socket identity {identity[:24]!r} does not match the "
                               f"message's rank {getattr(msg, 'rank', None)}")
    return identity, rank, msg


# --- peers --------------------------------------------------------------------------------------

def node_identity(node: int, incarnation: str) -> bytes:
    """A follower sidecar's routing identity: new with every start of the process."""
    return f"node-{node}-{incarnation}".encode()


def relay(node: int, ranks: Sequence[int], frames: Sequence[bytes]) -> list[bytes]:
    """``[RELAY header, frames...]``: ``frames[i]`` is for (or from) ``ranks[i]``."""
    if len(ranks) != len(frames) or not ranks:
        raise ValueError(f"a relay needs one frame per rank: {len(ranks)} ranks, "
                         f"{len(frames)} frames")
    return [encode(Relay(node=node, ranks=tuple(ranks))), *frames]


def check_peer_envelope(parts: Sequence[Any]) -> None:
    """Refuse a peer message (as a ROUTER reads it, identity included) with too many parts or
    too many bytes, before decoding any of it.

    Raises:
        MalformedFrame: more than :data:`MAX_PEER_PARTS` parts.
        FrameTooLarge: more than :data:`MAX_PEER_BYTES` in all.
    """
    if len(parts) > MAX_PEER_PARTS:
        raise MalformedFrame(f"{len(parts)} parts in one message (cap {MAX_PEER_PARTS})")
    total = sum(len(p) for p in parts)
    if total > MAX_PEER_BYTES:
        raise FrameTooLarge(f"{total} bytes in one message (cap {MAX_PEER_BYTES})")


def open_peer(parts: Sequence[bytes]) -> tuple[Message, list[tuple[int, bytes]]]:
    """``[header, frames...]`` (without the ROUTER identity) -> ``(header, [(rank, frame)])``.
    Only a RELAY carries frames, exactly one per rank it names; the frames are not decoded yet
    (:func:`open_relayed` does, one at a time, so one bad frame spoils only itself).

    Raises:
        MalformedFrame: no parts, frames after a header other than RELAY, or a RELAY whose ranks
        and frames differ in number. Any decode error of the header.
    """
    if not parts:
        raise MalformedFrame("empty message")
    header, rest = decode(parts[0]), list(parts[1:])
    if isinstance(header, Relay):
        if len(rest) != len(header.ranks):
            raise MalformedFrame(f"RELAY names {len(header.ranks)} ranks but carries "
                                 f"{len(rest)} frames")
        return header, list(zip(header.ranks, rest))
    if rest:
        raise MalformedFrame(f"{header.TYPE} with {len(rest)} more part(s); only RELAY has any")
    return header, []


def open_relayed(rank: int, frame: bytes) -> Message:
    """A worker frame relayed towards the leader, as the envelope's entry ``rank`` carried it.

    Raises:
        IdentityMismatch: the frame's rank is not the envelope's. Any decode error.
    """
    msg = decode(frame)
    if getattr(msg, "rank", None) != rank:
        raise IdentityMismatch(f"relayed frame of rank {getattr(msg, 'rank', None)} in an "
                               f"envelope for rank {rank}")
    return msg


# --- control ------------------------------------------------------------------------------------

def open_control(frames: Sequence[bytes]) -> ControlRequest:
    """The frames after a control client's identity -> its request.

    Raises:
        MalformedFrame: not one frame. InvalidField: not a CONTROL request. Any decode error.
    """
    if len(frames) != 1:
        raise MalformedFrame(f"expected 1 frame, got {len(frames)}")
    msg = decode(frames[0])
    if not isinstance(msg, ControlRequest):
        raise InvalidField(f"expected CONTROL, got {msg.TYPE}")
    return msg
