"""``--group-access``: the sidecar's run directory is 0770 and its sockets 0660 whatever the
umask, and a worker of another user in the directory's group joins (with group access set;
without it, the hook refuses the other user's directory). Needs root to become another user."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import zmq

from eplb.demo.cluster import LocalCluster
from eplb.worker_hook import HookError, WorkerHook

NOBODY = 65534


def join_as(uid: int, gid: int, run_dir: Path, group_access: bool) -> tuple[int, str]:
    """Fork a child that becomes ``uid`` in group ``gid`` and joins as rank 0 of 1 (no exec:
    everything it needs is imported). Returns its exit code (0 joined, 3 refused) and what it
    said."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it
        code, text = 1, "crashed"
        try:
            os.close(read)
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            ctx = zmq.Context()  # not the parent's
            try:
                hook = WorkerHook(0, 1, 2, 4, 6, run_dir=run_dir, group_access=group_access,
                                  zmq_context=ctx)
                hook.wait_joined(20)
                hook.close()
                code, text = 0, "joined"
            except HookError as exc:
                code, text = 3, str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            text = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write, text.encode()[:4000])
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_group_access_gives_0770_0660_and_admits_another_user_of_the_group() -> None:
    base = Path(tempfile.mkdtemp(prefix="eplbg", dir="/tmp"))
    base.chmod(0o711)  # the other user must reach the run directory inside
    old_umask = os.umask(0o022)  # the usual one: it would give 0750 directories, 0755 sockets
    try:
        with LocalCluster(1, ["--planner", "thread", "--group-access"], base_dir=base) as cluster:
            cluster.start()
            cluster.wait_ready(60.0)
            run_dir = cluster.run_dir(0)
            assert stat.S_IMODE(run_dir.stat().st_mode) == 0o770
            for name in ("workers.sock", "control.sock"):
                assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o660, name
            group = run_dir.stat().st_gid
            assert join_as(NOBODY, group, run_dir, group_access=True) == (0, "joined")
            code, text = join_as(NOBODY, group, run_dir, group_access=False)
            assert code == 3 and "belongs to uid 0" in text and "EPLB_GROUP_ACCESS" in text
            # not in the group: the hook says so (and the socket would refuse it anyway)
            code, text = join_as(NOBODY, NOBODY, run_dir, group_access=True)
            assert code == 3 and "not one of this process's groups" in text, text
    finally:
        os.umask(old_umask)
        shutil.rmtree(base, ignore_errors=True)
