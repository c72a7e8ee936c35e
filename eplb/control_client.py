"""A blocking client for a sidecar's control endpoint (what ``eplbctl`` uses)."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import zmq

from eplb.paths import RunDirError, control_endpoint, default_run_dir
from eplb.proto import ControlReply, ControlRequest, ProtocolError, decode, encode


class ControlError(RuntimeError):
    """The sidecar could not be asked, or said no; the message says what to check."""


class SidecarUnreachable(ControlError):
    """No sidecar could be asked: no socket, no permission, or no answer in time."""


def _check_access(run_dir: Path, socket_path: Path) -> None:
    """Raise :class:`SidecarUnreachable` saying what to do when this user cannot reach the
    control socket (a missing one, or a run directory of another user)."""
    me = os.getuid()
    fix = ("run eplbctl as the sidecar's user, or start the sidecar with --group-access and add "
           "this user to the run directory's group")
    try:
        info = socket_path.stat()
    except FileNotFoundError:
        raise SidecarUnreachable(f"no sidecar socket at {socket_path}; start eplb-sidecar, or "
                                 "pass the --run-dir it uses (or set EPLB_RUN_DIR)") from None
    except PermissionError:
        try:
            owner = run_dir.stat()
            whose = f"mode {stat.S_IMODE(owner.st_mode):04o}, owner uid {owner.st_uid}"
        except OSError:
            whose = "not readable"
        raise SidecarUnreachable(f"permission denied: this user (uid {me}) cannot open the run "
                                 f"directory {run_dir} ({whose}); {fix}") from None
    except OSError as exc:
        raise SidecarUnreachable(f"cannot reach {socket_path}: {exc}") from None
    if not os.access(socket_path, os.R_OK | os.W_OK):
        raise SidecarUnreachable(f"permission denied: this user (uid {me}) cannot use the control "
                                 f"socket {socket_path} (mode {stat.S_IMODE(info.st_mode):04o}, "
                                 f"owner uid {info.st_uid}); {fix}")


def control_call(op: str, args: dict[str, Any] | None = None, run_dir: Path | None = None,
                 timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one control request and return the reply's ``result``.

    Raises:
        SidecarUnreachable: no socket, no permission, or no answer within ``timeout_s``.
        ControlError: a bad answer, or ``ok`` false (the sidecar refused).
    """
    run_dir = Path(run_dir) if run_dir else default_run_dir()
    try:
        endpoint = control_endpoint(run_dir)
    except RunDirError as exc:
        raise SidecarUnreachable(str(exc)) from None
    _check_access(run_dir, Path(endpoint.removeprefix("ipc://")))
    request = ControlRequest(request_id=uuid.uuid4().hex, op=op, args=args or {})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode(request))
        deadline_ms = int(timeout_s * 1000)
        while True:
            if not sock.poll(deadline_ms):
                raise SidecarUnreachable(f"no answer from the sidecar at {endpoint} within "
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
