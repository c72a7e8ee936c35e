"""A mesh of real sidecars over real latency: N ``eplb-sidecar`` processes, each with its M workers
in a network namespace of its own, CURVE on, the followers' TCP link to the leader through a
user-space relay that adds delay, jitter and loss (these kernels have no ``netem``; see
bench/mesh/relay.py for the model). Needs root (``ip netns``, veth pairs).

    sudo PYTHONPATH=. .venv/bin/python bench/mesh/run.py                  # 18 x 8, scenarios a-d
    sudo PYTHONPATH=. .venv/bin/python bench/mesh/run.py --nodes 4 --workers 2 --epochs 5

Scenarios (``--scenarios``, each bounded by ``--epochs`` and ``--scenario-budget``):

- a: 0.1 ms one way, no loss;  b: 1 ms +- 0.3 ms, 0.5 % loss;  c: 2 ms +- 0.5 ms, 1 % loss;
- d: 0.5 ms; the last follower's veth goes down right after a forced rebalance, for
  ``--partition-s`` seconds (default: the node timeout + 2 s, so the leader declares the node
  lost), while epochs are forced; then epochs are forced until they commit.

Defaults fit a small machine (2 cores for 18 nodes): workers step every 100 ms and flush their
counts every 16 steps, the sidecars' ``--node-timeout`` is 10 s. With 20 ms steps, flushes every
8 steps and 5 s, 18 x 8 on 2 cores never came up: the leader, handling every worker's frames on
its share of the cores, saw followers' heartbeats more than 5 s (then 10 s) late and lost every
follower, again and again. The workers' processes start one node at a time for the same reason,
and the relay runs at nice -10 (``--relay-nice``): it stands for the network, which the hosts'
load should not slow.

Per scenario it reports epochs committed/skipped/aborted (and refused requests), PREPARE ->
COMMIT p50/p99/max from the leader's history, the one-way delay the relay really applied, its
"lost" chunks, and CPU: the mesh's processes in cores and the whole machine's busy share. After
the scenarios the workers stop and report; the checks of bench/mesh/scenarios.py run on them and
the leader's status, and the exit status is 1 if one failed.

Everything the run creates (namespaces ``eplbm-<pid>-*``, their veth pairs, processes, the run
directory under /tmp) is removed at exit: from ``finally``, ``atexit`` and on SIGTERM, SIGINT,
SIGHUP; ``--time-cap`` bounds the whole run (SIGALRM).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for `mesh`
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository, for `eplb`

from mesh import netns  # noqa: E402
from mesh.cluster import REPO, Mesh  # noqa: E402
from mesh.scenarios import SCENARIOS, Result, check, run_scenario  # noqa: E402

log = logging.getLogger("eplb.mesh")


class Interrupted(BaseException):
    """A signal or the time cap ended the run; cleanup follows."""


def _raise(signum: int, _frame: object) -> None:
    raise Interrupted(f"{signal.Signals(signum).name}"
                      + (" (--time-cap reached)" if signum == signal.SIGALRM else ""))


def table(results: list[Result], nodes: int, workers: int) -> str:
    rows = [f"{nodes} sidecars x {workers} workers, one namespace each, CURVE on; "
            "PREPARE->COMMIT = leader sends PREPARE until every PROMISE is in; one-way delay = "
            "what the relay applied (per-peer p50, worst peer's p99); CPU = the mesh's processes "
            "(cores) and the whole machine (busy share)",
            "",
            "| scenario | link (one way) | committed/skipped/aborted (refused) | PREPARE->COMMIT "
            "p50 ms | p99 ms | max ms | delay p50/p99 ms | lost chunks | mesh CPU cores | machine "
            "busy | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r.as_dict()
        o, rel = d["outcomes"], d["relay"]

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        rows.append(f"| {r.scenario.key} | {r.scenario.title} | {o.get('committed', 0)}/"
                    f"{o.get('skipped', 0)}/{o.get('aborted', 0)} ({d['refused']}) | "
                    f"{f(d['agreement_p50_ms'])} | {f(d['agreement_p99_ms'])} | "
                    f"{f(d['agreement_max_ms'])} | {f(rel['delay_p50_ms'])}/"
                    f"{f(rel['delay_p99_ms'])} | {rel['lost']}/{rel['chunks']} | "
                    f"{d['mesh_cores']:.2f} | {d['machine_busy'] * 100:.0f} % | {d['wall_s']:.0f} |")
    for r in results:
        if r.partition:
            p = r.partition
            timeline = p.get("timeline") or []
            first = next((i for i, t in enumerate(timeline) if "committed" in t[2]), len(timeline))
            shown = timeline[:first + 1]
            if len(timeline) > len(shown):
                shown.append(f"{len(timeline) - len(shown)} more")
            after = p.get("after") or []
            rows.append("")
            rows.append(f"partition ({r.scenario.key}): node {p.get('victim')} cut off for "
                        f"{r.scenario.partition_s:g} s; epochs during it: {p.get('during')}, "
                        f"{p.get('refused_during')} request(s) refused; after: "
                        f"{after.count('committed')} of {len(after)} committed; "
                        f"first commit {p.get('first_commit_after_up_s')} s after the link came "
                        "back. Requests as [asked s, ended s after the link went down, outcome]: "
                        f"{shown}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=18)
    p.add_argument("--workers", type=int, default=8, help="workers per node")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--epochs", type=int, default=20, help="committed epochs wanted per scenario")
    p.add_argument("--step-ms", type=float, default=100.0, help="each worker's decode step")
    p.add_argument("--flush-every", type=int, default=16,
                   help="steps between a worker's counts flushes (each a frame to the leader)")
    p.add_argument("--node-timeout", type=float, default=10.0, help="sidecars' --node-timeout")
    p.add_argument("--partition-s", type=float, default=None,
                   help="scenario d: link down this long (default: node-timeout + 2 s, so the "
                        "leader notices the node lost)")
    p.add_argument("--worker-timeout", type=float, default=10.0, help="sidecars' --worker-timeout")
    p.add_argument("--rto-ms", type=float, default=200.0, help="the relay's delay of a lost chunk")
    p.add_argument("--start-timeout", type=float, default=400.0)
    p.add_argument("--scenario-budget", type=float, default=240.0, help="seconds per scenario")
    p.add_argument("--epoch-timeout", type=float, default=30.0, help="longest wait for one epoch")
    p.add_argument("--time-cap", type=int, default=1800, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start-batch", type=int, default=1,
                   help="nodes whose workers processes start at once (each batch after the one "
                        "before joined)")
    p.add_argument("--relay-nice", type=int, default=-10, help="the relay's scheduling priority")
    p.add_argument("--results", type=Path, default=None,
                   help="Markdown file to write (default bench/results/mesh_cpu<N>core.md; "
                        "'-' for none)")
    p.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the run directory")
    p.add_argument("--per-worker-relay", action="store_true",
                   help="followers relay every worker frame (the old path) instead of answering "
                        "for their node (the default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EPLB_MESH_LOG", "INFO"), format="%(asctime)s mesh %(levelname)s %(message)s",
                        stream=sys.stderr)
    why = netns.netns_available()
    if why:
        print(f"bench/mesh: {why}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _raise)
    signal.alarm(args.time_cap)
    scenarios = [SCENARIOS[k] for k in args.scenarios]
    if "d" in args.scenarios:
        d = SCENARIOS["d"]
        partition_s = args.node_timeout + 2 if args.partition_s is None else args.partition_s
        SCENARIOS["d"] = type(d)(d.key, d.title, d.profile, partition_s)
        scenarios = [SCENARIOS[k] for k in args.scenarios]
    sidecar_args = ["--interval", "100000000", "--window", "50", "--min-gain", "0",
                    "--planner", "thread", "--log-level", "WARNING",
                    "--worker-timeout", str(args.worker_timeout),
                    "--node-timeout", str(args.node_timeout),
                    *(["--per-worker-relay"] if args.per_worker_relay else [])]
    mesh = Mesh(args.nodes, args.workers, sidecar_args, args.step_ms,
                profile={**scenarios[0].profile, "rto_ms": args.rto_ms}, seed=args.seed,
                flush_every=args.flush_every, relay_nice=args.relay_nice,
                start_batch=args.start_batch)
    failed, interrupted = True, False
    atexit.register(lambda: mesh.close(keep_dir=args.keep_logs or failed))
    results: list[Result] = []
    problems: list[str] = []
    started = time.monotonic()
    try:
        log.info("starting %d sidecars x %d workers in namespaces %s-* (run dir %s)", args.nodes,
                 args.workers, mesh.topo.prefix, mesh.base_dir)
        mesh.start(args.start_timeout)
        log.info("mesh up in %.1f s", time.monotonic() - started)
        for sc in scenarios:
            log.info("scenario %s: %s", sc.key, sc.title)
            res = run_scenario(mesh, sc, args.epochs, args.scenario_budget,
                               victim=args.nodes - 1, epoch_timeout_s=args.epoch_timeout,
                               settle_s=args.step_ms * args.flush_every / 1e3)
            results.append(res)
            log.info("scenario %s: %s, %d refused, %d timed out, %.1f s", sc.key, res.outcomes(),
                     res.refused, res.timed_out, res.wall_s)
            mesh.check_alive()
        status = mesh.status()
        reports = mesh.stop()
        problems = check(results, status, reports, mesh.world)
        failed = bool(problems)
    except Interrupted as exc:
        interrupted = True
        problems.append(f"interrupted: {exc}")
        log.error("interrupted: %s", exc)
    except Exception as exc:  # noqa: BLE001 - report what was measured, then clean up
        problems.append(f"{type(exc).__name__}: {exc}")
        log.exception("run failed")
    finally:
        signal.alarm(0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup runs to its end
        # The logs stay for a failed run, not for an interrupted one.
        cleanup = mesh.close(keep_dir=args.keep_logs or (bool(problems) and not interrupted))
        problems += [f"cleanup: {c}" for c in cleanup]
    text = table(results, args.nodes, args.workers)
    command = "PYTHONPATH=. .venv/bin/python bench/mesh/run.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    verdict = ("checks: all held (no rank switched without a COMMIT, every epoch committed, "
               "aborted or skipped, every rank on the leader's placement"
               + (", a forced epoch committed after the partition" if "d" in args.scenarios else "")
               + ")") if not problems else "checks FAILED:\n" + "\n".join(f"- {x}" for x in problems)
    path = "per-worker relay" if args.per_worker_relay else "per-node answers (the default path)"
    header = (f"mesh on {os.cpu_count()} CPU cores, {path}, step {args.step_ms:g} ms, counts flushed every "
              f"{args.flush_every} steps, relay nice {args.relay_nice}, node-timeout "
              f"{args.node_timeout:g} s, RTO {args.rto_ms:g} ms, {time.monotonic() - started:.0f} s "
              "in all")
    print(f"\n{header}\n\n{text}\n\n{verdict}")
    if mesh.base_dir.exists():
        print(f"logs kept in {mesh.base_dir / 'logs'}", file=sys.stderr)
    out = args.results or REPO / "bench" / "results" / f"mesh_cpu{os.cpu_count()}core.md"
    if str(out) != "-":
        out.write_text(f"# bench/mesh/run.py\n\n```\n{command}\n```\n\n{header}\n\n{text}\n\n"
                       f"{verdict}\n")
    if args.json:
        args.json.write_text(json.dumps({"nodes": args.nodes, "workers": args.workers,
                                         "problems": problems,
                                         "namespace_prefix": mesh.topo.prefix,
                                         "results": [r.as_dict() for r in results]}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
