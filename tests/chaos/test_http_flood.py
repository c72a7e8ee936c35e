"""bench/chaos/http_flood.py, small: 300 idle, slowloris, garbage and oversized connections against
one real sidecar, in batches of 150 (over the HTTP cap of 64 at once). The sidecar lives, /healthz
answers while a batch holds the cap and after every batch, and its fds and memory stay bounded."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "chaos"))

from http_flood import KINDS, flood, table  # noqa: E402

from eplb.coordinator.health import HttpLimits  # noqa: E402

CONNECTIONS = 300


def test_a_small_flood_crashes_nothing_and_leaves_fds_and_memory_bounded() -> None:
    result = flood(CONNECTIONS, seed=7, batch_size=150, time_limit_s=120)
    print(table(result, CONNECTIONS, 7))
    assert result.alive and not result.stopped_early
    tried = sum(result.opened.values()) + sum(result.connect_failed.values())
    assert tried == CONNECTIONS and set(result.opened) == set(KINDS)
    # a connect fails only when the kernel's accept queue overflows (a loaded machine)
    assert sum(result.connect_failed.values()) <= CONNECTIONS // 50
    assert result.after_failed == 0
    # every garbage and oversized connection was answered (400, 431) and closed at once
    assert result.closed["garbage"] == result.opened["garbage"]
    assert result.closed["oversized"] == result.opened["oversized"]
    before, most, after = result.fds
    assert most <= before + HttpLimits().max_connections + 4 and after <= before + 2
    rss_before, rss_most, _ = result.rss_kib
    assert rss_most <= rss_before + 32 * 1024  # KiB
    # the cap was reached: newcomers evicted the longest-waiting, and probes were served anyway
    assert result.server["eplb_http_connections_closed_total{reason=evicted}"] > 0
    assert result.under_load["failed"] == 0, result.under_load
    assert "eplb_http_connections_closed_total{reason=error}" not in result.server
