"""The sidecar's HTTP endpoints, served from its event loop with h11 (sans-IO HTTP/1.1).

- ``/metrics``: Prometheus text format (the registry of :mod:`eplb.coordinator.metrics`).
- ``/healthz``: 200 while the tick loop runs: each tick stamps a heartbeat, and a heartbeat older
  than ``stale_after_s`` answers 503. A loop blocked outright answers nothing at all, which a probe
  counts as a failure too.
- ``/readyz``: 200 when the loop says this sidecar is ready from its local state alone (it serves
  its workers' socket, the expected local workers joined, it is not stopping), else 503 with the
  reason. It never depends on another node: a native sidecar's readiness is its pod's, and the
  leader being down must not take every decode pod out of its Services.
- ``/readyz?leader=1``: the group's view as well: on a follower, the leader was heard within
  ``--node-timeout``; on the leader, the instance is not unsafe. For people and scripts, not for a
  kubelet probe (``eplb_leader_reachable`` and the alert rules watch the leader).

The server cannot be exhausted (issue 13): it holds at most ``max_connections`` connections (one
file descriptor each). At the cap a new connection evicts the one that has waited longest for a
request (an idle or slow client), so a probe that sends its request at once is served through a
flood of idle connections; only when every connection is busy answering is the newcomer closed
unread. Both are counted. A request must be
complete within ``request_timeout_s``, a kept-alive connection may idle ``idle_timeout_s`` between
requests, and the request head is at most ``max_header_bytes``. Only GET and HEAD are served.
:func:`route` decides every answer from the request alone; :class:`HttpEndpoints` only moves bytes
between h11 and the sockets, and no exception of one connection reaches the loop.
"""

from __future__ import annotations

import asyncio
import enum
import http
import logging
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from eplb.coordinator.metrics import HttpMetrics

log = logging.getLogger("eplb.http")

TEXT = "text/plain; charset=utf-8"
#: Bytes read from a socket at once.
READ_SIZE = 4096


class HealthState:
    """What the loop tells the HTTP server; both run on the loop, so plain attributes suffice."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._beat = time.monotonic()
        self._ready = False
        self._why = "starting"
        self._group_ready = False
        self._group_why = "starting"

    def beat(self) -> None:
        """Called by the tick loop on every tick."""
        self._beat = time.monotonic()

    def set_ready(self, ready: bool, why: str, group_ready: bool | None = None,
                  group_why: str = "") -> None:
        """Local readiness (``/readyz``) and, unless None, the group's (``/readyz?leader=1``,
        which is also never ready while the local one is not); without it, the group's
        follows the local one."""
        self._ready, self._why = ready, why
        if group_ready is None:
            self._group_ready, self._group_why = ready, why
        elif not ready:
            self._group_ready, self._group_why = False, why
        else:
            self._group_ready, self._group_why = group_ready, group_why or why

    def liveness(self) -> tuple[bool, str]:
        age = time.monotonic() - self._beat
        if age > self.stale_after_s:
            return False, f"event loop unresponsive: last tick {age:.1f}s ago " \
                          f"(limit {self.stale_after_s:g}s)\n"
        return True, f"ok: last tick {age * 1e3:.0f} ms ago\n"

    def readiness(self, leader: bool = False) -> tuple[bool, str]:
        """``/readyz`` (``leader`` False: local state only) or ``/readyz?leader=1``."""
        alive, text = self.liveness()
        if not alive:
            return False, text
        if leader:
            return self._group_ready, (self._group_why or "ready") + "\n"
        return self._ready, (self._why or "ready") + "\n"


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the server.

    Attributes:
        max_connections: connections open at once; one over it evicts the connection that has
            waited longest for a request, or is closed unread when none waits (both counted).
        request_timeout_s: seconds from when the server starts waiting for a request (accept, or
            the request's first byte on a kept-alive connection) to its complete head, and the
            most an answer may take to leave.
        idle_timeout_s: seconds a kept-alive connection may wait for the next request's first byte.
        max_header_bytes: bytes of request line and headers (h11's ``max_incomplete_event_size``).
    """

    max_connections: int = 64
    request_timeout_s: float = 5.0
    idle_timeout_s: float = 5.0
    max_header_bytes: int = 8192


class Closed(enum.Enum):
    """Why the server closed a connection (the ``reason`` label of
    ``eplb_http_connections_closed_total``)."""

    PEER = "peer"                        # the client closed or reset it
    ANSWERED = "answered"                # after an answer that ends the connection
    IDLE_TIMEOUT = "idle_timeout"        # no next request within idle_timeout_s
    REQUEST_TIMEOUT = "request_timeout"  # request incomplete within request_timeout_s
    WRITE_TIMEOUT = "write_timeout"      # the client did not take the answer in time
    MALFORMED = "malformed"              # not HTTP/1.1: answered 400
    TOO_LARGE = "too_large"              # request head over max_header_bytes: answered 431
    ERROR = "error"                      # a bug; logged with its traceback
    SHUTDOWN = "shutdown"                # the sidecar stopped
    EVICTED = "evicted"                  # waited longest for a request when the cap was reached


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = TEXT
    close: bool = False  # end the connection after this answer
    allow: str | None = None  # the Allow header of a 405


def route(method: bytes, target: bytes, state: HealthState,
          registry: CollectorRegistry) -> Answer:
    """The answer to one request (HEAD is answered as GET; the driver drops the body)."""
    if method not in (b"GET", b"HEAD"):
        return Answer(405, b"method not allowed: only GET and HEAD\n", close=True,
                      allow="GET, HEAD")
    path, _, query = target.partition(b"?")
    if path == b"/metrics":
        return Answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
    if path == b"/healthz":
        ok, text = state.liveness()
        return Answer(200 if ok else 503, text.encode())
    if path == b"/readyz":
        flags = parse_qs(query.decode("latin-1"), keep_blank_values=True)
        ok, text = state.readiness(leader=flags.get("leader", ["0"])[-1] not in ("0", "false"))
        return Answer(200 if ok else 503, text.encode())
    return Answer(404, b"not found: try /metrics, /healthz or /readyz\n")


class _Close(Exception):
    """Ends one connection; ``reason`` says why, ``answer`` is sent first when not None (without
    its body when ``head_only``: the answer to a HEAD)."""

    def __init__(self, reason: Closed, answer: Answer | None = None,
                 head_only: bool = False) -> None:
        super().__init__(reason.value)
        self.reason, self.answer, self.head_only = reason, answer, head_only


class HttpEndpoints:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``(host, port)``; port 0 picks one.
    Registers the ``eplb_http_*`` metrics in ``registry``.

    Raises:
        OSError: from :meth:`start`, when the address cannot be bound.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry, state: HealthState,
                 limits: HttpLimits = HttpLimits()) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self.state = state
        self.limits = limits
        self.metrics = HttpMetrics(registry)
        for reason in Closed:
            self.metrics.closed.labels(reason.value)
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._waiting: dict[asyncio.Task, float] = {}  # connections waiting for a request: since
        self._evicted: set[asyncio.Task] = set()

    async def start(self) -> tuple[str, int]:
        """Bind and serve on the running loop. Returns the bound (host, port)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                  limit=self.limits.max_header_bytes)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop listening and drop every open connection (their tasks end on the loop)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def _evict_longest_waiting(self) -> bool:
        """At the cap: close the connection that has waited longest for a request. Returns
        False when every connection is busy with a request (nothing to evict)."""
        if not self._waiting:
            return False
        victim = min(self._waiting, key=self._waiting.__getitem__)
        del self._waiting[victim]
        self._evicted.add(victim)
        self._connections.pop(victim).transport.abort()
        victim.cancel()
        self.metrics.closed.labels(Closed.EVICTED.value).inc()
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None or (len(self._connections) >= self.limits.max_connections
                                    and not self._evict_longest_waiting()):
            self.metrics.refused.inc()
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self.metrics.open.set(len(self._connections))
        # drain() returns only once the whole answer is with the kernel, so that the abort()
        # below (which drops what the transport still buffers) never cuts an answer short
        writer.transport.set_write_buffer_limits(high=0)
        reason = Closed.ERROR
        try:
            reason = await self._converse(reader, writer)
        except _Close as stop:  # from _send
            reason = stop.reason
        except asyncio.CancelledError:  # close() or an eviction: the server's own task ends here
            reason = Closed.SHUTDOWN
        except OSError as exc:  # the client reset the connection, or left mid-answer
            reason = Closed.PEER
            log.debug("http: connection error: %s", exc)
        except Exception:  # a bug: this connection ends, the sidecar goes on
            log.exception("http: a connection failed")
        finally:
            writer.transport.abort()
            self._waiting.pop(task, None)
            if task in self._evicted:  # already closed and counted by the eviction
                self._evicted.discard(task)
            else:
                del self._connections[task]
                self.metrics.closed.labels(reason.value).inc()
            self.metrics.open.set(len(self._connections))

    async def _converse(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> Closed:
        """Serve requests on one connection until it ends; returns why it ended."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        idle_s: float | None = None  # a fresh connection: request_timeout_s for all of it
        while True:
            try:
                request = await self._read_head(conn, reader, idle_s)
            except _Close as stop:
                if stop.answer is not None:
                    await self._send(conn, writer, stop.answer, stop.head_only)
                return stop.reason
            if request is None:
                return Closed.PEER
            answer = route(request.method, request.target, self.state, self.registry)
            await self._send(conn, writer, answer, head_only=request.method == b"HEAD")
            if not _skip_body(conn) or conn.our_state is not h11.DONE:
                return Closed.ANSWERED  # a closing answer, HTTP/1.0, Connection: close, a body
            conn.start_next_cycle()
            idle_s = self.limits.idle_timeout_s

    async def _read_head(self, conn: h11.Connection, reader: asyncio.StreamReader,
                         idle_s: float | None) -> h11.Request | None:
        """The next request's line and headers; None when the client closed the connection
        between requests. ``idle_s``: seconds to wait for its first byte (None: a fresh
        connection, whose whole request must come within request_timeout_s).

        Raises:
            _Close: on a timeout, or a request h11 rejects (with the 400 or 431 answer to send).
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = loop.time()
        try:
            return await self._wait_for_head(conn, reader, idle_s)
        finally:
            self._waiting.pop(task, None)

    async def _wait_for_head(self, conn: h11.Connection, reader: asyncio.StreamReader,
                             idle_s: float | None) -> h11.Request | None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # request_timeout_s from the first byte
        if idle_s is None or conn.trailing_data[0]:
            deadline = loop.time() + self.limits.request_timeout_s
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.their_state is h11.ERROR and reader.at_eof():
                    raise _Close(Closed.PEER) from None  # it left in mid-request: none to tell
                reason = Closed.TOO_LARGE if exc.error_status_hint == 431 else Closed.MALFORMED
                raise _Close(reason, Answer(exc.error_status_hint, f"bad request: {exc}\n"
                                            .encode(), close=True)) from None
            if isinstance(event, h11.Request):
                # h11 caps only a head still incomplete in its buffer; one that came whole in a
                # read is measured here
                if _head_bytes(event) > self.limits.max_header_bytes:
                    raise _Close(Closed.TOO_LARGE, Answer(431, b"request head too large\n",
                                                          close=True), event.method == b"HEAD")
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert event is h11.NEED_DATA, event  # h11's only other events follow a Request
            if deadline is None:
                wait_s, why = idle_s, Closed.IDLE_TIMEOUT
            else:
                wait_s, why = deadline - loop.time(), Closed.REQUEST_TIMEOUT
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), max(wait_s, 0.0))
            except asyncio.TimeoutError:
                raise _Close(why) from None
            if deadline is None:
                deadline = loop.time() + self.limits.request_timeout_s
            conn.receive_data(data)

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, answer: Answer,
                    head_only: bool) -> None:
        headers = [("Content-Type", answer.content_type),
                   ("Content-Length", str(len(answer.body))), ("Server", "eplb-sidecar")]
        if answer.allow:
            headers.append(("Allow", answer.allow))
        if answer.close:
            headers.append(("Connection", "close"))
        writer.write(conn.send(h11.Response(status_code=answer.status, headers=headers,
                                            reason=http.HTTPStatus(answer.status).phrase)))
        if not head_only:
            writer.write(conn.send(h11.Data(data=answer.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        self.metrics.answers.labels(str(answer.status)).inc()
        try:
            await asyncio.wait_for(writer.drain(), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise _Close(Closed.WRITE_TIMEOUT) from None


def _skip_body(conn: h11.Connection) -> bool:
    """Consume the rest of a request whose answer was sent; True when the client's side is done
    (a GET's empty body), False when a body is still on its way or the rest is malformed: then
    the connection closes rather than reading a body no endpoint wants."""
    try:
        while conn.their_state is h11.SEND_BODY:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return False
    except h11.RemoteProtocolError:
        return False
    return conn.their_state is h11.DONE


def _head_bytes(request: h11.Request) -> int:
    """The size of a request's line and headers as sent, give or take optional whitespace."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2
