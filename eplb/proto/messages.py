"""Every message of the rebalance protocol, its encoding and its validation.

A frame is one msgpack map with at least ``v`` (the protocol version, :data:`PROTOCOL_VERSION`)
and ``type`` (a key of :data:`MESSAGE_TYPES`). Tensors travel as maps
``{"dtype": str, "shape": [int, ...], "data": bytes}`` holding raw little-endian bytes.

:func:`decode` turns bytes into one of the frozen dataclasses below, or raises a subclass of
:class:`ProtocolError`; it never returns a half-checked message, so a bad frame changes no state
(invariant I4). :func:`encode` is its inverse. Nothing here touches a socket.

Who sends what (DESIGN.md §4):

=================  ====================  ===========================================
message            direction             meaning
=================  ====================  ===========================================
Hello              worker → sidecar      join: shape of the model, current placement
Welcome            leader → worker       the join was accepted, or why not
Rejoin             sidecar → worker      "I do not know you" (a sidecar restarted): say HELLO again
OutcomeQuery       worker → leader       "what became of epoch e?" (asked while promised, until known)
Heartbeat          worker → sidecar      alive, at decode step ``step``
Counts             worker → leader       expert selections over steps [from, to)
PlanAck            worker → leader       copy list ready; worker is at ``step``
Promise            worker → leader       will not run step S before the outcome of e
Refuse             worker → leader       already at/after S (or the plan was bad)
Done               worker → leader       copies of epoch e finished (ok or error)
Bye                worker → sidecar      leaving cleanly
Plan               leader → workers      the new placement of epoch e
Prepare            leader → workers      switch at step S, promise or refuse
Commit             leader → workers      every worker promised: copy at S
Abort              leader → workers      epoch e is off, for ``reason``
NodeHello          sidecar → leader      a sidecar joins with its local ranks
NodeHeartbeat      sidecar ↔ leader      alive; live local ranks
WorkerLeft         sidecar → leader      a local worker left or went silent
Relay              sidecar ↔ leader      envelope: worker frames follow, one per rank
ControlRequest     eplbctl → sidecar     status / rebalance
ControlReply       sidecar → eplbctl     the answer
=================  ====================  ===========================================
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import torch

from eplb.placement.rules import tensor_bytes
from eplb.proto.reasons import AbortCode, RefuseCode

__all__ = [
    "PROTOCOL_VERSION", "MAX_FRAME_BYTES", "MAX_RELAY_RANKS", "ProtocolError", "FrameTooLarge",
    "MalformedFrame", "UnsupportedVersion", "UnknownMessageType", "InvalidField", "IdentityMismatch",
    "Unauthenticated", "StaleIncarnation", "Message", "MESSAGE_TYPES",
    "Hello", "Welcome", "Rejoin", "OutcomeQuery", "Heartbeat", "Counts", "PlanAck", "Promise", "Refuse", "Done", "Bye", "Plan",
    "Prepare", "Commit", "Abort", "NodeHello", "NodeHeartbeat", "WorkerLeft", "Relay",
    "ControlRequest", "ControlReply", "encode", "decode", "CONTROL_OPS",
]

#: 3: REFUSE and ABORT carry a ``code`` (:mod:`eplb.proto.reasons`) next to their text.
PROTOCOL_VERSION = 3
#: Frames above this size are rejected unread. A DeepSeek-V3 placement (58 x 288 int64) is 134 kB
#: and its counts (58 x 256 int64) 119 kB, so 16 MiB leaves room for far larger models.
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: Most worker frames one RELAY envelope carries.
MAX_RELAY_RANKS = 4096

_DTYPES: dict[str, torch.dtype] = {
    "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "float32": torch.float32, "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_DIM = 1 << 20


class ProtocolError(ValueError):
    """A frame that must be dropped. ``reason`` is a short label for metrics."""

    reason = "protocol"


class FrameTooLarge(ProtocolError):
    reason = "too_large"


class MalformedFrame(ProtocolError):
    reason = "malformed"


class UnsupportedVersion(ProtocolError):
    reason = "version"


class UnknownMessageType(ProtocolError):
    reason = "unknown_type"


class InvalidField(ProtocolError):
    reason = "invalid_field"


class IdentityMismatch(ProtocolError):
    """A frame claims a rank or node that its socket identity or envelope does not carry."""

    reason = "identity_mismatch"


class Unauthenticated(ProtocolError):
    """A peer failed CURVE authentication, or sent what only an authenticated peer may send."""

    reason = "unauthenticated"


class StaleIncarnation(ProtocolError):
    """A frame from a follower sidecar's previous incarnation, read after its restart (the
    leader's socket still held it): it speaks for ranks the new incarnation now holds."""

    reason = "stale_incarnation"


#: Each message class's field names (``dataclasses.fields`` is slow to call per frame).
_FIELD_NAMES: dict[type, frozenset[str]] = {}


# --- field checks -------------------------------------------------------------------------------

def _int(value: Any, name: str, low: int | None = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(f"{name} must be an integer, got {type(value).__name__}")
    if low is not None and value < low:
        raise InvalidField(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidField(f"{name} must be <= {high}, got {value}")
    return value


def _str(value: Any, name: str, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise InvalidField(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise InvalidField(f"{name} is longer than {max_len} characters")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidField(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def _float(value: Any, name: str, low: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidField(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        raise InvalidField(f"{name} must be a finite number >= {low}, got {value}")
    return value


def _tensor_to_wire(t: torch.Tensor) -> dict[str, Any]:
    if t.dtype not in _DTYPE_NAMES:
        raise InvalidField(f"cannot send tensors of dtype {t.dtype}")
    return {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data": tensor_bytes(t)}


def _tensor(value: Any, name: str, dtypes: tuple[str, ...], ndim: int) -> torch.Tensor:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise InvalidField(f"{name} must be a tensor map with dtype, shape and data")
    dtype = value["dtype"]
    if dtype not in dtypes:
        raise InvalidField(f"{name} has dtype {dtype!r}; accepted: {', '.join(dtypes)}")
    shape = value["shape"]
    if not isinstance(shape, list) or len(shape) != ndim:
        raise InvalidField(f"{name} must have {ndim} dimensions, got shape {shape!r}")
    for i, dim in enumerate(shape):
        _int(dim, f"{name}.shape[{i}]", 0, _MAX_DIM)
    data = value["data"]
    if not isinstance(data, bytes):
        raise InvalidField(f"{name}.data must be bytes")
    torch_dtype = _DTYPES[dtype]
    expected = math.prod(shape) * torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != expected:
        raise InvalidField(f"{name} shape {shape} of {dtype} needs {expected} bytes, got {len(data)}")
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


def _counts(value: Any, name: str) -> torch.Tensor:
    """Counts: ``[L, E]`` integer or float; finite and non-negative. Returned as int64."""
    t = _tensor(value, name, ("int32", "int64", "float32", "float64"), 2)
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise InvalidField(f"{name} holds NaN or infinite values")
        if bool((t != t.round()).any()):
            raise InvalidField(f"{name} holds fractional selection counts")
    if t.numel() and bool((t < 0).any()):
        raise InvalidField(f"{name} holds negative values")
    return t.to(torch.int64)


def _placement(value: Any, name: str) -> torch.Tensor:
    """A placement tensor ``[L, P]``; its rules beyond dtype/shape are checked by the receiver,
    which knows E and G (eplb.placement.rules.validate_placement)."""
    return _tensor(value, name, ("int16", "int32", "int64"), 2).to(torch.int64)


def _int_list(value: Any, name: str, max_len: int = 1 << 16, low: int = 0,
              high: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > max_len:
        raise InvalidField(f"{name} must be a list of at most {max_len} integers")
    # one pass over plain ints (what every sender writes); the per-element checks below only
    # run to name the first bad element
    if all(type(v) is int and v >= low and (high is None or v <= high) for v in value):
        return tuple(value)
    return tuple(_int(v, f"{name}[{i}]", low, high) for i, v in enumerate(value))


def _code(codes: type[enum.Enum]) -> Any:
    """The check of a reason-code field: one of the values of ``codes``."""
    def check(value: Any, name: str) -> enum.Enum:
        try:
            return codes(value)
        except ValueError:
            raise InvalidField(f"{name} must be one of {[c.value for c in codes]}, got "
                               f"{value!r:.80}") from None
    return check


def _dict(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidField(f"{name} must be a map")
    return value


# --- messages -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """Base of all messages. ``TYPE`` is the wire tag; ``_CHECKS`` maps each field to its check."""

    TYPE: ClassVar[str] = ""
    _CHECKS: ClassVar[dict[str, Any]] = {}

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = _tensor_to_wire(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> "Message":
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
        extra = raw.keys() - names - {"v", "type"}
        if extra:
            raise InvalidField(f"{cls.TYPE} has unknown fields {sorted(map(str, extra))}")
        missing = names - raw.keys()
        if missing:
            raise InvalidField(f"{cls.TYPE} lacks fields {sorted(missing)}")
        values = {name: check(raw[name], f"{cls.TYPE}.{name}") for name, check in cls._CHECKS.items()}
        msg = cls(**values)
        msg._check_consistency()
        return msg

    def _check_consistency(self) -> None:
        """Cross-field rules; overridden where a message has them."""


#: The largest rank (or node) number a message may carry.
MAX_RANK = 1 << 20


def _rank(v: Any, n: str) -> int:
    return _int(v, n, 0, MAX_RANK)


def _epoch(v: Any, n: str) -> int:
    return _int(v, n, 0, 1 << 62)


#: The largest decode step a message may carry.
MAX_STEP = 1 << 62


def _step(v: Any, n: str) -> int:
    return _int(v, n, 0, MAX_STEP)


def _reason(v: Any, n: str) -> str:
    return _str(v, n, 2048)


@dataclass(frozen=True)
class Hello(Message):
    """A worker joins. ``phys2log: [L, P]`` is the placement it serves now (mid-copy: some layers
    already switched). ``applied_epoch``: the last epoch whose copies this rank finished, 0 for
    none (a fresh engine); it tells a rank that diverged from a fresh engine instance."""

    TYPE = "HELLO"
    rank: int
    node: int
    world_size: int
    num_layers: int
    num_experts: int
    num_physical: int
    bytes_per_expert: int
    step: int
    pid: int
    phys2log: torch.Tensor
    applied_epoch: int = 0
    _CHECKS = {"rank": _rank, "node": _rank, "world_size": lambda v, n: _int(v, n, 1, 1 << 20),
               "num_layers": lambda v, n: _int(v, n, 1, 1 << 16),
               "num_experts": lambda v, n: _int(v, n, 1, 1 << 20),
               "num_physical": lambda v, n: _int(v, n, 1, 1 << 20),
               "bytes_per_expert": lambda v, n: _int(v, n, 0, 1 << 50), "step": _step,
               "pid": lambda v, n: _int(v, n, 0, 1 << 31), "phys2log": _placement,
               "applied_epoch": _epoch}

    def _check_consistency(self) -> None:
        if self.rank >= self.world_size:
            raise InvalidField(f"HELLO.rank {self.rank} is not below world_size {self.world_size}")
        if list(self.phys2log.shape) != [self.num_layers, self.num_physical]:
            raise InvalidField(f"HELLO.phys2log has shape {list(self.phys2log.shape)}, expected "
                               f"[{self.num_layers}, {self.num_physical}]")


@dataclass(frozen=True)
class Welcome(Message):
    """The answer to HELLO: ``ok``, or ``error`` saying what to fix. ``retry``: the refusal is
    for now (say the rank's identity is held by a live connection); say HELLO again later."""

    TYPE = "WELCOME"
    rank: int
    ok: bool
    error: str
    retry: bool = False
    _CHECKS = {"rank": _rank, "ok": _bool, "error": _reason, "retry": _bool}


@dataclass(frozen=True)
class Rejoin(Message):
    """A sidecar or the leader got a frame from a rank it does not know (it restarted since the
    rank's HELLO): the worker should say HELLO again."""

    TYPE = "REJOIN"
    rank: int
    reason: str
    _CHECKS = {"rank": _rank, "reason": _reason}


@dataclass(frozen=True)
class OutcomeQuery(Message):
    """A rank that promised ``epoch`` and has not heard its outcome asks again (its sidecar or the
    leader may have restarted and lost the COMMIT or ABORT). The leader answers with the COMMIT or
    ABORT it decided, and nothing while it is still deciding."""

    TYPE = "OUTCOME_QUERY"
    rank: int
    epoch: int
    _CHECKS = {"rank": _rank, "epoch": _epoch}


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE = "HEARTBEAT"
    rank: int
    step: int
    _CHECKS = {"rank": _rank, "step": _step}


@dataclass(frozen=True)
class Counts(Message):
    """Expert selections of one rank over decode steps ``[from_step, to_step)``: ``counts: [L, E]``."""

    TYPE = "COUNTS"
    rank: int
    from_step: int
    to_step: int
    counts: torch.Tensor
    _CHECKS = {"rank": _rank, "from_step": _step, "to_step": _step, "counts": _counts}

    def _check_consistency(self) -> None:
        if self.to_step < self.from_step:
            raise InvalidField(f"COUNTS range [{self.from_step}, {self.to_step}) is reversed")


@dataclass(frozen=True)
class PlanAck(Message):
    TYPE = "PLAN_ACK"
    rank: int
    epoch: int
    step: int
    _CHECKS = {"rank": _rank, "epoch": _epoch, "step": _step}


@dataclass(frozen=True)
class Promise(Message):
    TYPE = "PROMISE"
    rank: int
    epoch: int
    _CHECKS = {"rank": _rank, "epoch": _epoch}


@dataclass(frozen=True)
class Refuse(Message):
    """``rank`` will not take part in ``epoch`` (at ``step``): ``code`` says why for the leader
    (whether a retry can help, :attr:`RefuseCode.retryable`), ``reason`` for a person."""

    TYPE = "REFUSE"
    rank: int
    epoch: int
    step: int
    reason: str
    code: RefuseCode = RefuseCode.TOO_LATE
    _CHECKS = {"rank": _rank, "epoch": _epoch, "step": _step, "reason": _reason,
               "code": _code(RefuseCode)}


@dataclass(frozen=True)
class Done(Message):
    """Copies of ``epoch`` finished on ``rank``: ``ok`` or ``error`` (a message), with stats."""

    TYPE = "DONE"
    rank: int
    epoch: int
    ok: bool
    error: str
    bytes_received: int
    copy_seconds: float
    hold_seconds: float
    _CHECKS = {"rank": _rank, "epoch": _epoch, "ok": _bool, "error": _reason,
               "bytes_received": lambda v, n: _int(v, n, 0, 1 << 62),
               "copy_seconds": _float, "hold_seconds": _float}


@dataclass(frozen=True)
class Bye(Message):
    TYPE = "BYE"
    rank: int
    _CHECKS = {"rank": _rank}


@dataclass(frozen=True)
class Plan(Message):
    """The placement of ``epoch``: ``phys2log: [L, P]``. Copies go at most ``layers_per_chunk``
    layers a step and, when ``bytes_per_chunk`` > 0, at most that many bytes received by the
    busiest rank a step (a layer above the budget goes alone)."""

    TYPE = "PLAN"
    epoch: int
    phys2log: torch.Tensor
    plan_hash: str
    layers_per_chunk: int
    bytes_per_chunk: int = 0
    _CHECKS = {"epoch": _epoch, "phys2log": _placement, "plan_hash": lambda v, n: _str(v, n, 64),
               "layers_per_chunk": lambda v, n: _int(v, n, 1, 1 << 16),
               "bytes_per_chunk": lambda v, n: _int(v, n, 0, 1 << 50)}


@dataclass(frozen=True)
class Prepare(Message):
    TYPE = "PREPARE"
    epoch: int
    step: int
    _CHECKS = {"epoch": _epoch, "step": _step}


@dataclass(frozen=True)
class Commit(Message):
    TYPE = "COMMIT"
    epoch: int
    step: int
    _CHECKS = {"epoch": _epoch, "step": _step}


@dataclass(frozen=True)
class Abort(Message):
    """Epoch ``epoch`` is off: ``code`` for metrics and code, ``reason`` for a person."""

    TYPE = "ABORT"
    epoch: int
    reason: str
    code: AbortCode = AbortCode.OTHER
    _CHECKS = {"epoch": _epoch, "reason": _reason, "code": _code(AbortCode)}


@dataclass(frozen=True)
class NodeHello(Message):
    TYPE = "NODE_HELLO"
    node: int
    pid: int
    incarnation: str
    _CHECKS = {"node": _rank, "pid": lambda v, n: _int(v, n, 0, 1 << 31),
               "incarnation": lambda v, n: _str(v, n, 64)}


@dataclass(frozen=True)
class NodeHeartbeat(Message):
    """A sidecar is alive; ``ranks``: the local ranks bound to it. A follower that answers for
    its node also reports ``progress``, rows ``(rank, step)``: the latest decode step it heard
    from each local rank the leader welcomed (those ranks' own HEARTBEATs stop at the node, so
    the leader reads one frame per node, not one per rank). Empty from the leader."""

    TYPE = "NODE_HEARTBEAT"
    node: int
    ranks: tuple[int, ...]
    progress: tuple[tuple[int, int], ...] = ()
    _CHECKS = {"node": _rank, "ranks": _int_list,
               "progress": lambda v, n: tuple(
                   (_rank(r[0], f"{n}[{i}].rank"), _step(r[1], f"{n}[{i}].step"))
                   for i, r in enumerate(_rows(v, n, 2)))}

    def _check_consistency(self) -> None:
        _unique_ranks([r[0] for r in self.progress], "NODE_HEARTBEAT.progress")


@dataclass(frozen=True)
class WorkerLeft(Message):
    TYPE = "WORKER_LEFT"
    node: int
    rank: int
    reason: str
    _CHECKS = {"node": _rank, "rank": _rank, "reason": _reason}


@dataclass(frozen=True)
class Relay(Message):
    """Envelope between sidecars: the frames after it are worker frames, one per entry of
    ``ranks`` (from those workers, or to them). A rank of -1 is a broadcast to every worker of
    the receiving sidecar. A follower batches what its workers sent in one burst."""

    TYPE = "RELAY"
    node: int
    ranks: tuple[int, ...]
    _CHECKS = {"node": _rank, "ranks": lambda v, n: _int_list(v, n, MAX_RELAY_RANKS, low=-1)}

    def _check_consistency(self) -> None:
        if not self.ranks:
            raise InvalidField("RELAY.ranks is empty")


CONTROL_OPS = ("status", "rebalance")


@dataclass(frozen=True)
class ControlRequest(Message):
    TYPE = "CONTROL"
    request_id: str
    op: str
    args: dict = field(default_factory=dict)
    _CHECKS = {"request_id": lambda v, n: _str(v, n, 64), "op": lambda v, n: _str(v, n, 64),
               "args": _dict}

    def _check_consistency(self) -> None:
        if self.op not in CONTROL_OPS:
            raise InvalidField(f"unknown control op {self.op!r}; accepted: {', '.join(CONTROL_OPS)}")


@dataclass(frozen=True)
class ControlReply(Message):
    TYPE = "CONTROL_REPLY"
    request_id: str
    ok: bool
    result: dict
    error: str
    _CHECKS = {"request_id": lambda v, n: _str(v, n, 64), "ok": _bool, "result": _dict,
               "error": _reason}



# --- per-node aggregates (a follower answers for its node; eplb.coordinator.aggregate) ---------

#: Most ranks one per-node aggregate names (the ranks of one node).
MAX_NODE_RANKS = MAX_RELAY_RANKS


def _node_ranks(value: Any, name: str) -> tuple[int, ...]:
    """A node's ranks: a list of at most :data:`MAX_NODE_RANKS` distinct ranks (length checked
    before any element is read)."""
    ranks = _int_list(value, name, MAX_NODE_RANKS, 0, MAX_RANK)
    _unique_ranks(ranks, name)
    return ranks


def _rows(value: Any, name: str, width: int) -> list[list[Any]]:
    """A list of at most :data:`MAX_NODE_RANKS` rows of ``width`` entries each (lengths checked
    before any entry is read)."""
    if not isinstance(value, list) or len(value) > MAX_NODE_RANKS:
        raise InvalidField(f"{name} must be a list of at most {MAX_NODE_RANKS} entries")
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise InvalidField(f"{name}[{i}] must be a list of {width} values")
    return value


def _unique_ranks(ranks: Sequence[int], what: str) -> None:
    if len(set(ranks)) != len(ranks):
        raise InvalidField(f"{what} names a rank twice")


def _node_counts(value: Any, name: str) -> torch.Tensor:
    """A node's summed counts ``[L, E]``: int16, int32 or int64 (the narrowest that holds the
    values is sent), non-negative. Returned as int64."""
    t = _tensor(value, name, ("int16", "int32", "int64"), 2)
    if t.numel() and bool((t < 0).any()):
        raise InvalidField(f"{name} holds negative values")
    return t.to(torch.int64)


def _narrowest(t: torch.Tensor) -> torch.Tensor:
    """``t`` (non-negative integers) in the narrowest of int16, int32, int64 that holds it."""
    top = int(t.max()) if t.numel() else 0
    for dtype in (torch.int16, torch.int32):
        if top <= torch.iinfo(dtype).max:
            return t.to(dtype)
    return t.to(torch.int64)


@dataclass(frozen=True)
class NodeCounts(Message):
    """The expert selections of a node's ``ranks`` over decode steps ``[from_step, to_step)``,
    summed: ``counts: [L, E]`` int64 here, and on the wire the narrowest of int16 / int32 / int64
    that holds the largest value (a DeepSeek-V3 node's flush of 8 ranks x 64 steps fits int32:
    59 kB instead of 8 x 119 kB). ``steps[i]``: the latest decode step the node knows rank
    ``ranks[i]`` has reached (at least ``to_step``), for the leader's per-rank progress.
    The leader adds ``counts`` to its window once and takes each rank's step
    (:func:`eplb.coordinator.aggregate.node_counts_into_window`)."""

    TYPE = "NODE_COUNTS"
    node: int
    ranks: tuple[int, ...]
    steps: tuple[int, ...]
    from_step: int
    to_step: int
    counts: torch.Tensor
    _CHECKS = {"node": _rank, "ranks": _node_ranks,
               "steps": lambda v, n: _int_list(v, n, MAX_NODE_RANKS, 0, MAX_STEP),
               "from_step": _step, "to_step": _step, "counts": _node_counts}

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        out["counts"] = _tensor_to_wire(_narrowest(self.counts))
        return out

    def _check_consistency(self) -> None:
        if not self.ranks:
            raise InvalidField("NODE_COUNTS.ranks is empty")
        if len(self.steps) != len(self.ranks):
            raise InvalidField(f"NODE_COUNTS has {len(self.ranks)} ranks but {len(self.steps)} steps")
        if self.to_step < self.from_step:
            raise InvalidField(f"NODE_COUNTS range [{self.from_step}, {self.to_step}) is reversed")


@dataclass(frozen=True)
class NodeAcks(Message):
    """The PLAN_ACKs of a node's ranks for ``epoch``: rank ``ranks[i]`` acked at decode step
    ``steps[i]``. Stands for one :class:`PlanAck` per rank."""

    TYPE = "NODE_ACKS"
    node: int
    epoch: int
    ranks: tuple[int, ...]
    steps: tuple[int, ...]
    _CHECKS = {"node": _rank, "epoch": _epoch, "ranks": _node_ranks,
               "steps": lambda v, n: _int_list(v, n, MAX_NODE_RANKS, 0, MAX_STEP)}

    @property
    def steps_by_rank(self) -> dict[int, int]:
        return dict(zip(self.ranks, self.steps))

    def _check_consistency(self) -> None:
        if not self.ranks:
            raise InvalidField("NODE_ACKS.ranks is empty")
        if len(self.steps) != len(self.ranks):
            raise InvalidField(f"NODE_ACKS has {len(self.ranks)} ranks but {len(self.steps)} steps")


@dataclass(frozen=True)
class NodePromises(Message):
    """A node's answers to PREPARE (or to PLAN, for a refusal) of ``epoch``: ``promised`` ranks
    each stand for one :class:`Promise`; ``refused`` rows ``(rank, step, reason, code)`` (``code``: the
    :class:`RefuseCode` the leader's retry decision reads) each for one
    :class:`Refuse`. A rank is in one of the two at most."""

    TYPE = "NODE_PROMISES"
    node: int
    epoch: int
    promised: tuple[int, ...]
    refused: tuple[tuple[int, int, str, RefuseCode], ...]
    _CHECKS = {"node": _rank, "epoch": _epoch, "promised": _node_ranks,
               "refused": lambda v, n: tuple(
                   (_rank(r[0], f"{n}[{i}].rank"), _step(r[1], f"{n}[{i}].step"),
                    _reason(r[2], f"{n}[{i}].reason"), _code(RefuseCode)(r[3], f"{n}[{i}].code"))
                   for i, r in enumerate(_rows(v, n, 4)))}

    def _check_consistency(self) -> None:
        if not self.promised and not self.refused:
            raise InvalidField("NODE_PROMISES carries no answer")
        refused = [r[0] for r in self.refused]
        _unique_ranks(refused, "NODE_PROMISES.refused")
        both = set(refused) & set(self.promised)
        if both:
            raise InvalidField(f"NODE_PROMISES has ranks {sorted(both)} both promised and refused")


@dataclass(frozen=True)
class NodeDone(Message):
    """The DONEs of a node's ranks for ``epoch``: rows ``(rank, ok, error, bytes_received,
    copy_seconds, hold_seconds)``, each standing for one :class:`Done` with those fields."""

    TYPE = "NODE_DONE"
    node: int
    epoch: int
    results: tuple[tuple[int, bool, str, int, float, float], ...]
    _CHECKS = {"node": _rank, "epoch": _epoch,
               "results": lambda v, n: tuple(
                   (_rank(r[0], f"{n}[{i}].rank"), _bool(r[1], f"{n}[{i}].ok"),
                    _reason(r[2], f"{n}[{i}].error"),
                    _int(r[3], f"{n}[{i}].bytes_received", 0, 1 << 62),
                    _float(r[4], f"{n}[{i}].copy_seconds"), _float(r[5], f"{n}[{i}].hold_seconds"))
                   for i, r in enumerate(_rows(v, n, 6)))}

    def _check_consistency(self) -> None:
        if not self.results:
            raise InvalidField("NODE_DONE.results is empty")
        _unique_ranks([r[0] for r in self.results], "NODE_DONE.results")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Rejoin, OutcomeQuery, Heartbeat, Counts, PlanAck, Promise, Refuse, Done, Bye, Plan,
                              Prepare, Commit, Abort, NodeHello, NodeHeartbeat, WorkerLeft, Relay,
                              ControlRequest, ControlReply)
}
MESSAGE_TYPES.update({cls.TYPE: cls for cls in (NodeCounts, NodeAcks, NodePromises, NodeDone)})
__all__ += ["MAX_NODE_RANKS", "NodeCounts", "NodeAcks", "NodePromises", "NodeDone"]


def encode(msg: Message) -> bytes:
    """One frame for ``msg``. Raises :class:`FrameTooLarge` rather than send what peers would drop."""
    frame = msgpack.packb(msg.to_wire(), use_bin_type=True)
    if len(frame) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"{msg.TYPE} frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    return frame


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Parse and validate one frame. Raises a :class:`ProtocolError` subclass on anything wrong."""
    if len(frame) > max_bytes:
        raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds the cap of {max_bytes}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                              max_str_len=1 << 20, max_array_len=1 << 20, max_map_len=1 << 16)
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, ...)
        raise MalformedFrame(f"not a msgpack frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedFrame(f"frame must be a map, got {type(raw).__name__}")
    version = raw.get("v")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported (this build speaks {PROTOCOL_VERSION}); "
            "run the same eplb version on every sidecar and worker")
    kind = raw.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownMessageType(f"unknown message type {kind!r}")
    return cls.from_wire(raw)
