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
from eplb.curve import create_keys, load_keys

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
    assert cfg.leader_address == "tcp://eplb-leader:5555" and cfg.http == ("127.0.0.1", 9750)
    # the pod sets EPLB_HTTP to its IP (the downward API), for the probes and Prometheus
    env = {e["name"]: e for e in sidecar_container()["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["EPLB_HTTP"]["value"] == "$(POD_IP):9750"
    assert list(env).index("POD_IP") < list(env).index("EPLB_HTTP")  # defined before its use
    for pod_ip in ("10.1.2.3", "fd00::2:7"):
        cfg = config_from_argv([], {"EPLB_CONFIG": str(toml), "EPLB_NODE_RANK": "1",
                                    "EPLB_HTTP": env["EPLB_HTTP"]["value"].replace(
                                        "$(POD_IP)", pod_ip)})
        assert cfg.http == (pod_ip, 9750)


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


def pod_spec() -> dict:
    return resources()[("StatefulSet", "decode")]["spec"]["template"]["spec"]


def sidecar_container() -> dict:
    (sidecar,) = [c for c in pod_spec()["initContainers"] if c["name"] == "eplb-sidecar"]
    return sidecar


def test_the_decode_pod_runs_the_sidecar_as_a_native_sidecar_with_probes() -> None:
    res = resources()
    pod = pod_spec()
    keys, sidecar = pod["initContainers"]  # in this order: the keys are there when it starts
    assert keys["name"] == "eplb-keys" and "restartPolicy" not in keys
    assert sidecar["restartPolicy"] == "Always"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert all(sidecar[p]["httpGet"]["port"] == "eplb-http"
               for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    env = {e["name"]: e for e in sidecar["env"]}
    assert set(env) <= KNOWN_ENV | {"POD_IP"}, set(env) - KNOWN_ENV
    assert "pod-index" in env["EPLB_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    # the ipc run dir: one emptyDir in both containers, the same EPLB_RUN_DIR
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["eplb-run"]
    (engine,) = pod["containers"]
    assert not {"eplb-curve-all", "eplb-curve-keys"} & {m["name"] for m in engine["volumeMounts"]}
    run_dir = env["EPLB_RUN_DIR"]["value"]
    assert {e["name"]: e.get("value") for e in engine["env"]}["EPLB_RUN_DIR"] == run_dir
    for container in (sidecar, engine):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert run_dir.startswith(mounts["eplb-run"] + "/")
    # the CURVE keys: eplb-keys copies this node's from the per-node Secrets into an in-memory
    # volume, the only key volume the sidecar mounts, where EPLB_CURVE_KEYS points
    assert volumes["eplb-curve-keys"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts["eplb-curve-keys"] == env["EPLB_CURVE_KEYS"]["value"] == "/etc/eplb/curve"
    assert "eplb-curve-all" not in mounts
    assert {m["name"]: m["mountPath"] for m in keys["volumeMounts"]} == {
        "eplb-curve-all": "/etc/eplb/curve-all", "eplb-curve-keys": "/etc/eplb/curve"}
    sources = [s["secret"]["name"] for s in volumes["eplb-curve-all"]["projected"]["sources"]]
    replicas = res[("StatefulSet", "decode")]["spec"]["replicas"]
    assert sources == ["eplb-curve-public", "eplb-curve-leader",
                       *(f"eplb-curve-node-{k}" for k in range(1, replicas))]
    assert all(("Secret", name) in res for name in sources)
    toml = res[("ConfigMap", "eplb-sidecar")]["data"]["sidecar.toml"]
    assert re.search(rf"^num-nodes = {replicas}\b", toml, re.M), "num-nodes != replicas"
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


def keys_script(src: Path, dst: Path) -> str:
    """The eplb-keys init container's script, reading ``src`` and writing ``dst``."""
    (keys,) = [c for c in pod_spec()["initContainers"] if c["name"] == "eplb-keys"]
    assert keys["command"] == ["/bin/sh", "-c"]
    script = keys["args"][0]
    assert "$(" not in script  # Kubernetes would expand $(NAME) itself
    line = "src=/etc/eplb/curve-all; dst=/etc/eplb/curve;"
    assert line in script
    return script.replace(line, f"src={src}; dst={dst};")


def test_each_pod_gets_only_its_own_node_keys_and_they_load(tmp_path: Path) -> None:
    """The eplb-keys script under sh, on the files of the per-node Secrets (as their projected
    volume shows them) for 3 nodes: each node's result loads, and holds no other node's secret."""
    made = tmp_path / "made"
    create_keys(made, 3)
    src = tmp_path / "all"  # what the Secrets of deploy/README.md step 2 hold, as symlinks
    (src / "..data").mkdir(parents=True)
    for path in made.iterdir():
        shutil.copy(path, src / "..data" / path.name)
        (src / path.name).symlink_to(Path("..data") / path.name)
    expected = {0: {"leader.key_secret", "node-1.key", "node-2.key"},
                1: {"leader.key", "node-1.key_secret"}, 2: {"leader.key", "node-2.key_secret"}}
    for node, files in expected.items():
        dst = tmp_path / f"pod{node}"
        dst.mkdir()
        proc = subprocess.run(["sh", "-c", keys_script(src, dst)], capture_output=True,
                              text=True, timeout=30, env={"EPLB_NODE_RANK": str(node),
                                                          "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        assert {p.name for p in dst.iterdir()} == files
        assert all(p.stat().st_mode & 0o777 == 0o400 and not p.is_symlink()
                   for p in dst.iterdir())
        keys = load_keys(dst, node, 3)
        assert not keys.warnings and not keys.shared
    missing = tmp_path / "pod3"
    missing.mkdir()
    proc = subprocess.run(["sh", "-c", keys_script(src, missing)], capture_output=True, text=True,
                          timeout=30, env={"EPLB_NODE_RANK": "3", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "node-3.key_secret from the Secret eplb-curve-node-3" \
        in proc.stderr, proc.stderr


def dockerfile_steps() -> list[tuple[str, str]]:
    """deploy/Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments out."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def test_dockerfile_makes_the_run_dir_for_its_user_and_installs_dependencies_first() -> None:
    """Static (no docker daemon in CI): the parent of EPLB_RUN_DIR exists and belongs to the user
    the image runs as, made before USER; the dependencies are installed from pyproject.toml alone,
    before the README and the code are copied (their edits do not rebuild that layer)."""
    steps = dockerfile_steps()
    user = next(i for i, (word, _) in enumerate(steps) if word == "USER")
    uid = steps[user][1].split(":")[0]
    env = " ".join(rest for word, rest in steps if word == "ENV")
    run_dir = Path(re.search(r"EPLB_RUN_DIR=(\S+)", env).group(1))
    runs = [(i, rest) for i, (word, rest) in enumerate(steps) if word == "RUN"]
    made = [i for i, rest in runs if f"mkdir -p {run_dir.parent}" in rest
            and f"chown {uid}:{uid} {run_dir.parent}" in rest]
    assert made and made[0] < user, "the run directory's parent is made, for uid " + uid
    copies = [(i, rest) for i, (word, rest) in enumerate(steps) if word == "COPY"]
    first_copy = copies[0]
    assert first_copy[1] == "pyproject.toml ./", first_copy
    deps = next(i for i, rest in runs if "pip install -r requirements.txt" in rest)
    assert first_copy[0] < deps
    for i, rest in copies[1:]:
        assert i > deps, f"COPY {rest} comes before the dependency layer"
    assert any("README.md" in rest for _, rest in copies[1:])
    final = next(i for i, rest in runs if "pip install --no-deps ." in rest)
    assert final > max(i for i, _ in copies) and final < user


def test_the_dockerfile_dependency_step_reads_pyproject() -> None:
    """The one-liner the Dockerfile runs, run here on this pyproject.toml: it lists the runtime
    dependencies, numpy among them (torch warns at import without it)."""
    (cmd,) = [rest for word, rest in dockerfile_steps()
              if word == "RUN" and "pip install -r requirements.txt" in rest]
    code = re.search(r'python -c "(.*?)"', cmd).group(1)  # as the shell passes it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60, cwd=DEPLOY.parent)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split(">")[0].split(";")[0].strip() for line in proc.stdout.splitlines()]
    assert {"torch", "pyzmq", "numpy", "msgpack"} <= set(listed), listed


def test_numpy_is_a_runtime_dependency_and_matplotlib_an_extra() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("numpy") for d in project["dependencies"])
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
