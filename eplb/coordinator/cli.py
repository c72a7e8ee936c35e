"""``eplb-sidecar``: the per-node daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from eplb.coordinator.agreement import AgreementTimeouts
from eplb.coordinator.leader import LeaderConfig
from eplb.coordinator.planner import POLICIES, PlannerSpec
from eplb.coordinator.sidecar import Sidecar, SidecarConfig
from eplb.paths import RunDirError, default_run_dir

log = logging.getLogger("eplb.sidecar")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _address(text: str) -> str:
    if not text.startswith("tcp://") or ":" not in text[6:]:
        raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT, got {text!r}")
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options that have none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eplb-sidecar",
        description="Per-node rebalance sidecar for expert-parallel MoE inference. Run one per node; "
                    "node 0 is the leader that plans rebalances and drives the step agreement.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--node-rank", type=int, required=True,
                   help="index of this node, 0..num-nodes-1; node 0 is the leader")
    g.add_argument("--num-nodes", type=_positive_int, required=True, help="number of nodes (sidecars)")
    g.add_argument("--leader", type=_address, required=True,
                   help="the leader's TCP address, tcp://HOST:PORT; followers connect to it")
    g.add_argument("--bind", type=_address, default=None,
                   help="leader only: address to bind instead of --leader (e.g. tcp://0.0.0.0:5555)")
    g.add_argument("--run-dir", type=Path, default=None,
                   help="private directory for the ipc sockets the workers and eplbctl use "
                        "(default: $EPLB_RUN_DIR, else $XDG_RUNTIME_DIR/eplb, else /tmp/eplb-UID)")
    g.add_argument("--group-access", action="store_true",
                   help="make the run directory 0770 instead of 0700 (workers in the same group)")
    g = p.add_argument_group("rebalance policy (leader)")
    g.add_argument("--interval", type=_positive_int, default=1000,
                   help="decode steps between rebalance attempts")
    g.add_argument("--window", type=_positive_int, default=1000,
                   help="decode steps of counts the planner looks at")
    g.add_argument("--min-gain", type=float, default=0.01,
                   help="skip a rebalance whose predicted balancedness gain is below this")
    g.add_argument("--min-margin", type=int, default=2,
                   help="fewest steps between the highest reported step and the switch step S "
                        "(at least 2; grows with the measured round trip and step rate)")
    g.add_argument("--max-retries", type=int, default=3,
                   help="new epochs after a refused or timed-out one, each with twice the margin")
    g.add_argument("--layers-per-step", type=_positive_int, default=1,
                   help="most layers copied per decode step after S")
    g.add_argument("--bytes-per-step", type=int, default=0,
                   help="also cap the bytes the busiest rank receives per decode step after S "
                        "(a layer above the cap goes alone); 0 = no byte cap")
    g.add_argument("--policy", choices=POLICIES, default="greedy",
                   help="placement policy: greedy (replicate heaviest, pack onto GPUs) or deepseek "
                        "(DeepSeek's EPLB: groups to nodes, replicas within nodes)")
    g.add_argument("--num-groups", type=_positive_int, default=1,
                   help="deepseek policy: expert groups of the model (DeepSeek-V3: 8)")
    g.add_argument("--planner", choices=("process", "thread"), default="process",
                   help="executor the planner runs in")
    g = p.add_argument_group("timeouts (seconds)")
    g.add_argument("--ack-timeout", type=_positive_float, default=5.0,
                   help="PLAN -> every PLAN_ACK")
    g.add_argument("--promise-timeout", type=_positive_float, default=5.0,
                   help="PREPARE -> every PROMISE")
    g.add_argument("--done-timeout", type=_positive_float, default=120.0,
                   help="COMMIT -> every DONE")
    g.add_argument("--worker-timeout", type=_positive_float, default=3.0,
                   help="a worker silent this long has left")
    g.add_argument("--node-timeout", type=_positive_float, default=3.0,
                   help="leader: a follower sidecar silent this long is lost")
    g.add_argument("--heartbeat", type=_positive_float, default=0.5,
                   help="seconds between sidecar heartbeats")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log verbosity (logs go to stderr)")
    return p


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    if not 0 <= args.node_rank < args.num_nodes:
        raise SystemExit(f"eplb-sidecar: --node-rank {args.node_rank} must lie in "
                         f"[0, {args.num_nodes}) (--num-nodes {args.num_nodes})")
    if args.min_margin < 2:
        raise SystemExit(f"eplb-sidecar: --min-margin must be at least 2, got {args.min_margin}")
    if args.max_retries < 0:
        raise SystemExit(f"eplb-sidecar: --max-retries must be >= 0, got {args.max_retries}")
    if args.bytes_per_step < 0:
        raise SystemExit(f"eplb-sidecar: --bytes-per-step must be >= 0, got {args.bytes_per_step}")
    if not 0 <= args.min_gain <= 1:
        raise SystemExit(f"eplb-sidecar: --min-gain must lie in [0, 1], got {args.min_gain}")
    leader = LeaderConfig(
        interval_steps=args.interval, window_steps=args.window, min_gain=args.min_gain,
        min_margin=args.min_margin, max_retries=args.max_retries,
        layers_per_chunk=args.layers_per_step, bytes_per_chunk=args.bytes_per_step,
        planner=PlannerSpec(args.policy, args.num_groups, args.num_nodes),
        timeouts=AgreementTimeouts(ack_s=args.ack_timeout, promise_s=args.promise_timeout,
                                   done_s=args.done_timeout))
    return SidecarConfig(
        node_rank=args.node_rank, num_nodes=args.num_nodes, leader_address=args.leader,
        bind_address=args.bind, run_dir=args.run_dir or default_run_dir(), leader=leader,
        heartbeat_s=args.heartbeat, worker_timeout_s=args.worker_timeout,
        node_timeout_s=args.node_timeout, planner_executor=args.planner,
        group_access=args.group_access)


async def _serve(config: SidecarConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Sidecar(config).run(stop)


def run_event_loop(coro) -> None:
    """Run on uvloop; fall back to asyncio's own loop (and say so) when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; running on the default asyncio event loop")
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s node={args.node_rank} %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        run_event_loop(_serve(config))
    except RunDirError as exc:
        print(f"eplb-sidecar: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
