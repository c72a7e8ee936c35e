"""Which connection holds each rank: the sidecar's bindings of ranks to worker connections.

Sans-IO: plain objects fed events (a HELLO, a frame, a BYE, a tick) that return decisions; the
sidecar moves the frames. A rank is bound at HELLO to the connection (ZeroMQ routing identity)
and pid that said it. A HELLO for a rank held by another connection that is still alive is
refused for now; a holder that is silent or whose process is gone gives way at once. Bindings
outlive a holder's silence (broadcasts still reach it) until it is replaced or says BYE.

The leader's side of the same question, a HELLO relayed by one node for a rank that another,
live node still lists, is :func:`relayed_hello_conflict`.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from eplb.proto import ProtocolError

log = logging.getLogger("eplb.sidecar")


class Impostor(ProtocolError):
    """A HELLO for a rank whose identity a live connection (or a live node) holds."""

    reason = "impostor"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts; a zombie, dead
    but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: the signal check is all there is


def rank_of_identity(identity: bytes) -> int | None:
    """The rank a worker's routing identity names: ``b"<rank>"`` or ``b"<rank>.<anything>"``."""
    head = identity.split(b".", 1)[0]
    return int(head) if head.isdigit() and len(head) <= 9 else None


@dataclass
class Binding:
    """One rank's holder: its routing identity, pid, when it was last heard, and whether it
    still counts as joined (False once declared silent)."""

    identity: bytes
    pid: int
    seen: float
    live: bool = True


@dataclass(frozen=True)
class Admit:
    """The HELLO's connection now holds the rank. ``displaced``: the previous holder, another
    connection that was silent or whose process is gone (None: none, or the same connection)."""

    displaced: Binding | None = None


@dataclass(frozen=True)
class Refuse:
    """The rank is held by another live connection; answer ``Welcome(ok=False, retry=True)``."""

    error: str


class Verdict(enum.Enum):
    """What to do with a frame other than HELLO."""

    OK = "ok"              # from the rank's holder: take it
    UNBOUND = "unbound"    # nobody holds the rank: ask the sender to say HELLO
    SILENT = "silent"      # from the holder, declared gone since: ask it to say HELLO again
    MISMATCH = "mismatch"  # another connection holds the rank: reject and count
    RECLAIM = "reclaim"    # another holds it but is gone: reject, and ask the sender to say HELLO


class WorkerRegistry:
    """Bindings of one sidecar's ranks. ``timeout_s``: a holder not heard for longer is silent.
    ``is_alive(pid)``: whether the holder's process exists (local workers share the host)."""

    def __init__(self, timeout_s: float, is_alive: Callable[[int], bool] = pid_alive) -> None:
        self.timeout_s = timeout_s
        self.is_alive = is_alive
        self.bindings: dict[int, Binding] = {}
        #: rank -> last heard, for the bound ranks not declared silent (the joined workers)
        self.live: dict[int, float] = {}
        self.pauses = 0
        self._last_tick: float | None = None

    def holder_alive(self, binding: Binding, now: float) -> bool:
        """Heard within the time-out and its process still exists."""
        return (binding.live and now - binding.seen <= self.timeout_s
                and self.is_alive(binding.pid))

    def hello(self, rank: int, identity: bytes, pid: int, now: float) -> Admit | Refuse:
        """A HELLO for ``rank`` from connection ``identity`` of process ``pid``."""
        held = self.bindings.get(rank)
        if held is not None and held.identity != identity:
            if self.holder_alive(held, now):
                return Refuse(f"rank {rank} is held by another live connection (pid {held.pid}, "
                              f"heard {now - held.seen:.1f}s ago); two processes claim this "
                              f"rank. Stop the other one; it is released once its process is "
                              f"gone or silent for {self.timeout_s:g}s")
        else:
            held = None
        self.bindings[rank] = Binding(identity, pid, now)
        self.live[rank] = now
        return Admit(held)

    def check(self, rank: int, identity: bytes, now: float) -> Verdict:
        """Where a frame other than HELLO, claiming ``rank``, from ``identity`` stands. Changes
        nothing: call :meth:`heard` for an OK frame."""
        held = self.bindings.get(rank)
        if held is None:
            return Verdict.UNBOUND
        if held.identity != identity:
            return Verdict.MISMATCH if self.holder_alive(held, now) else Verdict.RECLAIM
        return Verdict.OK if held.live else Verdict.SILENT

    def heard(self, rank: int, now: float) -> None:
        """The holder of ``rank`` was heard from (after :meth:`check` said OK)."""
        self.bindings[rank].seen = now
        self.live[rank] = now

    def unbind(self, rank: int) -> Binding | None:
        """Forget ``rank``'s holder (it said BYE, or its HELLO was refused upstream)."""
        self.live.pop(rank, None)
        return self.bindings.pop(rank, None)

    def identity_of(self, rank: int) -> bytes | None:
        held = self.bindings.get(rank)
        return None if held is None else held.identity

    def identities(self) -> list[tuple[int, bytes]]:
        """``(rank, identity)`` of every bound rank, silent ones included: broadcasts go to all."""
        return [(rank, b.identity) for rank, b in sorted(self.bindings.items())]

    def tick(self, now: float) -> list[tuple[int, float]]:
        """Declare silent the holders not heard within the time-out; returns ``(rank, seconds
        silent)`` of each, once. A gap between ticks longer than half the time-out means this
        process was paused (SIGSTOP, a stalled host): its sockets still hold the workers'
        frames, so every joined worker counts as just heard instead."""
        gap = 0.0 if self._last_tick is None else now - self._last_tick
        self._last_tick = now
        if gap > self.timeout_s / 2:
            self.pauses += 1
            log.warning("the sidecar did not run for %.1fs (paused?); its %d joined worker(s) "
                        "count as just heard", gap, len(self.live))
            for rank in self.live:
                self.live[rank] = self.bindings[rank].seen = now
            return []
        gone = []
        for rank, held in self.bindings.items():
            if held.live and now - held.seen > self.timeout_s:
                held.live = False
                del self.live[rank]
                gone.append((rank, now - held.seen))
        return gone


def relayed_hello_conflict(rank: int, node: int, rank_node: Mapping[int, int],
                           node_ranks: Mapping[int, Collection[int]]) -> str | None:
    """Leader: why a HELLO for ``rank`` arriving through ``node`` must be refused for now, or
    None. ``rank_node``: the node each joined rank came through; ``node_ranks``: for every live
    node (the leader's own included), the ranks it lists as its joined workers."""
    holder = rank_node.get(rank)
    if holder is None or holder == node or rank not in node_ranks.get(holder, ()):
        return None
    return (f"rank {rank} is joined through node {holder}, which is alive and still lists it; "
            f"a HELLO for it through node {node} is refused until node {holder} lets it go")
