"""The sidecar's HTTP endpoints, served from a thread off the event loop.

- ``/metrics``: Prometheus text format (the registry of :mod:`eplb.coordinator.metrics`).
- ``/healthz``: 200 while the event loop is responsive: its tick stamps a heartbeat, and a
  heartbeat older than ``stale_after_s`` answers 503. A stuck loop cannot hide behind a live
  HTTP thread.
- ``/readyz``: 200 when the loop says ready (workers joined, leader reachable, not stopping),
  else 503 with the reason.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("eplb.http")


class HealthState:
    """What the loop tells the HTTP thread. Plain attribute writes, read under a lock for a
    consistent pair (ready, reason)."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._beat = time.monotonic()
        self._ready = False
        self._why = "starting"
        self._lock = threading.Lock()

    def beat(self) -> None:
        """Called by the event loop on every tick."""
        self._beat = time.monotonic()

    def set_ready(self, ready: bool, why: str) -> None:
        with self._lock:
            self._ready, self._why = ready, why

    def liveness(self) -> tuple[bool, str]:
        age = time.monotonic() - self._beat
        if age > self.stale_after_s:
            return False, f"event loop unresponsive: last tick {age:.1f}s ago " \
                          f"(limit {self.stale_after_s:g}s)\n"
        return True, f"ok: last tick {age * 1e3:.0f} ms ago\n"

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            ready, why = self._ready, self._why
        alive, text = self.liveness()
        if not alive:
            return False, text
        return ready, (why or "ready") + "\n"


class HttpEndpoints:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``(host, port)``; port 0 picks one.

    Raises:
        OSError: from :meth:`start`, when the address cannot be bound.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 state: HealthState) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self.state = state
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread. Returns the bound (host, port)."""
        endpoints = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "eplb-sidecar"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, generate_latest(endpoints.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, text = endpoints.state.liveness()
                    self._answer(200 if ok else 503, text.encode())
                elif path == "/readyz":
                    ok, text = endpoints.state.readiness()
                    self._answer(200 if ok else 503, text.encode())
                else:
                    self._answer(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _answer(self, code: int, body: bytes,
                        content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

        server_class = http.server.ThreadingHTTPServer
        if ":" in self.host:  # an IPv6 address
            server_class = type("ThreadingHTTPServer6", (server_class,),
                                {"address_family": socket.AF_INET6})
        server = server_class((self.host, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="eplb-http", daemon=True)
        self._thread.start()
        host, port = server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
