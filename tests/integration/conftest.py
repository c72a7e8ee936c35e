"""Helpers shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from eplb.demo.cluster import LocalCluster


@pytest.fixture()
def commit_once() -> Callable[[LocalCluster], dict]:
    """``commit_once(cluster)``: force rebalances until one commits; the leader's status."""
    return LocalCluster.commit_once
