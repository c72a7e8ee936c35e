"""Which connection holds each rank: the sidecar's bindings of ranks to worker connections.

Sans-IO: plain objects fed events (a HELLO, a frame, a BYE, a tick) that return decisions; the
sidecar moves the frames. A rank is bound at HELLO to the connection (ZeroMQ routing identity)
and pid that said it. A HELLO for a rank held by another connection that is still alive is
refused for now; a holder that is silent or whose process is gone gives way at once. Bindings
outlive a holder's silence (broadcasts still reach it) until it is replaced or says BYE.

:class:`LocalAdmission` turns these bindings into the decisions about each local frame that
both roles share (admit it, refuse it, ask for a HELLO, a worker left).

The leader's side of the same question, a HELLO relayed by one node for a rank that another,
live node still lists, is :func:`relayed_hello_conflict`.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from eplb.coordinator.outputs import Admitted, LocalLeft, Reject, ToLocal
from eplb.proto import (Bye, Hello, IdentityMismatch, Message, ProtocolError, Rejoin, Welcome,
                        encode)

LocalOutput = ToLocal | LocalLeft | Admitted | Reject

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


#: Local connections remembered for the once-a-second REJOIN limit before old entries are pruned.
MAX_REJOIN_ASKED = 4096


class LocalAdmission:
    """One sidecar's decisions about its local workers' frames, in either role (sans-IO).

    A HELLO binds the rank to its connection (refused with ``Welcome(ok=False, retry=True)``
    while another live connection holds it; a silent or dead holder gives way and leaves the
    group first). Any other frame must come from the rank's holder: from another connection it
    is rejected (and that connection asked to say HELLO when the holder is gone); from no
    holder, or a holder declared silent, it asks for a HELLO; a BYE unbinds. What passes is
    :class:`~eplb.coordinator.outputs.Admitted`: the leader's core reads it, a follower relays it.

    Args:
        node: this sidecar's node rank (for the log).
        timeout_s: a worker not heard for longer is silent, and leaves the group.
        is_alive: whether a process id exists on this host.
    """

    def __init__(self, node: int, timeout_s: float,
                 is_alive: Callable[[int], bool] = pid_alive) -> None:
        self.node = node
        self.registry = WorkerRegistry(timeout_s, is_alive)
        self._rejoin_asked: dict[bytes, float] = {}

    @property
    def live(self) -> dict[int, float]:
        """The joined local ranks -> last heard (monotonic)."""
        return self.registry.live

    def on_frame(self, identity: bytes, rank: int, msg: Message, frame: bytes,
                 now: float) -> list[LocalOutput]:
        """One frame of a local worker, whose ``identity`` names ``rank``
        (:func:`eplb.proto.envelope.open_worker` checked that)."""
        where = f"worker identity {identity[:24]!r}"
        node = self.node
        if isinstance(msg, Hello):
            decision = self.registry.hello(rank, identity, msg.pid, now)
            if not isinstance(decision, Admit):
                welcome = Welcome(rank=rank, ok=False, error=decision.error, retry=True)
                return [Reject(f"{where} (pid {msg.pid})", Impostor(decision.error)),
                        ToLocal(rank, encode(welcome), welcome, identity)]
            out: list[LocalOutput] = []
            old = decision.displaced
            if old is not None:
                log.warning("node %d: rank %d: pid %d takes over from pid %d, which is gone or "
                            "silent", node, rank, msg.pid, old.pid, extra={"rank": rank})
                if old.live:  # not declared gone yet: its epoch must not wait for it
                    out += self._left(rank, f"its process {old.pid} is gone; pid {msg.pid} "
                                            "takes its place")
            if msg.node != node:
                log.warning("rank %d says it is on node %d but joined the sidecar of node %d",
                            rank, msg.node, node)
            log.info("node %d: rank %d joined at step %d", node, rank, msg.step,
                     extra={"rank": rank, "step": msg.step})
            return [*out, Admitted(rank, msg, frame)]
        verdict = self.registry.check(rank, identity, now)
        if verdict in (Verdict.MISMATCH, Verdict.RECLAIM):
            out = [Reject(where, IdentityMismatch(
                f"{msg.TYPE} for rank {rank} from a connection that does not hold it"))]
            if verdict is Verdict.RECLAIM:  # its holder is gone: the sender may take it back
                out += self._ask_rejoin(identity, rank, f"rank {rank}'s holder is gone", now)
            return out
        if isinstance(msg, Bye):
            if verdict is not Verdict.UNBOUND:
                self.registry.unbind(rank)
            return self._left(rank, "said goodbye") if verdict is Verdict.OK else []
        if verdict is not Verdict.OK:
            # No HELLO since this sidecar started, or the rank was declared gone: ask for one.
            return self._ask_rejoin(identity, rank,
                                    f"node {node}'s sidecar does not know rank {rank}", now)
        self.registry.heard(rank, now)
        return [Admitted(rank, msg, frame)]

    def on_tick(self, now: float) -> list[LocalOutput]:
        """Workers silent past the time-out leave the group (they stay bound: broadcasts still
        reach them; after a pause of this process, none is silent)."""
        out: list[LocalOutput] = []
        for rank, silent in self.registry.tick(now):
            out += self._left(rank, f"no heartbeat for {silent:.1f}s "
                                    f"(limit {self.registry.timeout_s:g}s)")
        return out

    def delivered(self, rank: int, msg: Message, identity: bytes) -> None:
        """``msg`` was just sent to connection ``identity`` for ``rank``: a refused WELCOME to
        the rank's holder unbinds it (the group refused it: it is not one of our workers; the
        WELCOME went to the binding first). One to another connection (an impostor refused
        here) leaves the holder alone."""
        if (isinstance(msg, Welcome) and not msg.ok
                and self.registry.identity_of(rank) == identity):
            self.registry.unbind(rank)

    def _left(self, rank: int, why: str) -> list[LocalOutput]:
        log.warning("node %d: rank %d left: %s", self.node, rank, why, extra={"rank": rank})
        return [LocalLeft(rank, why)]

    def _ask_rejoin(self, identity: bytes, rank: int, why: str, now: float) -> list[LocalOutput]:
        """Tell the local connection ``identity`` to say HELLO for ``rank``, at most once a
        second per connection."""
        if now - self._rejoin_asked.get(identity, float("-inf")) < 1.0:
            return []
        if len(self._rejoin_asked) > MAX_REJOIN_ASKED:
            self._rejoin_asked = {i: t for i, t in self._rejoin_asked.items() if now - t < 1.0}
        self._rejoin_asked[identity] = now
        log.info("node %d: asking rank %d to join again: %s", self.node, rank, why,
                 extra={"rank": rank})
        rejoin = Rejoin(rank=rank, reason=why)
        return [ToLocal(rank, encode(rejoin), rejoin, identity)]
