"""``eplbctl``: status, rebalance, plan, keys, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eplb.control_client import ControlError, control_call


def _status(args: argparse.Namespace) -> int:
    result = control_call("status", {"local": args.local}, args.run_dir, args.timeout)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    if args.local and "leader" not in result:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
        return 0
    c = result["counters"]
    bal = result["balancedness"]
    flight = result["epoch_in_flight"]
    rows = [
        ("workers", f"{len(result['workers'])}/{result['world_size'] or '?'} {result['workers']}"),
        ("model (L, E, P)", result["shape"]),
        ("steps", f"{result['min_step']}..{result['max_step']} at {result['steps_per_second']}/s"),
        ("balancedness", "-" if bal is None else f"{bal:.4f}"),
        ("placement", result["placement_hash"]),
        ("epoch in flight", "-" if not flight else
         f"{flight['epoch']} {flight['phase']} S={flight['switch_step']} waiting for "
         f"{flight['waiting_for']}"),
        ("epochs", f"{c['committed']} committed, {c['skipped']} skipped, {c['aborted']} aborted, "
                   f"{c['failed']} failed"),
        ("next rebalance at step", result["next_trigger_step"]),
        ("follower sidecars", result.get("nodes")),
        ("frames rejected", result.get("leader", {}).get("frames_rejected")),
        ("peer link", result.get("leader", {}).get("peer_link")),
    ]
    if result["unsafe"]:
        rows.append(("UNSAFE", result["unsafe"]))
    for key, value in rows:
        print(f"{key:>24}: {value}")
    return 0


def _rebalance(args: argparse.Namespace) -> int:
    result = control_call("rebalance", {"force": args.force}, args.run_dir, args.timeout)
    print(result.get("message", "ok"))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from eplb.coordinator.planner import PlannerSpec
    from eplb.offline_plan import PlanInputError, plan_offline

    try:
        spec = PlannerSpec(args.policy, args.num_groups, args.num_nodes, args.max_moves)
        summary = plan_offline(args.load, args.num_physical, args.num_gpus, spec,
                               args.current, args.output, args.bytes_per_expert, args.moe_layers)
    except (PlanInputError, ValueError) as exc:
        print(f"eplbctl plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from eplb.curve import CurveKeyError, create_keys

    try:
        files = create_keys(args.directory, args.nodes)
    except CurveKeyError as exc:
        print(f"eplbctl keys: {exc}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    print(f"the leader (node 0) needs leader.key_secret and every node-K.key; node K needs "
          f"leader.key and node-K.key_secret. Copy them to each node's directory and pass it "
          f"with --curve-keys (or EPLB_CURVE_KEYS); the *.key_secret files are secret",
          file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from eplb.demo.run import DemoOptions, run_demo

    return run_demo(DemoOptions(steps=args.steps, interval=args.interval, window=args.interval,
                                step_ms=args.step_ms, seed=args.seed, keep=args.keep))


PLAN_DESCRIPTION = """\
Plan a placement from expert load and print a JSON summary.

--load takes:
  * expert load [L, E] or [steps, L, E] (summed) in .pt, .json or .npy, bare or in a
    dict under 'logical_count' (SGLang's expert-distribution dump in 'stat' mode);
  * SGLang's expert-distribution dump in 'per_pass' or 'per_token' mode
    (--expert-distribution-recorder-mode; /dump_expert_distribution_record writes one
    expert_distribution_recorder_<time>_<rank>.pt per rank into
    SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR): a dict with 'records', one per forward
    pass, each with 'global_physical_count' [L, P], and 'last_physical_to_logical_map'
    [L, P]. Counts are summed over passes and ranks (give every rank's file, or their
    directory) and mapped to logical experts with that map, the placement served when
    the dump was written (a placement changed during recording is not seen). That map
    is also the current placement unless --current is given.

L counts every decoder layer, dense ones too. MoE layers are found from the load: a
dense layer never routes a token, so its row is zero in every pass, while a MoE layer
that served any request is not; this needs no knowledge of the model (first dense
layers, interleaved dense layers). Give --moe-layers only for a recording so short that
some MoE layer routed nothing. Only MoE layers are planned, and balancedness (mean GPU
load over max, per layer) is averaged over MoE layers only. The output keeps all L
layers, as SGLang's --init-expert-location reads it; dense layers keep their current
row (with no current placement, the default one: slot p holds expert p mod E).
"""


class _PlanHelpFormatter(argparse.RawDescriptionHelpFormatter,
                         argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows defaults (but not a default of None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eplbctl", description="Control and inspect eplb sidecars.")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the sidecar's run directory (default: as eplb-sidecar's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="show the cluster's state (asked of the leader)")
    s.add_argument("--json", action="store_true", help="print the full status as JSON")
    s.add_argument("--local", action="store_true", help="only this sidecar's own view")
    s.set_defaults(func=_status)
    s = sub.add_parser("rebalance", help="start a rebalance now")
    s.add_argument("--force", action="store_true",
                   help="carry it out even if the predicted gain is below --min-gain")
    s.set_defaults(func=_rebalance)
    s = sub.add_parser("plan", help="plan a placement offline from a load file",
                       formatter_class=_PlanHelpFormatter, description=PLAN_DESCRIPTION)
    s.add_argument("--load", type=Path, required=True, nargs="+", metavar="PATH",
                   help="the load: one file, or several SGLang per-pass dumps (one per rank, "
                        "summed), or a directory of expert_distribution_recorder_*.pt dumps")
    s.add_argument("--moe-layers", default=None, metavar="SPEC",
                   help="the MoE layers, as comma-separated N or A:B (B excluded), e.g. 3:61; "
                        "default: the layers that routed tokens (see above)")
    s.add_argument("--current", type=Path, default=None,
                   help="the placement served now ([L, P], bare or under "
                        "'physical_to_logical_map'; default: an SGLang per-pass dump's "
                        "last_physical_to_logical_map): adds balancedness before and moves")
    s.add_argument("--output", type=Path, default=None,
                   help="write {'physical_to_logical_map': [L, P]} here (.pt or .json), the form "
                        "SGLang's --init-expert-location reads")
    s.add_argument("--num-physical", type=int, default=None,
                   help="slots per layer, P (default: those of --current or of the dump's map)")
    s.add_argument("--num-gpus", type=int, required=True, help="EP size, G (P %% G == 0)")
    s.add_argument("--num-nodes", type=int, default=1, help="nodes (deepseek policy)")
    s.add_argument("--num-groups", type=int, default=1, help="expert groups (deepseek policy)")
    s.add_argument("--policy", choices=("stable", "greedy", "deepseek"), default="stable",
                   help="stable: start from --current and change the fewest slots that reach the "
                        "balancedness of a from-scratch plan (without --current it plans from "
                        "scratch: greedy replica counts, replicas heaviest first to the lightest "
                        "GPU); greedy and deepseek always plan from scratch")
    s.add_argument("--max-moves", type=int, default=0,
                   help="stable with --current: change at most this many slots (0: no cap)")
    s.add_argument("--bytes-per-expert", type=int, default=0,
                   help="size of one expert, to report bytes moved")
    s.set_defaults(func=_plan)
    s = sub.add_parser("keys", help="make CURVE key pairs for the sidecars' TCP link",
                       description="Write the leader's key pair (leader.key, leader.key_secret) "
                                   "and one pair per follower node K = 1..N-1 (node-K.key, "
                                   "node-K.key_secret), ZeroMQ certificates, into DIRECTORY, for "
                                   "eplb-sidecar --curve-keys. The leader needs leader.key_secret "
                                   "and every node-K.key; node K needs leader.key and "
                                   "node-K.key_secret. Existing keys are never overwritten.")
    s.add_argument("directory", type=Path, help="where to write the keys (created, mode 0700)")
    s.add_argument("--nodes", type=int, required=True, metavar="N",
                   help="number of nodes (sidecars), as --num-nodes; at least 2")
    s.set_defaults(func=_keys)
    s = sub.add_parser("demo", help="run a local 2-node x 2-worker cluster on synthetic load",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--steps", type=int, default=2000, help="decode steps to run")
    s.add_argument("--interval", type=int, default=300, help="steps between rebalances")
    s.add_argument("--step-ms", type=float, default=2.0, help="simulated step time when balanced")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--keep", action="store_true", help="keep the run directory and logs")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ControlError as exc:
        print(f"eplbctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
