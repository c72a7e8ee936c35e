"""Helpers shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from eplb.control_client import control_call
from eplb.demo.cluster import LocalCluster


def _commit_once(cluster: LocalCluster) -> dict:
    """Force rebalances until one commits (a plan equal to the placement is skipped); returns
    the leader's status then."""
    for _ in range(5):
        before = cluster.status()
        control_call("rebalance", {"force": True}, cluster.run_dir(0))
        status = cluster.wait_for(lambda s: len(s["history"]) > len(before["history"])
                                  and s["epoch_in_flight"] is None, 30, "epoch finished")
        if status["history"][-1]["outcome"] == "committed":
            return status
        assert status["history"][-1]["outcome"] == "skipped", status["history"][-1]
    raise AssertionError(f"no rebalance committed: {status['history']}")


@pytest.fixture()
def commit_once() -> Callable[[LocalCluster], dict]:
    """``commit_once(cluster)``: force rebalances until one commits; the leader's status."""
    return _commit_once
