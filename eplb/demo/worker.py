"""One synthetic EP rank of the demo: routes tokens, counts through :class:`WorkerHook`, keeps
small expert weights and moves them for real (gloo P2P) when a rebalance commits.

Step time is simulated the way EP decode behaves: every layer waits for its most loaded GPU, so
a step takes ``step_ms`` × mean over layers of (max GPU load / mean GPU load). The per-GPU loads
are summed over ranks with an all-reduce each step, which also keeps ranks in lockstep as an
engine's token dispatch does.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import statistics
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb.demo.workload import popularity, route
from eplb.placement.load import gpu_loads
from eplb.placement.rules import default_placement, placement_hash
from eplb.worker_hook import HookError, WorkerHook
from eplb.worker_hook.copy_exec import CopyExecutor


def expert_value(layer: int | torch.Tensor, expert: torch.Tensor, width: int) -> torch.Tensor:
    """The weights expert ``expert`` of ``layer`` must hold: ``[..., width]`` float32 values
    that name the layer and expert exactly (integers below 2**24)."""
    base = (layer * 100_000 + expert.to(torch.int64) * 1_000).unsqueeze(-1)
    return (base + torch.arange(width) % 1000).to(torch.float32)


def verify_weights(weights: torch.Tensor, phys2log: torch.Tensor, rank: int, num_gpus: int) -> int:
    """Count slots of this rank whose weights do not match their expert.

    Args:
        weights: ``[L, P/G, D]``; phys2log: ``[L, P]``.
    """
    per_gpu = phys2log.shape[1] // num_gpus
    local = phys2log[:, rank * per_gpu:(rank + 1) * per_gpu]  # [L, P/G]
    layers = torch.arange(phys2log.shape[0]).unsqueeze(1)
    expected = expert_value(layers, local, weights.shape[2])
    return int((weights != expected).any(dim=2).sum())


class EventLog:
    """``on_event`` callback: logs protocol messages as JSON lines with the step they met.

    With ``delay_first_prepare`` it also injects the fault the tests use for "a worker already
    past S": after the first PLAN it keeps the hook's socket thread away from the next message
    (the PREPARE) until the decode loop has stalled or run 100 steps on.
    """

    def __init__(self, path: str | None, delay_first_prepare: bool) -> None:
        self.path = path
        self.delay = delay_first_prepare
        self.hook: WorkerHook | None = None

    def __call__(self, msg) -> None:
        step = self.hook.current_step if self.hook else -1
        if self.path:
            entry = {"type": msg.TYPE, "epoch": getattr(msg, "epoch", None), "at_step": step,
                     "t": time.time(),
                     "step": getattr(msg, "step", None), "reason": getattr(msg, "reason", None)}
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.delay and msg.TYPE == "PLAN" and self.hook is not None:
            self.delay = False
            deadline = time.monotonic() + 20.0
            last, last_change = step, time.monotonic()
            while time.monotonic() < deadline:
                now_step = self.hook.current_step
                if now_step != last:
                    last, last_change = now_step, time.monotonic()
                if now_step >= step + 100 or time.monotonic() - last_change > 0.5:
                    break
                time.sleep(0.01)


class TrackedCopier:
    """The demo's copy engine (a :class:`~eplb.worker_hook.copy_engine.CopyEngine`): a
    :class:`CopyExecutor` that notes, per call, whether it started transfers (``start``) or
    landed them (``land``) in the step the loop last set."""

    def __init__(self, copier: CopyExecutor) -> None:
        self.copier = copier
        self.pipeline_depth = copier.pipeline_depth
        self.step = -1
        self.work: list[str] = []  # "start" / "land", in call order

    def land(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor):
        self.work.append("land")
        return self.copier.land(epoch, layers, old, new)

    def prefetch(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        self.copier.prefetch(epoch, layers, old, new)

    def start(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        self.work.append("start")
        self.copier.start(epoch, layers, old, new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="eplb demo worker (started by eplbctl demo)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--ranks-per-node", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dist-init", required=True, help="tcp://127.0.0.1:PORT for gloo")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--physical", type=int, default=24)
    p.add_argument("--width", type=int, default=256, help="float32 values per expert weight")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--drift-every", type=int, default=400)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hold-timeout", type=float, default=30.0,
                   help="longest wait at a promised switch step S for the epoch's outcome "
                        "(WorkerHook hold_timeout_s)")
    p.add_argument("--result", required=True, help="JSON file to write the worker's numbers to")
    p.add_argument("--events", default=None,
                   help="append each protocol message this worker receives to this JSON-lines file")
    p.add_argument("--no-lockstep", action="store_true",
                   help="skip the per-step all-reduce: ranks step independently and meet only "
                        "in the copies at S (tests use it to kill a rank without failing the "
                        "others' collectives)")
    p.add_argument("--delay-first-prepare", action="store_true",
                   help="fault injection for tests: hold back the first PREPARE until this rank's "
                        "decode loop has stalled at or passed the switch step, forcing a REFUSE")
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # stacks to the log, for a worker that seems stuck
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank={args.rank} %(name)s: %(message)s")

    rank, world = args.rank, args.world_size
    torch.set_num_threads(1)  # several ranks share this machine's cores, as GPUs would not
    dist.init_process_group("gloo", init_method=args.dist_init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    per_gpu = args.physical // world
    phys2log = default_placement(args.layers, args.experts, args.physical)
    local = phys2log[:, rank * per_gpu:(rank + 1) * per_gpu]
    weights = expert_value(torch.arange(args.layers).unsqueeze(1), local, args.width).contiguous()
    copier = TrackedCopier(CopyExecutor(rank=rank, num_gpus=world,
                                        weights=[[weights[l]] for l in range(args.layers)],
                                        ranks_per_node=args.ranks_per_node, timeout_s=30.0))
    events = EventLog(args.events, args.delay_first_prepare)
    hook = WorkerHook(rank, world, args.layers, args.experts, args.physical, phys2log,
                      copy_fn=copier, node=rank // args.ranks_per_node, run_dir=args.run_dir,
                      bytes_per_expert=args.width * 4, flush_every=8, on_event=events,
                      hold_timeout_s=args.hold_timeout)
    events.hook = hook
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    result: dict = {"rank": rank, "ok": False}
    # Kept outside the try: the result file reports them however the loop ends (the chaos
    # scripts in bench/chaos read a failed rank's last step, copies and placement).
    hook_us, step_ms, moe_ms, mismatches, checks, copy_steps = [], [], [], 0, 0, []
    served = hook.phys2log.clone()
    switches: list[dict] = []  # every step at which a chunk switched, with the placement after it
    step = -1
    try:
        hook.wait_joined(30.0)
        dist.barrier()
        while args.steps == 0 or step + 1 < args.steps:
            step += 1
            started = time.perf_counter()
            copier.step, work_before = step, len(copier.work)
            hook.on_step(step)
            in_hook = time.perf_counter() - started
            if not torch.equal(served, hook.phys2log):  # a chunk switched: check the weights
                served = hook.phys2log.clone()
                bad = verify_weights(weights, served, rank, world)
                mismatches += bad
                checks += 1
                switches.append({"step": step, "placement_hash": placement_hash(served),
                                 "mismatches": bad, "t": time.time()})
            if len(copier.work) > work_before:  # transfers started or landed in this step
                copy_steps.append({"step": step, "ms": in_hook * 1e3,
                                   "kinds": copier.work[work_before:], "t": time.time()})
            else:
                hook_us.append(in_hook * 1e6)
            probs = popularity(args.layers, args.experts, step, args.seed, drift_every=args.drift_every)
            ids = route(probs, args.tokens, args.top_k, args.seed, step, rank)
            for layer in range(args.layers):
                hook.record(layer, ids[layer])
            local_counts = torch.zeros(args.layers, args.experts, dtype=torch.float64)
            local_counts.scatter_add_(1, ids.reshape(args.layers, -1),
                                      torch.ones(args.layers, ids[0].numel(), dtype=torch.float64))
            loads = gpu_loads(local_counts, served, world)  # [L, G]
            # One all-reduce per step: the GPU loads summed over ranks, plus a stop vote so that
            # every rank leaves the loop at the same step when any of them is told to stop.
            if args.no_lockstep:
                if stop_requested.is_set():
                    break
            else:
                stop_vote = torch.full((args.layers, 1), float(stop_requested.is_set()),
                                       dtype=torch.float64)
                shared = torch.cat([loads, stop_vote], dim=1)
                dist.all_reduce(shared)
                loads = shared[:, :-1]
                if shared[0, -1] > 0:
                    break
            imbalance = float((loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)).mean())
            moe_ms.append(args.step_ms * imbalance)
            time.sleep(moe_ms[-1] / 1e3)
            step_ms.append((time.perf_counter() - started) * 1e3)
        hook_sorted = sorted(hook_us)
        result.update({
            "ok": mismatches == 0,
            "steps": step + 1,
            "hook_us_p50": statistics.median(hook_us),
            "hook_us_p99": hook_sorted[int(0.99 * (len(hook_sorted) - 1))],
            "hook_us_max": hook_sorted[-1],
            "max_on_step_ms": hook.max_on_step_seconds * 1e3,
            "step_ms": step_ms,
            "moe_ms": moe_ms,
            "weight_checks": checks,
            "weight_mismatches": mismatches,
            "copy_steps": copy_steps,
            "placement": served.tolist(),
        })
    except HookError as exc:
        result["error"] = str(exc)
        result["error_type"] = type(exc).__name__
    except Exception as exc:  # a failed collective (a peer died), ...: say so in the result
        logging.getLogger("eplb.demo.worker").exception("rank %d: the decode loop failed", rank)
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["error_type"] = type(exc).__name__
    finally:
        result.setdefault("steps", step + 1)
        result.setdefault("weight_checks", checks)
        result.setdefault("weight_mismatches", mismatches)
        result.setdefault("copy_steps", copy_steps)
        result.setdefault("placement", served.tolist())
        result["last_step"] = step
        result["switches"] = switches
        result["placement_hash"] = placement_hash(served)
        with open(args.result, "w") as f:
            json.dump(result, f)
        hook.close()
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
