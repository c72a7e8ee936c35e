"""Where the sockets of one node live: a private run directory holding ipc endpoints."""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Linux limits a unix socket path to 107 bytes (sun_path is 108 with the NUL).
MAX_IPC_PATH = 107


class RunDirError(RuntimeError):
    """The run directory is unusable; the message says how to fix it."""


class RunDirMissing(RunDirError):
    """The run directory does not exist (yet): no sidecar has made it."""


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
    """Create ``run_dir`` (mode 0700, or 0770 with ``group_access``, whatever the umask) or
    check an existing one (with ``group_access`` its set-group-ID bit is kept).

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
    if group_access:
        mode |= info.st_mode & stat.S_ISGID  # kept: the sockets take the directory's group
    if stat.S_IMODE(info.st_mode) != mode:  # mkdir's mode went through the umask
        try:
            os.chmod(run_dir, mode)
        except OSError as exc:
            raise RunDirError(f"run directory {run_dir} has mode "
                              f"{oct(stat.S_IMODE(info.st_mode))} and cannot be set to "
                              f"{oct(mode)}: {exc}") from None
    return run_dir


def group_access_from_env() -> bool:
    """``$EPLB_GROUP_ACCESS`` is 1, true, yes or on: the run directory is shared with a group."""
    return os.environ.get("EPLB_GROUP_ACCESS", "").strip().lower() in ("1", "true", "yes", "on")


def check_run_dir(run_dir: Path, group_access: bool = False) -> None:
    """A worker's check before it connects: ``run_dir`` (and its ``workers.sock``, once there)
    must belong to this user, so that no one else can stand in for the sidecar. With
    ``group_access`` they may belong to another user if their group is one of this process's
    groups and their modes are at most 0770 (directory) and 0660 (socket). A directory others
    can write to is always refused. Raises :class:`RunDirError` saying what to do."""
    run_dir = Path(run_dir)
    uid, groups = os.getuid(), {os.getgid(), os.getegid(), *os.getgroups()}
    fix = (f"use a run directory of your own (EPLB_RUN_DIR, or the hook's run_dir; the sidecar's "
           f"--run-dir), or, to share one with a group on purpose, start the sidecar with "
           f"--group-access and set EPLB_GROUP_ACCESS=1 for the workers")
    for path, kind, limit in ((run_dir, "run directory", 0o770),
                              (run_dir / "workers.sock", "socket", 0o660)):
        try:
            info = path.lstat()
        except FileNotFoundError:
            if kind == "socket":
                return  # the sidecar has not bound yet; its directory was checked
            raise RunDirMissing(f"run directory {run_dir} does not exist: start eplb-sidecar with "
                              f"--run-dir {run_dir} first") from None
        mode = info.st_mode & 0o777
        if kind == "run directory" and not stat.S_ISDIR(info.st_mode):
            raise RunDirError(f"{run_dir} is not a directory (a symlink or file is refused)")
        if kind == "socket" and not stat.S_ISSOCK(info.st_mode):
            raise RunDirError(f"{path} is not a unix socket; remove it and restart eplb-sidecar")
        if kind == "run directory" and mode & 0o002:
            raise RunDirError(f"run directory {run_dir} (mode {oct(mode)}) is writable by every "
                              f"user, so anyone could stand in for the sidecar; {fix}")
        if info.st_uid == uid:
            continue
        if not group_access:
            raise RunDirError(f"{kind} {path} belongs to uid {info.st_uid}, not to this user "
                              f"(uid {uid}), so it may not be this user's sidecar; {fix}")
        if info.st_gid not in groups:
            raise RunDirError(f"{kind} {path} belongs to uid {info.st_uid} and group "
                              f"{info.st_gid}, which is not one of this process's groups "
                              f"{sorted(groups)}; {fix}")
        if mode & ~limit:
            raise RunDirError(f"{kind} {path} of uid {info.st_uid} has mode {oct(mode)}, more "
                              f"open than {oct(limit)}; a shared run directory must be made by "
                              f"eplb-sidecar --group-access")
