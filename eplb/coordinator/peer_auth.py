"""Who is on the other end of the sidecars' TCP link, and how much it may send.

- :class:`NodeAuthenticator`: the leader's ZAP handler. It admits only the follower keys of its
  ``--curve-keys`` directory and names each connection by the key's file (``node-K``): that name
  is the ``User-Id`` of every frame the connection delivers (:func:`peer_of`).
- :func:`check_claim`: a frame that speaks for a node (NODE_HELLO, NODE_HEARTBEAT, RELAY,
  WORKER_LEFT) must come from that node's key.
- :class:`LinkMonitor`: a socket monitor that turns failed CURVE handshakes into clear,
  rate-limited log lines (a follower facing an impostor leader or a wrong ``leader.key``; a leader
  facing a plain-TCP client), counted like rejected frames. A follower's monitor also says why its
  link to the leader is down (name not resolved, nothing answering, keys), once per cause.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from eplb.curve import HINT, SHARED, CurveKeys, node_of
from eplb.proto import IdentityMismatch, Unauthenticated

log = logging.getLogger("eplb.sidecar")

__all__ = ["PEER_RCVHWM", "Unauthenticated", "check_claim", "peer_of", "PeerKey", "PLAIN", "NodeAuthenticator",
           "LinkMonitor", "INSECURE_WARNING", "plain_tcp_refusal"]

#: Messages the leader queues per follower connection before it stops reading that connection.
PEER_RCVHWM = 256

OPT_OUT = "--insecure-plain-tcp"
INSECURE_WARNING = (
    f"INSECURE: {OPT_OUT} is set: the sidecars' TCP link is plain, unencrypted and "
    "unauthenticated; anyone who reaches the leader's port can pose as any node and force "
    "rebalances, and a follower obeys whatever answers on --leader. Use it only on a trusted "
    f"network; otherwise {HINT} (one key pair per node)")


def plain_tcp_refusal(num_nodes: int) -> str:
    """Why a multi-node sidecar without keys does not start, and what to do."""
    return (f"{num_nodes} nodes talk over TCP and no --curve-keys is set; the link is "
            f"authenticated by default: {HINT} (EPLB_CURVE_KEYS), or pass {OPT_OUT} "
            "(EPLB_INSECURE_PLAIN_TCP=1) on a trusted network")


@dataclass(frozen=True)
class PeerKey:
    """What the leader knows about the sender of one peer frame.

    Attributes:
        user_id: the ZAP User-Id (``node-K``, ``node`` for the legacy shared key); None on plain
            TCP, where nobody is authenticated.
        node: the only node the sender may speak for; None: any (shared key, or plain TCP).
    """

    user_id: str | None
    node: int | None

    @property
    def authenticated(self) -> bool:
        return self.user_id is not None


PLAIN = PeerKey(None, None)


def peer_of(frame: zmq.Frame) -> PeerKey:
    """The sender of a received frame, from the User-Id the ZAP handler gave its connection."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP handler answered for this connection: plain TCP
        return PLAIN
    if not isinstance(user_id, str) or not user_id:
        return PLAIN
    return PeerKey(user_id, None if user_id == SHARED else node_of(user_id))


def check_claim(peer: PeerKey, claimed: Any, what: str) -> None:
    """A frame speaking for node ``claimed`` must come from that node's key.

    Raises:
        IdentityMismatch: the key belongs to another node (or to no node at all).
    """
    if peer.user_id is None or peer.user_id == SHARED:
        return  # plain TCP (opted out) or the legacy shared key: anyone may claim any node
    if peer.node is None or peer.node != claimed:
        raise IdentityMismatch(f"{what} for node {claimed} from a peer authenticated as "
                               f"{peer.user_id}")


class NodeAuthenticator(AsyncioAuthenticator):
    """The leader's ZAP handler: admits only the keys of ``keys.authorized`` and names each
    connection ``node-K`` after its key's file (the frames' User-Id).

    Args:
        on_refused: called with the z85 public key of each refused handshake.
    """

    def __init__(self, context: zmq.asyncio.Context, keys: CurveKeys,
                 on_refused: Callable[[bytes], None]) -> None:
        super().__init__(context)
        self._names = dict(keys.authorized)
        self._on_refused = on_refused

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("*", self)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: ``key`` is z85-encoded."""
        if key in self._names:
            return True
        self._on_refused(key)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        """Only called for admitted keys (``client_public_key`` is the raw 32 bytes)."""
        return self._names[z85.encode(client_public_key)]


_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CLOSED
           | zmq.EVENT_CONNECT_RETRIED)
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
           zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class LinkMonitor:
    """Watch the CURVE handshakes of one socket (a zmq socket monitor) and explain failures.

    A follower (``leader_address`` set) monitors its DEALER to the leader: an impostor leader or
    a wrong ``leader.key`` (the handshake fails), a plain-TCP server, or the leader refusing this
    node's key each get their own message. The leader monitors its peer ROUTER: handshakes that
    fail before its ZAP handler sees a key (plain-TCP clients, clients that expect another leader
    key) are reported; ZAP refusals are reported by :class:`NodeAuthenticator`. Each failure calls
    ``on_failure(text)`` (the sidecar counts it as an ``unauthenticated`` rejection) and is logged
    here, at most one line per kind of event per ``every_s``.

    libzmq gives up on a connection whose handshake failed on protocol or authentication (it only
    retries lost connections), so the follower reconnects itself after such a failure, waiting
    ``retry_s`` at first and twice as long after each further failure (up to ``max_retry_s``).

    A follower's link that is down gets one log line per cause (the leader's host name does not
    resolve, nothing accepts the connection, a handshake fails, the connection was lost), however
    often libzmq retries; while the same cause persists it is repeated at most every
    ``remind_s``, with how often it recurred. The line that the link is up again ends it. Without
    ``own_key`` (plain TCP, opted out) the monitor only explains the link.
    """

    def __init__(self, sock: zmq.asyncio.Socket, on_failure: Callable[[str], None],
                 leader_address: str | None = None, own_key: str = "",
                 every_s: float = 5.0, retry_s: float = 1.0, max_retry_s: float = 30.0,
                 remind_s: float = 300.0) -> None:
        self.sock = sock
        self.leader_address = leader_address
        self.own_key = own_key
        self.on_failure = on_failure
        self.every_s = every_s
        self.remind_s = remind_s
        self.failures = 0
        self.last_failure: str | None = None
        self.authenticated = False  # the last handshake succeeded and the link is up
        self._logged: dict[int, tuple[float, int]] = {}
        # follower: why the link is down (None: up, or not tried yet), since when, how often
        self.cause: str | None = None
        self.cause_text = ""
        self._cause_since = self._cause_logged = 0.0
        self._cause_count = 0
        self.down_events = 0  # failed attempts since the link was last up
        self._was_down = False
        self._attempt: set[int] = set()  # events of the connection attempt under way
        self._dropped = 0
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._next_retry_s = retry_s
        self._retry: asyncio.TimerHandle | None = None
        self._mon = sock.get_monitor_socket(_EVENTS)

    def status(self) -> dict[str, Any]:
        """Failed handshakes so far; a follower also says whether the leader is authenticated."""
        status: dict[str, Any] = {"handshake_failures": self.failures,
                                  "last_failure": self.last_failure}
        if self.leader_address is not None:
            if self.own_key:
                status["authenticated"] = self.authenticated
            status["link"] = ("up" if self.authenticated else
                              f"down: {self.cause_text}" if self.cause else "not up yet")
            status["failed_attempts"] = self.down_events
        return status

    def dropped_frame(self) -> None:
        """Follower: a frame for the leader was dropped (its queue is full). Said once per
        outage while the link is down (the cause says why), else at most every ``every_s``."""
        self._dropped += 1
        if not self.authenticated:
            if self._dropped == 1:
                log.warning("frames for the leader are dropped while the link to it is down "
                            "(%s)", self.cause_text or "not connected yet")
            return
        self._log(-1, logging.WARNING, "the leader is not keeping up; dropped a frame for it")

    async def run(self) -> None:
        try:
            while True:
                msg = await self._mon.recv_multipart()
                if len(msg) != 2 or len(msg[0]) != 6:
                    continue
                event, value = struct.unpack("=Hi", msg[0])
                self.on_event(event, value, msg[1].decode(errors="replace"))
        except (zmq.ContextTerminated, zmq.ZMQError, asyncio.CancelledError):
            return
        finally:
            self.close()

    def on_event(self, event: int, value: int, endpoint: str) -> None:
        follower = self.leader_address is not None
        if follower and event in (zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_CLOSED,
                                  zmq.EVENT_CONNECTED):
            self._attempt.add(event)
            return
        if follower and event == zmq.EVENT_CONNECT_RETRIED:
            self._retried()
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if follower and (not self.authenticated or self.failures):
                down = (f" after {time.monotonic() - self._cause_since:.1f}s down ({self.cause})"
                        if self.cause else "")
                if self.own_key:
                    log.info("authenticated the leader at %s (CURVE)%s%s", endpoint,
                             f" after {self.failures} failed handshake(s)" if self.failures
                             else "", down)
                elif self._was_down:
                    log.info("connected to the leader at %s%s", endpoint, down)
            self.authenticated = True
            self._next_retry_s = self.retry_s
            self.cause, self.cause_text, self._dropped, self.down_events = None, "", 0, 0
            return
        if event == zmq.EVENT_DISCONNECTED:
            if follower and self.authenticated:
                self._down("lost", logging.WARNING, f"lost the connection to the leader at "
                                                    f"{endpoint}; reconnecting")
            self.authenticated = False
            return
        if event not in _FAILED:
            return
        self.authenticated = False
        text = self._explain(event, value, endpoint)
        if text is None:
            return
        self.failures += 1
        self.last_failure = text
        self.on_failure(text)
        if follower:
            if event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._reconnect_later()
            self._down(f"handshake-{event}", logging.ERROR, text)
        else:
            self._log(event, logging.WARNING, text)

    def _retried(self) -> None:
        """Follower: libzmq gave up one connection attempt and will try again. Which events the
        attempt had tells why: none (no socket was even made: the host name did not resolve),
        or a socket that never connected (refused, unreachable)."""
        attempt, self._attempt = self._attempt, set()
        if zmq.EVENT_CONNECTED in attempt:
            return  # connected, then lost or refused in the handshake: said there
        address = self.leader_address or ""
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        if not attempt:
            self._down("unresolved", logging.ERROR,
                       f"cannot resolve the leader's host name {host.strip('[]')!r} (--leader "
                       f"{address}): check the name and this node's DNS; retrying")
        else:
            self._down("unreachable", logging.ERROR,
                       f"cannot connect to the leader at {address}: nothing accepts connections "
                       f"on {host}:{port} (refused or unreachable); is the leader's sidecar "
                       "running, and is the port open between the nodes? retrying")

    def _down(self, cause: str, level: int, text: str) -> None:
        """Follower: the link is down for ``cause``; logged once per cause (and at most every
        ``remind_s`` while it lasts)."""
        now = time.monotonic()
        self._was_down = True
        self.down_events += 1
        if cause != self.cause:
            if self.cause is None:
                self._cause_since = now
            self.cause, self.cause_text = cause, text
            self._cause_logged, self._cause_count = now, 0
            log.log(level, "%s", text)
            return
        self._cause_count += 1
        if now - self._cause_logged >= self.remind_s:
            log.log(level, "still: %s (%d more time(s) in the last %.0fs)", text,
                    self._cause_count, now - self._cause_logged)
            self._cause_logged, self._cause_count = now, 0

    def _reconnect_later(self) -> None:
        """Schedule a fresh connection to the leader address (backing off)."""
        if self._retry is None:
            delay = self._next_retry_s
            self._next_retry_s = min(2 * delay, self.max_retry_s)
            self._retry = asyncio.get_running_loop().call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._retry = None
        assert self.leader_address is not None
        try:
            try:
                self.sock.disconnect(self.leader_address)
            except zmq.ZMQError:
                pass  # libzmq already forgot the endpoint
            self.sock.connect(self.leader_address)
        except zmq.ZMQError as exc:  # the socket is closing
            log.debug("no reconnect to %s: %s", self.leader_address, exc)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _explain(self, event: int, value: int, endpoint: str) -> str | None:
        if self.leader_address is None:  # the leader's own socket
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return None  # the ZAP handler counted and logged the key
            return (f"a TCP peer on {endpoint} failed the CURVE handshake ("
                    f"{_failure_kind(event, value)}): a plain-TCP client, or a follower whose "
                    "leader.key is not this leader's")
        where = f"the leader address {endpoint or self.leader_address}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{where} refused this node's key {self.own_key} (ZAP status {value}): the "
                    f"leader's --curve-keys directory lacks {self.own_key}.key or holds another "
                    "key under that name")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (f"{where} does not complete a CURVE handshake ({_failure_kind(event, value)})"
                    ": it is not the leader, or a leader run with --insecure-plain-tcp; nothing "
                    "is exchanged with it")
        if not self.own_key:
            return (f"the handshake with {where} failed ({_failure_kind(event, value)}): this "
                    "node runs plain TCP (--insecure-plain-tcp); is the leader using CURVE keys?")
        return (f"CURVE handshake with {where} failed: the server there did not prove that it "
                "holds the leader's secret key: this node's leader.key does not match the "
                "leader's leader.key_secret (copy leader.key from the leader's key directory), or "
                "an impostor answers there; nothing is exchanged with it; retrying")

    def _log(self, kind: int, level: int, text: str) -> None:
        now = time.monotonic()
        last, suppressed = self._logged.get(kind, (-1e9, 0))
        if now - last < self.every_s:
            self._logged[kind] = (last, suppressed + 1)
            return
        self._logged[kind] = (now, 0)
        more = f" ({suppressed} more in the last {self.every_s:g}s)" if suppressed else ""
        log.log(level, "%s%s", text, more)


def _failure_kind(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"protocol error 0x{value & 0xffffffff:08x}"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"refused, status {value}"
    return f"connection closed during the handshake, errno {value}"
