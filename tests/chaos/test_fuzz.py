"""A seeded run of bench/chaos/fuzz.py (20,000 frames over every socket of a 2 x 2 cluster, at
most 2,500 a second), with its goals as tests. The script runs once for the module (about a
minute on 2 cores, most of it starting the cluster and the final forced rebalance)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from chaos import run_chaos_script  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fuzz") / "report.json"
    return run_chaos_script("fuzz.py", ["--frames", "20000", "--seed", "1"], out, timeout_s=280)


def test_every_message_type_was_fuzzed(report: dict) -> None:
    from eplb.proto.messages import MESSAGE_TYPES

    assert not report["types_not_built"]
    assert set(report["message_types"]) == set(MESSAGE_TYPES)
    sockets = {key.split("|")[0] for key in report["sent"]}
    assert {"workers.sock n0", "workers.sock n1", "control.sock n0", "control.sock n1",
            "tcp-plain"} <= sockets
    # frames the leader's TCP port does not take in time stay in the fuzzer's own queue (its
    # per-peer receive cap pushes back); they were offered, and nothing crashed meanwhile
    held_back = sum(report["not_sent_hwm"].values())
    assert set(report["not_sent_hwm"]) <= {"tcp-plain"}, report["not_sent_hwm"]
    assert sum(report["sent"].values()) + held_back >= 19000
    # the leader's TCP port takes only a small share of what is offered (5-12 % seen; why is not
    # known yet, see the issue-13 note), but it must take some
    assert sum(v for k, v in report["sent"].items() if k.startswith("tcp-plain")) > 0


@pytest.mark.parametrize("goal", ["no crashes", "workers kept stepping", "forced rebalance committed",
                                  "rejected counters grew"])
def test_goal(report: dict, goal: str) -> None:
    assert report["goals"][goal], report["stdout"][-4000:]


def test_rss_growth_is_bounded(report: dict) -> None:
    goal = next(g for g in report["goals"] if g.startswith("RSS growth"))
    assert report["goals"][goal], report["rss_kib"]
