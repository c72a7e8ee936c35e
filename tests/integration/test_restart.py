"""A sidecar that restarts (systemd, a crashed pod) must not leave its workers out for good:
they are asked to say HELLO again and the next rebalance commits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eplb.demo.cluster import LocalCluster
from eplb.worker_hook import WorkerHook

L, E, P, WORLD = 2, 4, 6, 2


@pytest.fixture()
def cluster():
    base = Path("/tmp") / f"eplbr-{os.getpid()}"
    # greedy plans from scratch, so a forced rebalance always changes the placement; stable
    # (the default) may rightly keep a placement that is already balanced.
    with LocalCluster(2, ["--interval", "1000000", "--planner", "thread", "--window", "100",
                          "--policy", "greedy",
                          "--worker-timeout", "2", "--node-timeout", "2"], base_dir=base) as c:
        c.start()
        c.wait_ready(60.0)
        yield c


def restart(cluster: LocalCluster, node: int) -> None:
    cluster.sidecars[node].kill()
    cluster.sidecars[node].wait(10)
    cluster.start_sidecar(node)


def test_workers_rejoin_after_a_follower_and_then_the_leader_restart(cluster, decode_loop,
                                                                     commit_once) -> None:
    copies: list = []
    hooks = [WorkerHook(r, WORLD, L, E, P, node=r, run_dir=cluster.run_dir(r), flush_every=2,
                        copy_fn=lambda e, layers, old, new: copies.append((e, layers)))
             for r in range(WORLD)]
    for h in hooks:
        h.wait_joined(30)
    loop = decode_loop(hooks, hot=lambda step: (step // 50) % E)

    def commit() -> dict:
        status = commit_once(cluster)
        assert copies and copies[-1][0] == status["history"][-1]["epoch"]
        return status

    first = commit()

    joined = first["counters"]["joined"]
    restart(cluster, 1)  # the follower: rank 1's sidecar
    status = cluster.wait_for(lambda s: s["workers"] == [0, 1] and s["counters"]["joined"] > joined,
                              30, "rank 1 joined again")
    assert status["placement_hash"] == first["placement_hash"]  # nothing changed meanwhile
    commit()

    restart(cluster, 0)  # the leader: every rank must join again, with its current placement
    cluster.wait_ready(30)
    status = cluster.wait_for(lambda s: s["workers"] == [0, 1], 30, "both ranks joined the new leader")
    from eplb.placement.rules import placement_hash

    assert status["placement_hash"] == placement_hash(hooks[0].phys2log)
    commit()
    assert not loop.errors
