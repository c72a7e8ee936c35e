"""Where the sockets of one node live: a private run directory holding ipc endpoints."""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Linux limits a unix socket path to 107 bytes (sun_path is 108 with the NUL).
MAX_IPC_PATH = 107


class RunDirError(RuntimeError):
    """The run directory is unusable; the message says how to fix it."""


def default_run_dir() -> Path:
    """``$EPLB_RUN_DIR``, else ``$XDG_RUNTIME_DIR/eplb``, else ``/tmp/eplb-<uid>``."""
    if os.environ.get("EPLB_RUN_DIR"):
        return Path(os.environ["EPLB_RUN_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "eplb"
    return Path(f"/tmp/eplb-{os.getuid()}")


def _ipc(run_dir: Path, name: str) -> str:
    path = str(Path(run_dir).absolute() / name)
    if len(path.encode()) > MAX_IPC_PATH:
        raise RunDirError(f"socket path {path!r} is longer than {MAX_IPC_PATH} bytes; "
                          "choose a shorter --run-dir")
    return f"ipc://{path}"


def workers_endpoint(run_dir: Path) -> str:
    """Where the sidecar's ROUTER for local workers listens."""
    return _ipc(run_dir, "workers.sock")


def control_endpoint(run_dir: Path) -> str:
    """Where ``eplbctl`` reaches the sidecar."""
    return _ipc(run_dir, "control.sock")


def ensure_private_dir(run_dir: Path, group_access: bool = False) -> Path:
    """Create ``run_dir`` (mode 0700, or 0770 with ``group_access``) or check an existing one.

    Refuses a directory owned by another user or open to others, since anyone who can reach the
    sockets can steer the rebalancing of the engine.
    """
    mode = 0o770 if group_access else 0o700
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(mode=mode, parents=True, exist_ok=True)
        info = run_dir.lstat()
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {run_dir}: {exc}; pass a writable "
                          "--run-dir") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RunDirError(f"{run_dir} is not a directory (a symlink or file is refused)")
    if info.st_uid != os.getuid():
        raise RunDirError(f"run directory {run_dir} belongs to uid {info.st_uid}, not to this user "
                          f"({os.getuid()}); use a directory of your own")
    allowed = mode
    if stat.S_IMODE(info.st_mode) & ~allowed:
        try:
            os.chmod(run_dir, mode)
        except OSError as exc:
            raise RunDirError(f"run directory {run_dir} has mode "
                              f"{oct(stat.S_IMODE(info.st_mode))} and cannot be tightened to "
                              f"{oct(mode)}: {exc}") from None
    return run_dir
