"""Every ``eplb-sidecar`` setting, once: flag, ``EPLB_*`` variable, TOML key, help and accepted
values (see :mod:`eplb.config`), and the translation of the effective settings into a
:class:`~eplb.coordinator.sidecar.SidecarConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from eplb.config import Option, Setting, format_value
from eplb.coordinator.agreement import AgreementTimeouts
from eplb.coordinator.leader import LeaderConfig
from eplb.placement.planner import POLICIES, PlannerSpec
from eplb.coordinator.sidecar import SidecarConfig
from eplb.paths import default_run_dir

#: Where /metrics, /healthz and /readyz listen unless told otherwise: loopback only. Another
#: host's Prometheus (or a kubelet's probes, which come to the pod IP) needs an explicit opt-in,
#: e.g. ``--http 0.0.0.0:9750`` or ``:9750``.
DEFAULT_HTTP = "127.0.0.1:9750"


def _tcp_address(value: str) -> str | None:
    host, sep, port = value.removeprefix("tcp://").rpartition(":")
    if not value.startswith("tcp://") or not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        return "tcp://HOST:PORT (e.g. tcp://10.0.0.1:5555)"
    return None


def parse_http(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``:PORT`` (all interfaces) -> (host, port); ``off`` -> None. Port 0 picks
    a free port (the daemon logs it and ``eplbctl status --local`` shows it)."""
    if value.strip().lower() in ("off", "none", "disabled"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(value)
    return host.strip("[]") or "0.0.0.0", int(port)


def _http(value: str) -> str | None:
    try:
        parse_http(value)
    except ValueError:
        return "HOST:PORT, :PORT (all interfaces; port 0 picks a free one) or off"
    return None


CLUSTER = "cluster"
POLICY = "rebalance policy (leader)"
TIMEOUTS = "timeouts (seconds)"
OPS = "operation: health, metrics, logs, shutdown"

OPTIONS: tuple[Option, ...] = (
    Option("node-rank", int, "index of this node; node 0 is the leader", CLUSTER, required=True,
           minimum=0, metavar="N"),
    Option("num-nodes", int, "number of nodes (sidecars)", CLUSTER, required=True, minimum=1,
           metavar="N"),
    Option("leader", str, "the leader's TCP address; followers connect to it", CLUSTER,
           required=True, check=_tcp_address, metavar="tcp://HOST:PORT",
           accepted_text="tcp://HOST:PORT"),
    Option("bind", str, "leader only: address to bind instead of --leader (e.g. tcp://0.0.0.0:5555); "
           "followers ignore it, so every node can share one config", CLUSTER,
           check=_tcp_address, metavar="tcp://HOST:PORT", accepted_text="tcp://HOST:PORT"),
    Option("run-dir", Path, "private directory for the ipc sockets the workers and eplbctl use",
           CLUSTER, default_text="$XDG_RUNTIME_DIR/eplb, else /tmp/eplb-UID", metavar="DIR"),
    Option("curve-keys", Path, "directory of CURVE certificates from `eplbctl keys DIR --nodes "
           "N`: the link is encrypted, the leader serves node K only with node K's key "
           "(node-K.key) and followers accept only the holder of leader.key_secret; required "
           "with more than one node unless --insecure-plain-tcp", CLUSTER, metavar="DIR"),
    Option("insecure-plain-tcp", bool, "run the TCP link between sidecars without CURVE "
           "(unencrypted, unauthenticated: anyone reaching the port can pose as any node); for "
           "a trusted network only, logged as a warning at start", CLUSTER, default=False),
    Option("per-worker-relay", bool, "follower: relay every worker frame to the leader as it "
           "came, instead of one frame per node (counts summed over the node's workers, their "
           "PLAN_ACK, PROMISE and DONE answered together); costs the leader CPU per rank "
           "instead of per node: for comparison and debugging", CLUSTER, default=False),
    Option("group-access", bool, "make the run directory 0770 instead of 0700 (workers in the "
           "same group)", CLUSTER, default=False),
    Option("interval", int, "decode steps between rebalance attempts", POLICY, default=1000,
           minimum=1),
    Option("window", int, "decode steps of counts the planner looks at", POLICY, default=1000,
           minimum=1),
    Option("min-gain", float, "skip a rebalance whose predicted balancedness gain is below this",
           POLICY, default=0.01, minimum=0, maximum=1),
    Option("min-margin", int, "fewest steps between the highest reported step and the switch step "
           "S (grows with the measured round trip and step rate)", POLICY, default=2, minimum=2),
    Option("max-retries", int, "new epochs after a refused or timed-out one, each with twice the "
           "margin", POLICY, default=3, minimum=0),
    Option("layers-per-step", int, "most layers copied per decode step after S", POLICY, default=1,
           minimum=1),
    Option("bytes-per-step", int, "also cap the bytes the busiest rank receives per decode step "
           "after S (a layer above the cap goes alone); 0 = no byte cap", POLICY, default=0,
           minimum=0),
    Option("policy", str, "placement policy: stable (keep the current placement, change the "
           "fewest slots), greedy (replicate heaviest, pack onto GPUs) or deepseek (DeepSeek's "
           "EPLB: groups to nodes, replicas within nodes)", POLICY,
           default=PlannerSpec().policy, choices=tuple(POLICIES)),
    Option("num-groups", int, "deepseek policy: expert groups of the model (DeepSeek-V3: 8)",
           POLICY, default=1, minimum=1),
    Option("max-moves", int, "stable policy: most slots (over all layers) whose expert one "
           "rebalance changes; 0 = no cap", POLICY, default=0, minimum=0),
    Option("planner", str, "executor the planner runs in", POLICY, default="process",
           choices=("process", "thread")),
    Option("planner-threads", int, "torch CPU threads the planner uses; its many small tensor "
           "operations run fastest on 1, and more threads spin on cores the engine needs (with "
           "--planner thread this sets torch's threads for the whole sidecar)", POLICY, default=1,
           minimum=1, metavar="N"),
    Option("ack-timeout", float, "PLAN -> every PLAN_ACK", TIMEOUTS,
           metavar="SECONDS", default=5.0, above=0),
    Option("promise-timeout", float, "PREPARE -> every PROMISE", TIMEOUTS,
           metavar="SECONDS", default=5.0, above=0),
    Option("done-timeout", float, "COMMIT -> every DONE", TIMEOUTS,
           metavar="SECONDS", default=120.0, above=0),
    Option("worker-timeout", float, "a worker silent this long has left", TIMEOUTS,
           metavar="SECONDS", default=3.0,
           above=0),
    Option("node-timeout", float, "leader: a follower sidecar silent this long is lost; follower: "
           "the leader silent this long is unreachable (eplb_leader_reachable 0, "
           "/readyz?leader=1 503; plain /readyz stays local)", TIMEOUTS, metavar="SECONDS",
           default=3.0, above=0),
    Option("heartbeat", float, "seconds between sidecar heartbeats", TIMEOUTS,
           metavar="SECONDS", default=0.5,
           above=0),
    Option("http", str, "where /metrics, /healthz and /readyz listen: HOST:PORT, :PORT (all "
           "interfaces: opt in for Prometheus on other hosts or Kubernetes probes), or off; at "
           "most 64 connections, 5 s per request",
           OPS, default=DEFAULT_HTTP, check=_http, metavar="HOST:PORT",
           accepted_text="HOST:PORT, :PORT (all interfaces; port 0 picks a free one) or off"),
    Option("expected-workers", int, "workers of this node that must have joined before /readyz "
           "answers 200 (0: none required)", OPS, default=0, minimum=0, metavar="N"),
    Option("grace-period", float, "seconds a SIGTERM shutdown may take (abort an uncommitted "
           "epoch, flush, close) before the process exits anyway, with status 1", OPS,
           default=10.0, above=0, metavar="SECONDS"),
    Option("log-format", str, "json: one JSON object per line on stdout; human: plain text",
           OPS, default="json", choices=("json", "human")),
    Option("log-level", str, "log verbosity", OPS, default="INFO",
           choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def fill_computed_defaults(settings: dict[str, Setting]) -> None:
    """Defaults that depend on the environment (the run directory)."""
    if "run-dir" not in settings:
        settings["run-dir"] = Setting(default_run_dir(), "default")


def sidecar_config(settings: Mapping[str, Setting]) -> SidecarConfig:
    """The daemon's config from the effective settings."""
    v = {name: s.value for name, s in settings.items()}
    # A --node-rank >= --num-nodes is not refused here: on Kubernetes it is a StatefulSet with
    # more replicas than the ConfigMap's num-nodes, and the sidecar runs to report it (status,
    # eplb_node_count_mismatch, a log line, /readyz 503) instead of crash-looping without a metric.
    leader = LeaderConfig(
        interval_steps=v["interval"], window_steps=v["window"], min_gain=v["min-gain"],
        min_margin=v["min-margin"], max_retries=v["max-retries"],
        layers_per_chunk=v["layers-per-step"], bytes_per_chunk=v["bytes-per-step"],
        planner=PlannerSpec(v["policy"], v["num-groups"], v["num-nodes"], v["max-moves"]),
        timeouts=AgreementTimeouts(ack_s=v["ack-timeout"], promise_s=v["promise-timeout"],
                                   done_s=v["done-timeout"]))
    return SidecarConfig(
        node_rank=v["node-rank"], num_nodes=v["num-nodes"], leader_address=v["leader"],
        bind_address=v.get("bind"), run_dir=Path(v["run-dir"]), leader=leader,
        heartbeat_s=v["heartbeat"], worker_timeout_s=v["worker-timeout"],
        node_timeout_s=v["node-timeout"], planner_executor=v["planner"],
        planner_threads=v["planner-threads"],
        group_access=v["group-access"], http=parse_http(v["http"]),
        expected_workers=v["expected-workers"], grace_s=v["grace-period"],
        curve_keys=v.get("curve-keys"), insecure_plain_tcp=v["insecure-plain-tcp"],
        per_worker_relay=v["per-worker-relay"])


def markdown_table() -> str:
    """The options as the Markdown table of deploy/README.md (a test keeps the two equal):
    ``python -c 'from eplb.coordinator.options import markdown_table; print(markdown_table())'``."""
    rows = ["| flag | environment | default | accepted | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        if o.default_text is not None:
            default = o.default_text
        elif o.default is None:
            default = "required" if o.required else "unset"
        else:
            default = o.default if isinstance(o.default, str) else format_value(o.default)
        rows.append(f"| `{o.flag}` | `{o.env}` | {default} | {o.accepted()} | "
                    f"{o.help.replace('|', '/')} |")
    return "\n".join(rows)
