"""``eplbctl``: status, rebalance, history, plan, keys, demo."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from eplb.control_client import ControlError, SidecarUnreachable, control_call

#: Exit codes (``eplbctl --help`` lists them).
EXIT_OK = 0  # done; rebalance: the epoch committed (with --no-wait: the request was accepted)
EXIT_REFUSED = 1  # the sidecar said no (rebalance: not started, and why)
EXIT_UNREACHABLE = 2  # bad usage, or no sidecar/leader could be asked (socket, permission, time)
EXIT_SKIPPED = 3  # rebalance: planned, and skipped (the predicted gain is below --min-gain)
EXIT_FAILED = 4  # rebalance: aborted (after its retries), failed after COMMIT, or planning failed
EXIT_TIMEOUT = 5  # rebalance: no outcome within --timeout (it may still finish)

EXIT_CODES = """\
exit codes:
  0  done; for rebalance: the epoch committed (with --no-wait: the request was accepted)
  1  the sidecar refused (rebalance: not started, e.g. ranks missing, another in progress, unsafe)
  2  bad usage, or no sidecar or leader could be asked (no socket, permission, no answer)
  3  rebalance: skipped (the predicted gain is below --min-gain; --force carries it out)
  4  rebalance: aborted after its retries, failed after COMMIT (unsafe), or planning failed
  5  rebalance: no outcome within --timeout (it may still finish: see eplbctl status)
"""


def _call(args: argparse.Namespace, op: str, call_args: dict[str, Any],
          timeout_s: float | None = None) -> dict[str, Any]:
    """``control_call``; a follower that could not reach the leader counts as unreachable."""
    try:
        return control_call(op, call_args, args.run_dir, timeout_s or args.timeout)
    except SidecarUnreachable:
        raise
    except ControlError as exc:
        if str(exc).startswith("the leader at ") and "did not answer" in str(exc):
            raise SidecarUnreachable(str(exc)) from None
        raise


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


# --- words for values -----------------------------------------------------------------------

def _ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    parts: list[str] = []
    for r in sorted(ranks):
        if parts and parts[-1][1] == r - 1:
            parts[-1] = (parts[-1][0], r)
        else:
            parts.append((r, r))  # type: ignore[arg-type]
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)  # type: ignore[misc]


def _bytes(n: int | None) -> str:
    n = int(n or 0)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _bal(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def _seconds(s: float | None) -> str:
    if s is None:
        return "never"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    return f"{m}m {s}s" if m < 60 else f"{m // 60}h {m % 60}m"


def describe_record(r: dict[str, Any]) -> str:
    """One history record in one line."""
    outcome, epoch = r.get("outcome"), r.get("epoch")
    forced = " (forced)" if r.get("forced") else ""
    reason = r.get("reason") or "no reason given"
    before, predicted = r.get("balancedness_before"), r.get("balancedness_predicted")
    observed = r.get("balancedness_observed")
    if outcome == "committed":
        return (f"epoch {epoch} committed{forced}: switched at step S={r.get('switch_step')}, "
                f"{r.get('experts_moved', 0)} slots moved, {_bytes(r.get('bytes_received'))} "
                f"copied; balancedness {_bal(before)} -> {_bal(predicted)} predicted, "
                f"{_bal(observed) if observed is not None else 'not measured yet'} observed")
    if outcome == "skipped":
        return (f"skipped{forced} at step {r.get('started_at_step')}: {reason} (balancedness "
                f"{_bal(before)} -> {_bal(predicted)} predicted)")
    if outcome == "aborted":
        return f"epoch {epoch} aborted{forced} at step {r.get('started_at_step')}: {reason}"
    if outcome == "failed":
        return (f"epoch {epoch} FAILED after COMMIT{forced} (S={r.get('switch_step')}): {reason}; "
                "the instance is unsafe")
    if outcome == "plan_error":
        return f"planning failed{forced} at step {r.get('started_at_step')}: {reason}"
    return f"epoch {epoch} {outcome}{forced}: {reason}"


# --- status ---------------------------------------------------------------------------------

def _local_rows(local: dict[str, Any]) -> list[tuple[str, str]]:
    """This sidecar's own view, in words."""
    role = local.get("role", "?")
    ready = "ready" if local.get("ready") else "not ready"
    rows = [("this sidecar", f"node {local.get('node')} of {local.get('num_nodes')}, {role} "
                             f"(pid {local.get('pid')}, up {_seconds(local.get('uptime_s'))}, "
                             f"{ready})")]
    address = local.get("leader_address", "?")
    link = local.get("peer_link") or {}
    if role == "leader":
        rows.append(("leader", f"this sidecar (node 0), on {address}"))
    else:
        seen = local.get("leader_last_seen_s")
        rows.append(("leader", f"node 0 at {address}; "
                               + ("never heard from" if seen is None
                                  else f"heard {_seconds(seen)} ago")))
        if link.get("link"):
            down = str(link["link"])
            rows.append(("link to leader", down if down == "up" else down.upper()[:4] + down[4:]))
    workers = local.get("local_workers") or []
    rows.append(("ranks on this node", _ranks(workers) if workers else "none joined"))
    security = link.get("security", "?")
    fails = link.get("handshake_failures")
    rows.append(("peer link", security + (f"; {fails} failed handshake(s)" if fails else "")))
    rejected = local.get("frames_rejected") or {}
    rows.append(("frames rejected", ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
                 or "none"))
    rows.append(("http", local.get("http") or "off"))
    return rows


def _group_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The leader's view of the group, in words."""
    workers = result.get("workers") or []
    world = result.get("world_size")
    if world:
        joined = f"{len(workers)} of {world}" + (f": {_ranks(workers)}" if workers else "")
    else:
        joined = "none yet (the group's size is known once a rank joins)"
    shape = result.get("shape")
    model = (f"{shape[0]} layers, {shape[1]} experts, {shape[2]} slots (L, E, P)" if shape
             else "not known yet: no worker joined")
    bal = result.get("balancedness")
    flight = result.get("epoch_in_flight")
    if flight:
        where = f", switch at step S={flight['switch_step']}" if flight.get("switch_step") else ""
        waiting = flight.get("waiting_for") or []
        in_flight = (f"epoch {flight['epoch']}: {flight['phase']}{where}"
                     + (f", waiting for rank(s) {_ranks(waiting)}" if waiting else ""))
    elif result.get("planning"):
        in_flight = "planning"
    elif result.get("rebalance_requested"):
        in_flight = "none; a requested rebalance starts once every rank has joined"
    else:
        in_flight = "none"
    c = result.get("counters") or {}
    nodes = result.get("nodes") or {}
    rows = [
        ("ranks joined", joined),
        ("model", model),
        ("steps", (f"{result.get('min_step')}..{result.get('max_step')}, "
                   f"{result.get('steps_per_second')} steps/s") if workers else "no rank stepping"),
        ("balancedness", "not measured yet" if bal is None else f"{bal:.4f} over the window"),
        ("placement", result.get("placement_hash") or "none yet"),
        ("epoch in flight", in_flight),
        ("epochs", f"{c.get('committed', 0)} committed, {c.get('skipped', 0)} skipped, "
                   f"{c.get('aborted', 0)} aborted, {c.get('failed', 0)} failed"),
        ("next rebalance", f"when every rank has passed step {result.get('next_trigger_step')}, "
                           "or on eplbctl rebalance"),
        ("follower sidecars", ", ".join(f"node {n} (heard {_seconds(t)} ago)"
                                        for n, t in sorted(nodes.items())) or "none"),
    ]
    return rows


def _render(rows: list[tuple[str, str]]) -> str:
    return "\n".join(f"{key:>20}: {value}" for key, value in rows)


def status_text(args: argparse.Namespace) -> tuple[int, str]:
    """``eplbctl status`` in words; (exit code, text)."""
    local = _call(args, "status", {"local": True})
    full = local if "leader" in local else None  # the leader answers with everything
    if full is not None:
        local = full["leader"]
    lines: list[str] = []
    code = EXIT_OK
    if full is None and not args.local:
        try:
            full = _call(args, "status", {})
        except SidecarUnreachable as exc:
            lines.append(f"THE LEADER DID NOT ANSWER: {exc}")
            code = EXIT_UNREACHABLE
    if full is not None and full.get("unsafe") and not args.local:
        lines += [f"!! UNSAFE: {full['unsafe']}",
                  "!! No rebalance starts while the instance is unsafe; restart the engine.", ""]
    rows = _local_rows(local)
    if full is not None and not args.local:
        rows += _group_rows(full)
    lines.append(_render(rows))
    if full is not None and not args.local:
        history = full.get("history") or []
        lines.append("recent attempts (newest last):" if history else "no rebalance attempted yet")
        lines += [f"  {describe_record(r)}" for r in history[-args.last:]]
    return code, "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    if args.json:
        result = _call(args, "status", {"local": args.local})
        print(json.dumps(result, indent=2, sort_keys=True))
        return EXIT_OK
    if args.watch is None:
        code, text = status_text(args)
        print(text)
        return code
    every = max(0.2, args.watch)
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                code, text = status_text(args)
            except ControlError as exc:
                text = f"eplbctl: {exc}"
            print(f"{clear}{time.strftime('%H:%M:%S')}, every {every:g}s (Ctrl-C to stop)\n{text}",
                  flush=True)
            if not clear:
                print(flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        print(flush=True)
        return EXIT_OK


# --- rebalance ------------------------------------------------------------------------------

def _requester() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return (f"eplbctl (user {user}, uid {os.getuid()}, pid {os.getpid()}, "
            f"host {socket.gethostname()})")


def _rebalance(args: argparse.Namespace) -> int:
    try:
        result = _call(args, "rebalance", {"force": args.force, "by": _requester()})
    except SidecarUnreachable:
        raise
    except ControlError as exc:
        print(f"eplbctl rebalance: not started: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    request = result.get("request")
    if args.no_wait or request is None:
        print(f"rebalance requested{' (forced)' if args.force else ''}"
              + (f" (request {request})" if request is not None else "")
              + "; eplbctl status shows its progress")
        return EXIT_OK
    print(f"rebalance requested{' (forced)' if args.force else ''}; waiting up to "
          f"{args.wait_timeout:g}s for the outcome", file=sys.stderr, flush=True)
    try:
        return _wait_for_outcome(args, int(request), result.get("incarnation"))
    except KeyboardInterrupt:
        print("\neplbctl rebalance: stopped waiting; the rebalance goes on (eplbctl status shows "
              "it)", file=sys.stderr)
        return 130


def _wait_for_outcome(args: argparse.Namespace, request: int, incarnation: str | None) -> int:
    """Poll the leader's status until the attempt of ``request`` has an outcome, and print it."""
    deadline = time.monotonic() + args.wait_timeout
    last_error, shown = "", None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            status = _call(args, "status", {}, min(args.timeout, max(remaining, 0.1)))
        except ControlError as exc:  # the leader restarting, say: ask again until the deadline
            last_error = str(exc)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            continue
        if incarnation and status.get("leader", {}).get("incarnation") not in (None, incarnation):
            print("eplbctl rebalance: the leader restarted while the rebalance was under way; "
                  "its outcome is unknown (an epoch not yet committed was aborted, a committed "
                  "one is resumed): see eplbctl status", file=sys.stderr)
            return EXIT_TIMEOUT
        records = [r for r in status.get("history", []) if r.get("request") == request]
        flight = status.get("epoch_in_flight") or {}
        busy = flight.get("request") == request or status.get("planning_request") == request
        if records and not busy:
            return _print_outcome(records, status)
        now = (f"epoch {flight.get('epoch')} {flight.get('phase')}" if busy and flight
               else "planning" if busy else "waiting to start")
        if now != shown:
            print(f"  {now}", file=sys.stderr, flush=True)
            shown = now
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    print(f"eplbctl rebalance: no outcome within {args.wait_timeout:g}s"
          + (f" (last error: {last_error})" if last_error else "")
          + "; it may still finish: see eplbctl status", file=sys.stderr)
    return EXIT_TIMEOUT


def _print_outcome(records: list[dict[str, Any]], status: dict[str, Any]) -> int:
    last = records[-1]
    for earlier in records[:-1]:  # aborted attempts that were retried
        print(f"retried after: {describe_record(earlier)}")
    outcome = last.get("outcome")
    if outcome == "committed":
        observed = last.get("balancedness_observed")
        print(f"epoch {last['epoch']} committed{' (forced)' if last.get('forced') else ''}")
        print(f"  switch step S: {last.get('switch_step')}")
        print(f"  moved: {last.get('experts_moved', 0)} slots, "
              f"{_bytes(last.get('bytes_received'))} ({int(last.get('bytes_received') or 0)} "
              "bytes)")
        print(f"  balancedness: {_bal(last.get('balancedness_before'))} before, "
              f"{_bal(last.get('balancedness_predicted'))} predicted after, "
              + (f"{observed:.3f} observed after" if observed is not None else
                 "observed after: not measured yet (eplbctl history shows it later)"))
        return EXIT_OK
    print(describe_record(last))
    if outcome == "skipped":
        print("  (eplbctl rebalance --force carries out a plan even below --min-gain)")
        return EXIT_SKIPPED
    if status.get("unsafe"):
        print(f"  the instance is UNSAFE: {status['unsafe']}")
    return EXIT_FAILED


# --- history --------------------------------------------------------------------------------

PLOT_MISSING = ("eplbctl history --plot needs matplotlib, an optional extra: "
                "pip install 'eplb-coordinator[plot]' (or pip install matplotlib)")


def _history(args: argparse.Namespace) -> int:
    if args.plot is not None:
        try:
            import matplotlib
        except ImportError:
            print(f"eplbctl: {PLOT_MISSING}", file=sys.stderr)
            return EXIT_UNREACHABLE
        matplotlib.use("Agg")
    status = _call(args, "status", {})
    history = status.get("history") or []
    if args.json:
        print(json.dumps(history, indent=2, sort_keys=True))
    else:
        print("\n".join(describe_record(r) for r in history) or "no rebalance attempted yet")
    if args.plot is not None:
        try:
            plot_history(history, status, args.plot)
        except OSError as exc:
            print(f"eplbctl: cannot write {args.plot}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"wrote {args.plot}", file=sys.stderr)
    return EXIT_OK


def plot_history(history: list[dict[str, Any]], status: dict[str, Any], path: Path) -> None:
    """Balancedness by decode step: before each attempt and after each committed epoch
    (observed, else predicted), the switch steps of committed epochs marked, skipped and
    failed attempts marked apart."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    xs: list[float] = []
    ys: list[float] = []
    for r in history:
        before, start = r.get("balancedness_before"), r.get("started_at_step")
        if before is not None and start is not None:
            xs.append(start)
            ys.append(before)
        if r.get("outcome") == "committed" and r.get("switch_step") is not None:
            s = r["switch_step"]
            ax.axvline(s, color="tab:green", alpha=0.35, lw=1)
            after = r.get("balancedness_observed")
            if after is None:
                after = r.get("balancedness_predicted")
            pred = r.get("balancedness_predicted")
            if pred is not None:
                ax.plot([s], [pred], marker="o", mfc="none", color="tab:green", ls="none")
            if after is not None:
                xs.append(s)
                ys.append(after)
            ax.annotate(f"epoch {r.get('epoch')}", (s, 0.02), rotation=90, fontsize=7,
                        color="tab:green", va="bottom", ha="right")
        elif r.get("outcome") == "skipped" and before is not None:
            ax.plot([start], [before], marker="x", color="tab:gray", ls="none")
        elif r.get("outcome") in ("aborted", "failed", "plan_error"):
            ax.axvline(r.get("switch_step") or start or 0, color="tab:red", ls=":", lw=1)
    now = status.get("balancedness")
    if now is not None and status.get("max_step"):
        xs.append(status["max_step"])
        ys.append(now)
    ax.plot(xs, ys, color="tab:blue", marker=".", lw=1.5,
            label="balancedness: before each attempt, after each switch, now")
    ax.plot([], [], color="tab:green", alpha=0.35, label="committed rebalance (switch step S)")
    ax.plot([], [], marker="o", mfc="none", color="tab:green", ls="none",
            label="predicted after")
    ax.plot([], [], marker="x", color="tab:gray", ls="none", label="skipped")
    ax.plot([], [], color="tab:red", ls=":", label="aborted / failed")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("decode step")
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_title("eplb: balancedness over time, rebalances marked")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plan(args: argparse.Namespace) -> int:
    from eplb.placement.planner import PlannerSpec
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
    p = argparse.ArgumentParser(prog="eplbctl", description="Control and inspect eplb sidecars.",
                                epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the sidecar's run directory (default: as eplb-sidecar's: $EPLB_RUN_DIR, "
                        "else $XDG_RUNTIME_DIR/eplb, else /tmp/eplb-UID)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for each answer of the sidecar (default 10)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="show the cluster's state in words (asked of the leader)",
                       description=_wrap("This sidecar's role and link to the leader, the "
                                         "group's ranks, model, balancedness, the epoch in "
                                         "flight and the last attempts; an unsafe instance is "
                                         "shown first."),
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--json", action="store_true", help="print the full status as JSON")
    s.add_argument("--local", action="store_true", help="only this sidecar's own view")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    s.add_argument("--last", type=int, default=5, metavar="N",
                   help="show the last N rebalance attempts (default 5)")
    s.set_defaults(func=_status)
    s = sub.add_parser("rebalance", help="start a rebalance now and wait for its outcome",
                       description=_wrap(
                           "Ask the leader for a rebalance, wait until it has an outcome and print "
                           "it: the epoch, its switch step S, slots and bytes moved, balancedness "
                           "before and after (predicted, and observed once measured), or why it "
                           "was skipped or aborted. The exit code says which. The leader logs who "
                           "asked."),
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--force", action="store_true",
                   help="carry it out even if the predicted gain is below --min-gain")
    s.add_argument("--no-wait", action="store_true",
                   help="return once the leader accepted the request (exit 0)")
    s.add_argument("--timeout", dest="wait_timeout", type=float, default=300.0,
                   metavar="SECONDS", help="wait at most this long for the outcome (default 300)")
    s.set_defaults(func=_rebalance)
    s = sub.add_parser("history", help="the last rebalance attempts (up to 50), one per line",
                       description=_wrap(
                           "The leader's last rebalance attempts (up to 50), one per line; --plot "
                           "draws balancedness by decode step with the rebalances marked (needs "
                           "matplotlib: pip install 'eplb-coordinator[plot]')."),
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--json", action="store_true", help="print the records as JSON")
    s.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="also draw balancedness over time into FILE.png")
    s.set_defaults(func=_history)
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
    except SidecarUnreachable as exc:
        print(f"eplbctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"eplbctl: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("eplbctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
