"""The leader's view of the follower sidecars, with no I/O: which incarnation of each node is
current, when it was last heard, the ranks it lists, and the node each joined rank came through.

:class:`~eplb.coordinator.leader.LeaderCore` owns one and turns what it says (a node restarted,
a node went silent) into ranks leaving the group. The driver only maps a node to the socket
identity of its current incarnation (:meth:`NodeMembership.identity_of`).

Incarnations. A follower's socket identity is new with every start of its process
(:func:`eplb.proto.envelope.node_identity`). NODE_HELLO from an identity the leader has not
seen makes it the node's current incarnation, and so does a NODE_HEARTBEAT (a NODE_HELLO can
be lost: libzmq drops what a follower queued when its link reconnects). While the node is not
known at all, a first RELAY or WORKER_LEFT is taken as its NODE_HELLO too: this is the leader
restarted after its follower, which said NODE_HELLO to the previous leader. Why accept it
instead of dropping it and asking the node to say NODE_HELLO again: the frames of one
connection arrive in order and its key was checked for that node
(:func:`eplb.coordinator.peer_auth.check_claim`), so the RELAY is as good a proof as a
NODE_HELLO; and the frames it carries (a HELLO, a PROMISE, a DONE) are exactly the ones a
restart must not lose: dropping them until the next heartbeat cost promises and DONEs, and with
them whole epochs. While the node is known, a RELAY or WORKER_LEFT from another identity is
refused as before (a new incarnation's NODE_HELLO precedes its relays on its connection).

An identity that was replaced is *retired*: frames still queued from it (fair queuing reads
them after the new incarnation's first frames) are refused as
:class:`~eplb.proto.StaleIncarnation`, so a dead incarnation can neither take its node back
nor release the ranks that rejoined through the new one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from eplb.proto import InvalidField, Message, NodeHello, StaleIncarnation

log = logging.getLogger("eplb.leader")

#: Retired follower identities remembered (a bounded record: restarts are rare).
MAX_RETIRED = 256
#: Most nodes outside --num-nodes remembered (a flood of made-up nodes stays small).
MAX_OUTSIDE = 64


@dataclass
class FollowerNode:
    """One follower sidecar: its current socket identity, when it was last heard (monotonic
    seconds), and the ranks its last NODE_HEARTBEAT listed as joined."""

    identity: bytes
    seen: float
    ranks: frozenset[int] = field(default_factory=frozenset)


class NodeMembership:
    """Follower sidecars of the leader and the node each joined rank came through.

    Args:
        num_nodes: ``--num-nodes``; node 0 is the leader's own.
        node_timeout_s: a follower not heard for longer is lost.
    """

    def __init__(self, num_nodes: int = 1, node_timeout_s: float = 3.0) -> None:
        self.num_nodes = num_nodes
        self.node_timeout_s = node_timeout_s
        self.nodes: dict[int, FollowerNode] = {}
        self.rank_node: dict[int, int] = {}
        self.outside: dict[int, float] = {}  # node >= num_nodes -> last heard
        self._retired: OrderedDict[bytes, int] = OrderedDict()  # identity -> its node
        self._last_tick: float | None = None

    # --- who is who -----------------------------------------------------------------------------

    def node_of(self, rank: int) -> int | None:
        """The node ``rank`` joined through (0: the leader's own), None if it has not."""
        return self.rank_node.get(rank)

    def identity_of(self, node: int) -> bytes | None:
        """The socket identity of ``node``'s current incarnation (None: unknown, or node 0)."""
        follower = self.nodes.get(node)
        return None if follower is None else follower.identity

    def identities(self) -> list[bytes]:
        return [f.identity for f in self.nodes.values()]

    def node_named(self, identity: bytes) -> int | None:
        """The node whose current incarnation has ``identity``."""
        return next((n for n, f in self.nodes.items() if f.identity == identity), None)

    def ranks_of(self, node: int) -> list[int]:
        return sorted(r for r, n in self.rank_node.items() if n == node)

    def listed(self, local_ranks: Collection[int]) -> dict[int, frozenset[int]]:
        """Every live node's listed ranks, the leader's own (``local_ranks``) as node 0."""
        listed = {n: f.ranks for n, f in self.nodes.items()}
        listed[0] = frozenset(local_ranks)
        return listed

    # --- events ---------------------------------------------------------------------------------

    def check_node(self, header: Message, now: float) -> int:
        """The node a node frame speaks for, within ``[1, num_nodes)``. A NODE_HELLO or
        NODE_HEARTBEAT from beyond ``--num-nodes`` is remembered for :meth:`outside_nodes`.

        Raises:
            InvalidField: the node is out of range.
        """
        node = getattr(header, "node", None)
        if not isinstance(node, int) or not 0 < node < self.num_nodes:
            if isinstance(node, int) and node >= self.num_nodes and header.TYPE in (
                    "NODE_HELLO", "NODE_HEARTBEAT"):
                self.outside[node] = now
                if len(self.outside) > MAX_OUTSIDE:
                    del self.outside[min(self.outside, key=self.outside.__getitem__)]
            raise InvalidField(f"node {node} outside [1, {self.num_nodes})")
        return node

    def identify(self, node: int, identity: bytes, header: Message, now: float) -> bool:
        """A frame for ``node`` from ``identity``: the node's current incarnation, or one that
        becomes it (see the module docstring). Returns True when it replaced a previous
        incarnation, whose ranks the caller must then release (:meth:`release`).

        Raises:
            StaleIncarnation: ``identity`` is a retired incarnation.
            InvalidField: a RELAY or WORKER_LEFT from another identity than the known node's.
        """
        known = self.nodes.get(node)
        if known is not None and known.identity == identity:
            known.seen = now
            return False
        if identity in self._retired:
            raise StaleIncarnation(f"{header.TYPE} from a previous incarnation of node "
                                   f"{self._retired[identity]} ({identity[:40]!r}), which has "
                                   "restarted since")
        if known is not None and header.TYPE not in ("NODE_HELLO", "NODE_HEARTBEAT"):
            raise InvalidField(f"{header.TYPE} from node {node}, which has not said NODE_HELLO "
                               f"on this connection")
        if known is not None:
            self._retire(known.identity, node)
        implicit = "" if isinstance(header, NodeHello) else (
            f" (its first frame here is a {header.TYPE}: taken as its NODE_HELLO)")
        log.info("node %d: sidecar joined%s%s", node,
                 " again, a new incarnation" if known is not None else "", implicit)
        self.nodes[node] = FollowerNode(identity, now)
        return known is not None

    def joined(self, rank: int, node: int) -> None:
        """``rank``'s HELLO through ``node`` was accepted: its node's listing includes it from
        now on (its heartbeats will, on the same connection)."""
        self.rank_node[rank] = node
        follower = self.nodes.get(node)
        if follower is not None:
            follower.ranks = follower.ranks | {rank}

    def release(self, node: int) -> list[int]:
        """Forget which ranks came through ``node``; returns them."""
        ranks = self.ranks_of(node)
        for rank in ranks:
            del self.rank_node[rank]
        return ranks

    def lose(self, node: int) -> list[int]:
        """``node`` went silent: forget it and release its ranks. Its incarnation is not
        retired: a partitioned follower that comes back is taken in again."""
        self.nodes.pop(node, None)
        return self.release(node)

    def tick(self, now: float) -> list[tuple[int, float]]:
        """The nodes silent for longer than the time-out, ``(node, seconds silent)``. A gap
        between ticks longer than half the time-out means the leader itself was paused
        (SIGSTOP, a stalled host): the followers' heartbeats wait unread in its socket, so
        their silence is its own, and every follower counts as just heard instead."""
        gap = 0.0 if self._last_tick is None else now - self._last_tick
        self._last_tick = now
        if gap > self.node_timeout_s / 2 and self.nodes:
            log.warning("the leader's event loop was paused for %.1fs; follower timeouts "
                        "restart", gap)
            for follower in self.nodes.values():
                follower.seen = now
            return []
        return [(node, now - f.seen) for node, f in self.nodes.items()
                if now - f.seen > self.node_timeout_s]

    def outside_nodes(self, now: float) -> list[int]:
        """Nodes beyond ``--num-nodes`` heard within the last 3 x the node time-out."""
        return sorted(n for n, t in self.outside.items() if now - t <= 3 * self.node_timeout_s)

    def _retire(self, identity: bytes, node: int) -> None:
        self._retired[identity] = node
        while len(self._retired) > MAX_RETIRED:
            self._retired.popitem(last=False)
