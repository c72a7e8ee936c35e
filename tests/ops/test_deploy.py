"""deploy/: the systemd unit passes ``systemd-analyze verify`` with no warnings, the Kubernetes
manifests pass ``kubernetes-validate --strict`` offline, and the settings they carry are options
the sidecar accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eplb.coordinator.cli import config_from_argv
from eplb.coordinator.health import HttpLimits
from eplb.coordinator.options import OPTIONS, markdown_table

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "systemd" / "eplb-sidecar.service"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
#: The oldest Kubernetes with native sidecars on by default, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")
KNOWN_ENV = {o.env for o in OPTIONS} | {"EPLB_CONFIG"}
SIDECAR = Path(sys.executable).parent / "eplb-sidecar"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if sys.platform != "linux":
            pytest.skip("systemd-analyze exists on Linux only")
        pytest.fail("systemd-analyze is missing: install systemd (apt-get install systemd); "
                    "./dev test does so when it runs as root with apt-get")
    return found


def verify(unit_text: str, tmp_path: Path, name: str = "eplb-sidecar.service") -> str:
    """``systemd-analyze verify`` of ``unit_text``; returns everything it printed."""
    path = tmp_path / name
    path.write_text(unit_text)
    proc = subprocess.run([systemd_analyze(), "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60)
    return f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}".strip()


def installed_unit() -> str:
    """The unit with ExecStart pointing at this venv's eplb-sidecar: verify checks that the
    binary exists, and /opt/eplb/venv (where deploy/README.md installs it) does not exist here."""
    text = UNIT.read_text()
    assert "\nExecStart=/opt/eplb/venv/bin/eplb-sidecar\n" in text
    assert SIDECAR.exists(), SIDECAR
    return text.replace("ExecStart=/opt/eplb/venv/bin/eplb-sidecar", f"ExecStart={SIDECAR}")


def test_systemd_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    assert verify(installed_unit(), tmp_path) == "rc=0"


def test_the_verify_check_does_catch_warnings(tmp_path: Path) -> None:
    broken = installed_unit().replace("WatchdogSec=10", "WatchdogSec=ten\nRestartSecs=2")
    out = verify(broken, tmp_path)
    assert "Failed to parse sec value" in out and "Unknown key" in out, out


def test_systemd_unit_has_what_the_daemon_relies_on() -> None:
    unit = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), re.M))
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert int(unit["WatchdogSec"]) > 0
    assert unit["RuntimeDirectory"] == "eplb" and unit["RuntimeDirectoryMode"] == "0770"
    # the leader's decision log lives in the run directory and must survive a restart
    assert unit["RuntimeDirectoryPreserve"] == "yes"
    assert unit["KillMode"] == "mixed"
    # far above the HTTP cap plus ZeroMQ's sockets: libzmq aborts when it gets no fd
    assert int(unit["LimitNOFILE"]) >= 4096 > HttpLimits().max_connections * 8
    grace = config_from_argv([], {"EPLB_CONFIG": str(DEPLOY / "systemd" / "sidecar.toml"),
                                  "EPLB_NODE_RANK": "0"}).grace_s
    assert grace < int(unit["TimeoutStopSec"])


def test_example_config_files_are_valid(tmp_path: Path) -> None:
    env = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "sidecar.env").read_text()
               .splitlines() if line and not line.startswith("#"))
    cfg = config_from_argv([], {**env, "EPLB_CONFIG": str(DEPLOY / "systemd" / "sidecar.toml")})
    assert cfg.node_rank == 0 and cfg.num_nodes == 2 and cfg.expected_workers == 8
    config_map = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    toml = tmp_path / "sidecar.toml"
    toml.write_text(config_map["data"]["sidecar.toml"])
    cfg = config_from_argv([], {"EPLB_CONFIG": str(toml), "EPLB_NODE_RANK": "1"})
    assert cfg.leader_address == "tcp://eplb-leader:5555" and cfg.http == ("0.0.0.0", 9750)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_strict_offline_validation(version: str) -> None:
    assert MANIFESTS, DEPLOY
    validator = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run([str(validator), "--strict", "-k", version, *map(str, MANIFESTS)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARN" not in proc.stdout + proc.stderr


def test_strict_validation_does_reject_an_unknown_field(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text((DEPLOY / "k8s" / "statefulset-decode.yaml").read_text()
                      .replace("\n          restartPolicy: Always\n",
                               "\n          restartPolicy: Always\n          restartPolicyy: x\n"))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run([str(validator), "--strict", "-k", K8S_VERSIONS[0], str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "restartPolicyy" in proc.stdout + proc.stderr


def resources() -> dict[tuple[str, str], dict]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_the_decode_pod_runs_the_sidecar_as_a_native_sidecar_with_probes() -> None:
    res = resources()
    pod = res[("StatefulSet", "decode")]["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert all(sidecar[p]["httpGet"]["port"] == "eplb-http"
               for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    env = {e["name"]: e for e in sidecar["env"]}
    assert set(env) <= KNOWN_ENV, set(env) - KNOWN_ENV
    assert "pod-index" in env["EPLB_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    # the ipc run dir: one emptyDir in both containers, the same EPLB_RUN_DIR
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["eplb-run"]
    (engine,) = pod["containers"]
    run_dir = env["EPLB_RUN_DIR"]["value"]
    assert {e["name"]: e.get("value") for e in engine["env"]}["EPLB_RUN_DIR"] == run_dir
    for container in (sidecar, engine):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert run_dir.startswith(mounts["eplb-run"] + "/")
    # the CURVE keys come from the Secret, mounted where EPLB_CURVE_KEYS points
    assert volumes["eplb-curve-keys"]["secret"]["secretName"] == "eplb-curve-keys"
    assert ("Secret", "eplb-curve-keys") in res
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts["eplb-curve-keys"] == env["EPLB_CURVE_KEYS"]["value"]
    # the config file, and the port the ConfigMap's http setting opens
    assert env["EPLB_CONFIG"]["value"].startswith(mounts["eplb-config"] + "/")
    assert ports["eplb-http"] == 9750 and ports["eplb-peer"] == 5555
    # the leader: a headless Service in front of pod 0, reachable before it is Ready
    leader = res[("Service", "eplb-leader")]["spec"]
    assert leader["clusterIP"] == "None" and leader["publishNotReadyAddresses"] is True
    assert leader["selector"]["statefulset.kubernetes.io/pod-name"] == "decode-0"
    assert leader["ports"][0]["port"] == 5555
    assert pod["terminationGracePeriodSeconds"] > 10


def test_deploy_readme_documents_every_option() -> None:
    text = (DEPLOY / "README.md").read_text()
    for opt in OPTIONS:
        assert f"| `{opt.flag}` | `{opt.env}` |" in text, opt.name
    assert markdown_table() in text, "regenerate the table: see markdown_table's docstring"
