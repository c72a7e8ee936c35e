"""A blocking client for a sidecar's control endpoint (what ``eplbctl`` uses)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import zmq

from eplb.paths import control_endpoint, default_run_dir
from eplb.proto import ControlReply, ControlRequest, ProtocolError, decode, encode


class ControlError(RuntimeError):
    """The sidecar could not be asked, or said no; the message says what to check."""


def control_call(op: str, args: dict[str, Any] | None = None, run_dir: Path | None = None,
                 timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one control request and return the reply's ``result``.

    Raises:
        ControlError: no answer within ``timeout_s``, a bad answer, or ``ok`` false.
    """
    endpoint = control_endpoint(Path(run_dir) if run_dir else default_run_dir())
    if not Path(endpoint.removeprefix("ipc://")).exists():
        raise ControlError(f"no sidecar socket at {endpoint}; start eplb-sidecar, or pass the "
                           "--run-dir it uses")
    request = ControlRequest(request_id=uuid.uuid4().hex, op=op, args=args or {})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode(request))
        deadline_ms = int(timeout_s * 1000)
        while True:
            if not sock.poll(deadline_ms):
                raise ControlError(f"no answer from the sidecar at {endpoint} within "
                                   f"{timeout_s:g}s; is it running?")
            try:
                reply = decode(sock.recv())
            except ProtocolError as exc:
                raise ControlError(f"bad answer from the sidecar: {exc}") from None
            if isinstance(reply, ControlReply) and reply.request_id in (request.request_id, ""):
                break
    finally:
        sock.close()
    if not reply.ok:
        raise ControlError(reply.error)
    return reply.result
