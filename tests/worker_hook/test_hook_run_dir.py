"""A hook joins only a sidecar of its own user (or, with group access, of its group): a run
directory another user made (say, ``/tmp/eplb-<uid>`` made first by someone else) is refused
with a message that says what to do. Changing owners needs root; the tests skip otherwise."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import zmq

from eplb.paths import RunDirError, check_run_dir, workers_endpoint
from eplb.worker_hook import HookError, WorkerHook

L, E, P = 2, 4, 8
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


def hook(run_dir: Path, **kwargs) -> WorkerHook:
    return WorkerHook(0, 2, L, E, P, run_dir=run_dir, **kwargs)


@pytest.fixture()
def run_dir():
    path = Path(f"/tmp/eplbd-{os.getpid()}")  # short: ipc paths are limited to 107 bytes
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@root_only
def test_a_run_directory_of_another_user_is_refused_with_what_to_do(run_dir: Path) -> None:
    os.chown(run_dir, NOBODY, NOBODY)
    with pytest.raises(HookError, match=rf"belongs to uid {NOBODY}.*run directory of your own"
                                        r".*EPLB_GROUP_ACCESS=1"):
        hook(run_dir)
    # group access does not help when the directory's group is not one of ours
    with pytest.raises(HookError, match="not one of this process's groups"):
        hook(run_dir, group_access=True)


@root_only
def test_a_stranger_s_socket_in_our_directory_is_refused(run_dir: Path) -> None:
    stranger = zmq.Context.instance().socket(zmq.ROUTER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.bind(workers_endpoint(run_dir))
    try:
        os.chown(run_dir / "workers.sock", NOBODY, NOBODY)
        with pytest.raises(HookError, match=rf"socket .*workers.sock belongs to uid {NOBODY}"):
            hook(run_dir)
    finally:
        stranger.close()


def test_a_directory_anyone_can_write_is_refused_even_with_group_access(run_dir: Path) -> None:
    os.chmod(run_dir, 0o777)
    for group_access in (False, True):
        with pytest.raises(HookError, match="writable by every user"):
            hook(run_dir, group_access=group_access)


@root_only
def test_group_access_admits_a_shared_directory_of_one_of_our_groups(
        run_dir: Path, monkeypatch) -> None:
    os.chown(run_dir, NOBODY, os.getgid())
    os.chmod(run_dir, 0o770)
    hook(run_dir, group_access=True).close()
    monkeypatch.setenv("EPLB_GROUP_ACCESS", "1")
    hook(run_dir).close()
    os.chmod(run_dir, 0o775)  # more open than a sidecar --group-access makes it
    with pytest.raises(HookError, match="more open than 0o770"):
        hook(run_dir)


@root_only
def test_a_directory_made_by_another_user_after_the_hook_started_is_not_joined(
        run_dir: Path) -> None:
    later = run_dir / "later"
    h = hook(later)  # no directory yet: the hook waits for the sidecar to make it
    stranger = None
    try:
        later.mkdir(mode=0o700)
        os.chown(later, NOBODY, NOBODY)
        stranger = zmq.Context.instance().socket(zmq.ROUTER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.bind(workers_endpoint(later))
        with pytest.raises(HookError, match=rf"will not connect.*belongs to uid {NOBODY}"):
            h.wait_joined(10)
        h._thread.join(5)
        assert not h._thread.is_alive()  # it stopped before connecting: nothing was sent
        assert stranger.poll(0) == 0
    finally:
        h.close()
        if stranger is not None:
            stranger.close()


def test_own_directory_and_socket_pass(run_dir: Path) -> None:
    check_run_dir(run_dir)
    with pytest.raises(RunDirError, match="does not exist"):
        check_run_dir(run_dir / "missing")
    (run_dir / "workers.sock").write_text("")
    with pytest.raises(RunDirError, match="not a unix socket"):
        check_run_dir(run_dir)
