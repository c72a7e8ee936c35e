"""The rebalance protocol at 18 to 1,000 nodes x 8 ranks, simulated on the real cores, per-node
aggregation and the per-worker path side by side.

Runs :class:`eplb.sim.cluster.Simulation` (the real LeaderCore with its NodeMembership, one real
FollowerCore per node, with its NodeAggregator or without, one real WorkerAgreement per rank; a
virtual clock, a network model; no sockets) for each cluster size, path and scenario, and writes
``bench/results/sim.md``:

* ``clean``: the network alone (lognormal one-way latency, no loss), ``--epochs`` epochs;
* ``dead``: the last node dies as the leader sends the PLAN of epoch 1 (the leader core's node
  time-out must notice it); one epoch;
* ``faults`` (not by default): 0.5 % of frames retransmitted (one 200 ms RTO each) and one slow
  node (frames +1 ms, steps x1.5);
* ``nocounts`` (not by default): as ``clean`` without the periodic COUNTS.

    .venv/bin/python bench/simulate.py                          # both paths, 18 72 144 1000
    .venv/bin/python bench/simulate.py --path node --nodes 18 72 --scenarios clean
    .venv/bin/python bench/simulate.py --nodes 1000 --json /tmp/a.json   # rows to a file
    .venv/bin/python bench/simulate.py --merge /tmp/a.json /tmp/b.json   # table from files
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eplb.sim.cluster import Costs, Scenario, Simulation  # noqa: E402
from eplb.sim.network import NetworkModel  # noqa: E402
from eplb.sim.report import Row, summarize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sim.md"
GOALS = {144: 3.0, 1000: 5.0}  # issue 17: agreement p99 <= this x the network's p99 RTT
PATHS = {"node": True, "worker": False}  # --path -> Scenario.aggregate
SCENARIOS = ["clean", "dead", "faults", "nocounts"]


def scenario(name: str, nodes: int, epochs: int, seed: int, layers: int = 58,
             aggregate: bool = True, max_virtual_s: float = 300.0) -> Scenario:
    base = Scenario(nodes=nodes, epochs=epochs, seed=seed, num_layers=layers,
                    aggregate=aggregate, max_virtual_s=max_virtual_s)
    if name == "clean":
        return base
    if name == "faults":
        return dataclasses.replace(base, network=NetworkModel(loss=0.005),
                                   slow_node=nodes - 1)
    if name == "nocounts":
        return dataclasses.replace(base, flush_every=0)
    if name == "dead":
        return dataclasses.replace(base, dead_node=nodes - 1, dead_at_epoch=1, epochs=1)
    raise SystemExit(f"unknown scenario {name!r}: {', '.join(SCENARIOS)}")


def _f(v: object, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ratio(r: Row, v: float | None) -> str:
    return "-" if v is None else f"{v / r.rtt_p99_ms:.1f}x"


#: (header, what one path's row shows); the dead column reads the ``dead`` row of the same path.
COLUMNS = [
    ("epochs (committed)", lambda r, d: f"{r.attempts} ({r.committed})"
     + (f", cut at {r.virtual_s:.0f} s" if r.capped else "")),
    ("P->C p50 ms (x RTT p99)", lambda r, d: f"{_f(r.agree_p50_ms)} ({_ratio(r, r.agree_p50_ms)})"),
    ("P->C p99 ms (x RTT p99)", lambda r, d: f"{_f(r.agree_p99_ms)} ({_ratio(r, r.agree_p99_ms)})"),
    ("margin S needed (chosen), steps",
     lambda r, d: (f"{_f(r.needed_max)} ({r.margin_min}-{r.margin_max})"
                   + (f", {r.missed} missed: a rank held {r.max_hold_ms:.0f} ms" if r.missed
                      else "")) if r.margin_min is not None else "-"),
    ("aborted", lambda r, d: f"{r.aborted} ({r.abort_causes})" if r.aborted else "0"),
    ("live nodes lost", lambda r, d: str(r.false_node_losses)),
    ("dead node noticed s", lambda r, d: "-" if d is None else _f(d.dead_noticed_s)),
    ("leader CPU ms / flush", lambda r, d: _f(r.leader_cpu_ms_per_flush, 0)),
    ("leader busy %", lambda r, d: _f(r.leader_busy_pct, 0)),
    ("leader frames / flush", lambda r, d: _f(r.leader_frames_per_flush, 0)),
    ("busiest follower CPU ms / flush", lambda r, d: _f(r.follower_cpu_ms_per_flush, 1)),
    ("wall s", lambda r, d: _f(r.wall_s + (d.wall_s if d is not None else 0.0), 0)),
]


def table(rows: list[Row], name: str = "clean") -> str:
    """One line per cluster size; each cell is ``per-node / per-worker`` (the paths run)."""
    main = [r for r in rows if r.scenario == name]
    dead = {(r.nodes, r.path): r for r in rows if r.scenario == "dead"}
    paths = [p for p in PATHS if any(r.path == p for r in main)]
    head = ["nodes x 8 (L)", "path", *(h for h, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for nodes in sorted({r.nodes for r in main}):
        by_path = {r.path: r for r in main if r.nodes == nodes}
        got = [p for p in paths if p in by_path]
        cells = [f"{nodes} (L={by_path[got[0]].layers})", " / ".join(got)]
        for _, show in COLUMNS:
            cells.append(" / ".join(show(by_path[p], dead.get((nodes, p))) for p in got))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.scenario != "clean" or r.agree_p99_ms is None:
            continue
        limit = GOALS.get(r.nodes)
        ratio = r.agree_p99_ms / r.rtt_p99_ms
        verdict = ("" if limit is None else
                   f" (goal <= {limit:g}x: {'met' if ratio <= limit else 'NOT met'})")
        out.append(f"- {r.nodes} nodes x 8, per-{r.path} path: PREPARE->COMMIT p99 "
                   f"{r.agree_p99_ms:.2f} ms = {ratio:.1f}x the network's p99 RTT of "
                   f"{r.rtt_p99_ms:.2f} ms{verdict}; {r.committed} of {r.attempts} epochs "
                   "committed")
    for nodes, limit in GOALS.items():
        if not any(r.scenario == "clean" and r.nodes == nodes and r.agree_p99_ms is not None
                   for r in rows):
            out.append(f"- {nodes} nodes x 8: no committed epoch measured (goal <= {limit:g}x "
                       "not shown met)")
    return out


def markdown(rows: list[Row], command: str) -> str:
    sc = Scenario(nodes=18)
    c = Costs()
    rtt = f"{rows[0].rtt_p50_ms:.2f} / {rows[0].rtt_p99_ms:.2f} ms" if rows else "-"
    extra = [name for name in SCENARIOS[2:] if any(r.scenario == name for r in rows)]
    lines = [
        "# The agreement at scale, simulated on the real cores: per-node and per-worker paths",
        "",
        f"{command} on the 2-core CPU dev machine (bench/simulate.py, eplb/sim/). Every "
        "message is handled by the real cores on a virtual clock, no sockets: the leader's "
        "`LeaderCore` (its `NodeMembership` decides when a node is lost), one `FollowerCore` "
        "per node (per-node path: with its `NodeAggregator`; per-worker path: without), one "
        "`WorkerAgreement` per rank; what crosses between follower and leader is the real "
        "envelope. Leader and followers are queues: each item costs the CPU time the real core "
        "call took here (thread time), plus the decoder's time on frames a sidecar admits "
        f"from its own workers, {c.send_s * 1e6:g} us per message sent to another node, "
        f"{c.persist_s * 1e3:g} ms per decision-log append. Times are virtual.",
        "",
        f"- Network: {sc.network.describe()}; RTT p50 / p99 {rtt}. Steps "
        f"{sc.step_s * 1e3:g} ms in lockstep; COUNTS every {sc.flush_every} steps (the flush "
        f"interval, {sc.flush_every * sc.step_s:.2f} s), HEARTBEAT and NODE_HEARTBEAT every "
        f"{sc.heartbeat_s:g} s, node time-out {sc.node_timeout_s:g} s, follower tick "
        f"{sc.follower_tick_s * 1e3:g} ms. L=58, E=256 (1,000 nodes: L=8, memory). Epochs "
        f"forced one after another, {sc.gap_s:g} s apart.",
        "- P->C: the leader's PREPARE sent -> COMMIT sent. margin S needed: the smallest "
        "S - max PLAN_ACK step with which no rank reached S before its outcome came (max over "
        "epochs); chosen: what the leader chose. dead node noticed: from its death to the "
        "leader core's tick that lost it (`dead` run; its epoch aborts, NODE_LOST). Leader "
        "frames: what it decoded (a RELAY's header and each frame in it, a node message, a "
        "local frame). Per flush interval = after the group joined.",
        "",
        "Each cell: per-node / per-worker.",
        "",
        table(rows, "clean"),
        "",
    ]
    for name in extra:
        lines += [f"Scenario `{name}`:", "", table(rows, name), ""]
    lines += ["## Goals (issue 17)", "", *goals(rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[18, 72, 144, 1000])
    ap.add_argument("--path", choices=["node", "worker", "both"], default="both")
    ap.add_argument("--scenarios", nargs="+", default=["clean", "dead"], choices=SCENARIOS)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--large-epochs", type=int, default=3,
                    help="epochs for 500 nodes or more (8,000 real WorkerAgreements check "
                         "each PLAN: ~half a minute of wall time an epoch here)")
    ap.add_argument("--large-layers", type=int, default=8,
                    help="L for 500 nodes or more: 8,000 real WorkerAgreements each hold two "
                         "[L, 8000] int64 placements (L=58: ~60 GB, L=8: ~8 GB)")
    ap.add_argument("--large-virtual-s", type=float, default=15.0,
                    help="virtual seconds a run of 500 nodes or more is cut at (a saturated "
                         "leader's queue would otherwise run for many minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--merge", type=Path, nargs="+", help="no runs: the table from these files")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.disable(logging.ERROR)  # the cores log every rank a lost node takes with it
    command = "bench/simulate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    shown = f"`{command}`"  # what made the table
    paths = list(PATHS) if args.path == "both" else [args.path]
    rows: list[Row] = []
    if args.merge:
        seen: set[tuple[str, str, int]] = set()
        commands = []
        for path in args.merge:  # the first row of each (scenario, path, nodes) counts
            saved = json.loads(path.read_text())
            commands.append(saved["command"])
            for d in saved["rows"]:
                key = (d["scenario"], d["path"], d["nodes"])
                if key not in seen:
                    seen.add(key)
                    rows.append(Row(**d))
        shown = " + ".join(f"`{c}`" for c in commands) + f" (table: `{command}`)"
    else:
        t0 = time.perf_counter()
        for name in args.scenarios:
            for nodes in args.nodes:
                for path in paths:
                    large = nodes >= 500
                    sc = scenario(name, nodes, args.large_epochs if large else args.epochs,
                                  args.seed, args.large_layers if large else 58, PATHS[path],
                                  args.large_virtual_s if large else 300.0)
                    row = summarize(name, Simulation(sc).run())
                    rows.append(row)
                    print(f"{name} {nodes} x 8 per-{path}: {row.committed}/{row.attempts} "
                          f"committed, P->C p50/p99 {_f(row.agree_p50_ms)}/"
                          f"{_f(row.agree_p99_ms)} ms, dead noticed "
                          f"{_f(row.dead_noticed_s)} s, leader CPU "
                          f"{row.leader_cpu_ms_per_flush:.0f} ms/flush, wall {row.wall_s:.0f} s",
                          flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(
                            {"command": command, "rows": [r.as_dict() for r in rows]}, indent=1))
        print(f"simulation wall time: {time.perf_counter() - t0:.1f} s")
    print(table(rows))
    for line in goals(rows):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, shown))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
