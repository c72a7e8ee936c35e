"""deploy/prometheus and deploy/grafana against the real thing: ``promtool check rules`` and
``promtool test rules`` (deploy/prometheus/eplb-rules.test.yml: input series, expected alerts),
a real ``prometheus`` that scrapes a real 2-node cluster (2 sidecars, 4 demo workers, a committed
epoch) and answers a query for the balancedness series through its HTTP API, and the Grafana
dashboard: valid JSON whose every metric is in the sidecars' /metrics.

Prometheus and promtool come from the Debian package ``prometheus``: installed here when missing
and the tests run as root with apt-get (without starting the packaged service), else the tests
fail saying how to install them; they never skip."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eplb.demo.cluster import (LocalCluster, free_port, http_get, start_demo_cluster,
                               wait_until)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "eplb-rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "eplb-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "eplb.json"
#: The most any wait on Prometheus may take (it scrapes every second).
PATIENCE_S = 60.0


def _install_prometheus() -> None:
    """apt-get install prometheus, with a policy-rc.d that keeps its service from starting (when
    none exists; removed afterwards)."""
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    finally:
        if ours:
            policy.unlink()


def tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus``, installing the package when it is missing."""
    found = shutil.which(name)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_prometheus()
        found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install Prometheus (apt-get install prometheus, or the "
                    "release tarball from prometheus.io) so that prometheus and promtool are on "
                    "PATH")
    return found


def test_promtool_accepts_the_alert_rules() -> None:
    proc = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS: 5 rules found" in proc.stdout, \
        proc.stdout + proc.stderr


def test_the_alert_rules_fire_as_their_unit_tests_expect() -> None:
    proc = subprocess.run([tool("promtool"), "test", "rules", RULES_TEST.name],
                          capture_output=True, text=True, timeout=120, cwd=RULES_TEST.parent)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_test_does_catch_a_wrong_expectation(tmp_path: Path) -> None:
    shutil.copy(RULES, tmp_path / RULES.name)
    broken = tmp_path / RULES_TEST.name
    broken.write_text(RULES_TEST.read_text().replace("summary: \"eplb: instance unsafe on decode-0\"",
                                                     "summary: \"eplb: something else\""))
    proc = subprocess.run([tool("promtool"), "test", "rules", broken.name], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "EplbInstanceUnsafe" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """2 sidecars x 2 demo workers with one committed epoch, so that every metric has a value."""
    base = Path("/tmp") / f"eplbp-{os.getpid()}"  # short ipc paths
    with start_demo_cluster(base, 4, 2) as c:
        c.commit_once()
        yield c


def exported_names(url: str) -> set[str]:
    """Every series name a sidecar's /metrics declares or carries."""
    code, text = http_get(url + "/metrics")
    assert code == 200, text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(s.name for s in family.samples)
    return names


def dashboard_metrics() -> set[str]:
    """The metric names in the dashboard's queries (functions and labels are not matched: a
    metric name is followed by ``{``, and every query here selects by job)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert exprs
    found = set()
    for expr in exprs:
        found.update(re.findall(r"\b([a-z_][a-z0-9_]*)\{", expr))
        found.update(re.findall(r"label_values\(([a-z_][a-z0-9_]*)", expr))
    return found


def test_the_grafana_dashboard_queries_only_metrics_the_sidecars_export(
        cluster: LocalCluster) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    wanted = dashboard_metrics()
    assert {"eplb_balancedness", "eplb_unsafe", "eplb_leader_reachable",
            "eplb_moved_bytes_total", "process_resident_memory_bytes"} <= wanted
    exported = exported_names(cluster.http_address(0)) | exported_names(cluster.http_address(1))
    assert wanted <= exported, sorted(wanted - exported)


def test_the_alert_rules_use_only_metrics_the_sidecars_export(cluster: LocalCluster) -> None:
    exported = exported_names(cluster.http_address(0)) | exported_names(cluster.http_address(1))
    used = set(re.findall(r"\b((?:eplb|process)_[a-z0-9_]+)\b", RULES.read_text()))
    assert used and used <= exported, sorted(used - exported)


class Prometheus:
    """A real ``prometheus`` scraping ``targets`` every second, data in a temporary directory."""

    def __init__(self, base: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = base / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "eplb", "static_configs": [{"targets": targets}]}],
        }))
        self.log_path = base / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        code, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert code == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def stop(self) -> None:
        """SIGTERM this one process (its pid), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_a_real_prometheus_scrapes_the_sidecars_and_answers_for_balancedness(
        cluster: LocalCluster, tmp_path: Path) -> None:
    targets = [cluster.http_address(n).removeprefix("http://") for n in (0, 1)]
    prom = Prometheus(tmp_path, targets)
    try:
        started = time.monotonic()
        wait_until(lambda: _answers(prom), PATIENCE_S, "prometheus answering")

        def balancedness() -> list | None:
            result = prom.api("query", query='eplb_balancedness{job="eplb"}')["result"]
            return result or None
        (series,) = wait_until(balancedness, PATIENCE_S, "eplb_balancedness scraped")
        took = time.monotonic() - started
        assert series["metric"]["instance"] == targets[0]  # the leader's only
        assert 0 < float(series["value"][1]) <= 1

        def both_up() -> bool:  # the scrapes of the targets are spread over the interval
            up = prom.api("query", query='up{job="eplb"}')["result"]
            return sorted(s["metric"]["instance"] for s in up if s["value"][1] == "1") \
                == sorted(targets)
        wait_until(both_up, PATIENCE_S, "both sidecars scraped and up")
        # the follower reaches the leader; the rules loaded and nothing fires on a healthy cluster
        (reach,) = prom.api("query", query="eplb_leader_reachable")["result"]
        assert reach["metric"]["instance"] == targets[1] and reach["value"][1] == "1"
        wait_until(lambda: prom.api("query", query="eplb_moved_slots_total")["result"],
                   PATIENCE_S, "counters scraped")
        groups = prom.api("rules")["groups"]
        assert [g["name"] for g in groups] == ["eplb"] and len(groups[0]["rules"]) == 5
        assert all(r["health"] == "ok" for r in groups[0]["rules"]), groups
        assert prom.api("alerts")["alerts"] == []
        print(f"prometheus: balancedness {series['value'][1]} via /api/v1/query "
              f"{took:.1f}s after start")
    finally:
        prom.stop()
    assert prom.proc.returncode is not None


def _answers(prom: Prometheus) -> bool:
    try:
        return http_get(prom.url + "/-/ready", timeout_s=2.0)[0] == 200
    except OSError:
        if prom.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {prom.proc.returncode}:\n{prom.log()}")
        return False
