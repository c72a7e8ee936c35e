"""Decode-loop tail latency while experts move: stop-the-world vs in-engine async vs sidecar.

A stand-in EP decode engine (``bench/decode_engine.py``: DeepSeek-V3 expert shapes, a skewed and
drifting router, ``all_to_all_single`` dispatch and combine, the real expert matmuls) runs on
``--world`` processes, one per GPU (NCCL; gloo with ``--device cpu``). The same spawned processes
run every mode one after the other, each from the same initial placement, the same router seed
and drift, the same number of steps, one rebalance triggered at ``--rebalance-at``:

  no-rebalance    the baseline: same workload, no rebalance.
  stop-the-world  at the trigger step: all-reduce the window's counts (NCCL), plan on the main
                  thread, copy every changed layer, then run the step (SGLang/vLLM's default).
  async           in-engine async (SGLang PR #8529): at the trigger step the counts go to the host
                  without a sync; a background thread all-reduces them on a gloo group, plans, and
                  agrees on the begin step with a gloo all-reduce(max) of each rank's proposal
                  (current step + --async-margin); the main thread holds at its own proposal if the
                  answer is late; from the begin step it copies --layers-per-step layers per step.
  sidecar         this project: a real ``eplb-sidecar`` (one per node; here one node with --world
                  workers) with --interval = --rebalance-at, and ``WorkerHook(copy_fn=...)`` counting
                  with ``record()`` and copying one chunk per step from the agreed step S.
  sidecar-ahead   the same with ``CopyExecutor.start`` offered to the hook: each chunk's transfers
                  go out one step before the step that lands them (unpack) and switches its
                  layers, so the wire runs beside the engine's step.

All modes copy with ``eplb.worker_hook.copy_exec.CopyExecutor`` (on a process group of its own) and plan with
``eplb.placement.planner.plan_placement`` (--policy), so they differ only in when and where they
plan, agree and copy. The baseline, stop-the-world and async modes count with their own device
tensor (one ``index_add_`` per layer, as ``record()`` does). Step time is wall time from the end of
one step to the end of the next, the end marked by ``torch.cuda.synchronize()``: that sync is the
benchmark's measurement, not the hook's (the hook's calls are checked under
``torch.cuda.set_sync_debug_mode("error")`` for --sync-check-steps steps). Each rank's time per
step is taken; the table uses the slowest rank of every step.

After each mode every slot of every rank is compared bit-exactly with the value that names its
(layer, expert), and the ranks' placements are compared with each other.

GPU memory per rank (defaults): weights L x S x 88 MB = 8 x 9 x 88 MB = 6.3 GB, copy staging up to
about 2 x S x 88 MB = 1.6 GB, the P2P ceiling buffers 2 x --ceiling-mb, activations < 0.3 GB:
about 9 GB. Run time on 2 x H200 with defaults: about 5 x 2000 steps of 12-25 ms plus start-up,
3-5 minutes.

    python3 bench/decode_gpu.py --out bench/results/h100x2_decode.md          # every visible GPU
    python3 bench/decode_gpu.py --device cpu --world 2 --hidden 64 --inter 32 --tokens 32 \\
        --layers 4 --steps 200 --warmup 20 --rebalance-at 110 --window 60 --out /tmp/d.md  # dry run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for _p in (REPO, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from copy_gpu import ceiling as measure_ceiling, sync  # noqa: E402
from decode_engine import Shape, StandInMoE  # noqa: E402
from eplb.placement.planner import POLICIES, PlannerSpec, plan_placement  # noqa: E402
from eplb.placement.load import overall_balancedness  # noqa: E402
from eplb.placement.rules import default_placement, placement_hash  # noqa: E402
from eplb.worker_hook.copy_exec import CopyExecutor  # noqa: E402
from eplb.placement.copy_plan import changed_layers, chunk_layers  # noqa: E402

MODES = ("no-rebalance", "stop-the-world", "async", "sidecar", "sidecar-ahead")
MODE_TITLES = {"no-rebalance": "no rebalance", "stop-the-world": "stop-the-world",
               "async": "in-engine async", "sidecar": "sidecar (eplb)",
               "sidecar-ahead": "sidecar, sent a step ahead"}
SIDECAR_MODES = ("sidecar", "sidecar-ahead")
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
AROUND = 5  # steps before the trigger and after the last copy counted in the "extra time"
OWN_NORMAL_STEPS = 50  # a run's "normal" step: the median of this many steps before the trigger


# --- measurement helpers ----------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def warm_p2p(device: torch.device, group=None) -> None:
    """One small send/recv between every pair of ranks (of ``group``, which spans every rank),
    so that no mode pays NCCL's lazy point-to-point connection set-up inside its timed copies."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for d in range(1, world):
        send = torch.ones(1024, device=device)
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, (rank + d) % world, group),
               dist.P2POp(dist.irecv, recv, (rank - d) % world, group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    sync(device)


def memory_estimate_gb(args) -> float:
    """Device memory one rank needs: weights, the copy engine's staging (about two layers' worth
    of experts on a layer that changes completely), the ceiling's two buffers, activations."""
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    expert = 3 * args.hidden * args.inter * elem
    rows = args.tokens * args.topk
    activations = 8 * rows * args.hidden * elem
    return (args.layers * args.slots * expert + 2 * args.slots * expert
            + 2 * args.ceiling_mb * 1e6 + activations) / 1e9


# --- the three ways to rebalance (the sidecar's lives in the hook) -------------------------------

class Ctx:
    """What a mode needs from its rank."""

    def __init__(self, args, rank: int, device: torch.device, engine: StandInMoE,
                 copier: CopyExecutor, side: dist.ProcessGroup, own: torch.Tensor) -> None:
        self.args, self.rank, self.device = args, rank, device
        self.engine, self.copier, self.side, self.own = engine, copier, side, own
        self.shape = engine.shape
        self.spec = PlannerSpec(policy=args.policy)
        self.copies: list[dict] = []
        self.prefetches: list[dict] = []
        self.starts: list[dict] = []
        self.events: list[dict] = []
        self.step = -1
        self.can_prefetch = callable(getattr(copier, "prefetch", None))

    def apply_copy(self, epoch: int, layers: list[int], old: torch.Tensor,
                   new: torch.Tensor):
        """The engine's copy: move the weights of ``layers``, then switch their routing maps.
        Used by every mode (through :class:`EngineCopy`, the sidecar mode's ``copy_fn``)."""
        stats = self.copier(epoch, list(layers), old, new)
        self.engine.set_layers(list(layers), new)
        self.copies.append({"step": self.step, "layers": [int(x) for x in layers],
                            "seconds": stats.seconds, "bytes_received": stats.bytes_received,
                            "bytes_sent": stats.bytes_sent,
                            "prefetched_layers": int(getattr(stats, "prefetched_layers", 0)),
                            "started_layers": int(getattr(stats, "started_layers", 0))})
        return stats

    def start(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        """Issue a chunk's transfers now; the copy at the next step lands them (sidecar-ahead)."""
        started = time.perf_counter()
        self.copier.start(epoch, list(layers), old, new)
        self.starts.append({"step": self.step, "layers": [int(x) for x in layers],
                            "seconds": time.perf_counter() - started})

    def prefetch(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> None:
        """Let the copy engine prepare a chunk before its step (packing what this rank sends)."""
        started = time.perf_counter()
        self.copier.prefetch(epoch, list(layers), old, new)
        self.prefetches.append({"step": self.step, "layers": [int(x) for x in layers],
                                "seconds": time.perf_counter() - started})

    def plan(self, load: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, dict]:
        started = time.perf_counter()
        # The current placement too, as the sidecar's planner gets it (stable keeps what it can).
        new = plan_placement(load, self.shape.physical, self.shape.world, self.spec, current=old)
        info = {"plan_ms": (time.perf_counter() - started) * 1e3,
                "balancedness_before": overall_balancedness(load, old, self.shape.world),
                "balancedness_predicted": overall_balancedness(load, new, self.shape.world),
                "experts_moved": int((new != old).sum())}
        return new, info


class EngineCopy:
    """The sidecar modes' copy engine (a :class:`~eplb.worker_hook.copy_engine.CopyEngine`):
    lands through :meth:`Ctx.apply_copy`, prefetches when the copier can; with ``ahead`` its
    pipeline depth is 1 (the hook sends each chunk a step before it lands), else 0 (each chunk
    copied in one call at its step)."""

    def __init__(self, ctx: Ctx, ahead: bool = False) -> None:
        self.ctx = ctx
        self.pipeline_depth = 1 if ahead else 0

    def prefetch(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        if self.ctx.can_prefetch:
            self.ctx.prefetch(epoch, layers, old, new)

    def start(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        self.ctx.start(epoch, layers, old, new)

    def land(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor):
        return self.ctx.apply_copy(epoch, layers, old, new)


class NoRebalance:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def before_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class StopTheWorld(NoRebalance):
    """At the trigger step: all-reduce counts (a collective), plan here, copy every layer."""

    def before_step(self, step: int) -> None:
        c, a = self.ctx, self.ctx.args
        if step == a.rebalance_at - a.window:
            c.own.zero_()
        if step != a.rebalance_at:
            return
        started = time.perf_counter()
        load = c.own.clone()
        dist.all_reduce(load)
        load = load.cpu()
        gathered = time.perf_counter()
        old = c.engine.phys2log.clone()
        new, info = c.plan(load, old)
        placed = new.to(c.device)
        dist.broadcast(placed, 0)  # every rank serves rank 0's plan, whatever the planner does
        new = placed.cpu()
        layers = changed_layers(old, new)
        copy_started = time.perf_counter()
        if layers:
            c.apply_copy(1, layers, old, new)
        info.update({"epoch": 1, "outcome": "committed", "trigger_step": step,
                     "switch_step": step, "gather_ms": (gathered - started) * 1e3,
                     "copy_ms": (time.perf_counter() - copy_started) * 1e3,
                     "total_ms": (time.perf_counter() - started) * 1e3,
                     "chunks": 1 if layers else 0, "layers_changed": len(layers),
                     "placement_hash": placement_hash(new)})
        c.events.append(info)


class InEngineAsync(NoRebalance):
    """SGLang PR #8529's shape: plan on a thread of the engine process, agree on the begin step
    over a CPU (gloo) group, then copy a chunk per step."""

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.current = -1
        self.promise: int | None = None
        self.begin: int | None = None
        self.error: BaseException | None = None
        self.chunks: list[list[int]] = []
        self.old = self.new = None
        self.thread: threading.Thread | None = None
        self.info: dict = {}
        self.prefetched = -1  # len(self.chunks) when the next chunk was last prefetched

    def before_step(self, step: int) -> None:
        c, a = self.ctx, self.ctx.args
        if step == a.rebalance_at - a.window:
            c.own.zero_()
        with self.lock:
            self.current = step
            if self.promise is not None and self.begin is None and step >= self.promise:
                # This rank promised (by proposing self.promise) not to run that step before the
                # agreed begin step is known: hold, with a deadline.
                held = time.perf_counter()
                deadline = held + a.hold_timeout
                while self.begin is None and self.error is None:
                    if not self.cond.wait(max(0.0, deadline - time.perf_counter())):
                        raise TimeoutError(f"rank {c.rank}: no agreed begin step within "
                                           f"{a.hold_timeout:g}s")
                self.info["hold_ms"] = self.info.get("hold_ms", 0.0) + \
                    (time.perf_counter() - held) * 1e3
            if self.error is not None:
                raise RuntimeError(f"rank {c.rank}: async rebalance failed") from self.error
        if step == a.rebalance_at:
            if c.device.type == "cuda":
                buf = torch.empty(c.own.shape, dtype=c.own.dtype, pin_memory=True)
                buf.copy_(c.own, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                buf, ready = c.own.clone(), None
            self.info.update({"epoch": 1, "trigger_step": step})
            self.thread = threading.Thread(target=self._background, args=(buf, ready),
                                           name="async-eplb", daemon=True)
            self.thread.start()
        if self.begin is not None and step >= self.begin and self.chunks:
            layers = self.chunks.pop(0)
            c.apply_copy(1, layers, self.old, self.new)
            if not self.chunks:
                self.info["outcome"] = "committed"
        # The same prefetch pattern as the hook's: the first chunk on the first step that knows
        # the begin step (if before it), each later chunk right after the previous one.
        if (a.async_prefetch and c.can_prefetch and self.begin is not None and self.chunks
                and self.prefetched != len(self.chunks)):
            self.prefetched = len(self.chunks)
            try:
                c.prefetch(1, self.chunks[0], self.old, self.new)
            except Exception as exc:  # noqa: BLE001 - as the hook: the copy plans again
                print(f"rank {c.rank}: prefetch failed ({exc}); the copy plans again",
                      file=sys.stderr)

    def _background(self, buf: torch.Tensor, ready) -> None:
        c, a = self.ctx, self.ctx.args
        try:
            started = time.perf_counter()
            if ready is not None:
                ready.synchronize()  # this thread waits for the copy, not the decode loop
            load = buf.clone()
            dist.all_reduce(load, group=c.side)
            gathered = time.perf_counter()
            old = c.engine.phys2log.clone()  # no copy runs before the begin step
            new, info = c.plan(load, old)
            new = new.contiguous()
            dist.broadcast(new, 0, group=c.side)
            layers = changed_layers(old, new)
            chunks = chunk_layers(layers, layers_per_chunk=a.layers_per_step)
            agree = time.perf_counter()
            with self.lock:
                proposal = self.current + a.async_margin
                self.promise = proposal
            agreed = torch.tensor([proposal], dtype=torch.int64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=c.side)
            done = time.perf_counter()
            with self.lock:
                self.info.update(info)
                self.info.update({"gather_ms": (gathered - started) * 1e3,
                                  "agree_ms": (done - agree) * 1e3,
                                  "background_ms": (done - started) * 1e3,
                                  "switch_step": int(agreed), "chunks": len(chunks),
                                  "layers_changed": len(layers),
                                  "placement_hash": placement_hash(new)})
                self.old, self.new, self.chunks = old, new, chunks
                self.begin = int(agreed)
                if not chunks:
                    self.info["outcome"] = "committed"
                self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the decode thread
            with self.lock:
                self.error = exc
                self.cond.notify_all()

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join(self.ctx.args.hold_timeout)
        if self.error is not None:
            raise RuntimeError("async rebalance failed") from self.error
        if self.info:
            self.info.setdefault("outcome", "incomplete: the run ended before every chunk")
            self.ctx.events.append(self.info)


# --- one rank -------------------------------------------------------------------------------

def arm_sync_check(device: torch.device) -> str:
    """Prove that sync debug mode catches a synchronizing call here; '' when it does."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ones(1, device=device).item()
    except RuntimeError:
        return ""
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return "sync debug mode did not catch .item(); the check would prove nothing"


def sidecar_history(run_dir: str, timeout_s: float) -> dict:
    """The leader's status once no epoch is in flight or being planned (rank 0 asks)."""
    from eplb.control_client import ControlError, control_call

    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            status = control_call("status", {}, Path(run_dir), timeout_s=5.0)
            if status.get("epoch_in_flight") is None and not status.get("planning"):
                return status
        except ControlError:
            pass
        time.sleep(0.05)
    status["timed_out"] = True
    return status


def run_mode(mode: str, args, rank: int, device: torch.device, engine: StandInMoE,
             side, run_dir: str | None, copy_group) -> dict:
    s = engine.shape
    # A fresh copy engine per mode: nothing prepared in one mode can leak into the next. Its
    # own process group (NCCL communicator) in every mode, so that transfers sent a step ahead
    # can run beside the engine's all-to-all instead of queueing behind it.
    copier = CopyExecutor(rank, args.world, engine.weights, ranks_per_node=args.world,
                          timeout_s=args.collective_timeout, group=copy_group)
    initial = default_placement(s.layers, s.experts, s.physical)
    engine.reset(initial)
    own = torch.zeros(s.layers, s.experts, dtype=torch.int64, device=device)
    hist = torch.zeros(args.steps, s.layers, s.experts, dtype=torch.int64, device=device)
    ones = torch.ones(s.tokens * s.topk, dtype=torch.int64, device=device)
    ctx = Ctx(args, rank, device, engine, copier, side, own)
    controller = {"no-rebalance": NoRebalance, "stop-the-world": StopTheWorld,
                  "async": InEngineAsync, "sidecar": NoRebalance,
                  "sidecar-ahead": NoRebalance}[mode](ctx)
    hook = None
    sync_check = {"steps": 0, "error": "", "armed": ""}
    if mode in SIDECAR_MODES:
        from eplb.worker_hook import WorkerHook

        hook = WorkerHook(rank, s.world, s.layers, s.experts, s.physical, initial,
                          copy_fn=EngineCopy(ctx, ahead=mode == "sidecar-ahead"), device=device, node=0, run_dir=run_dir,
                          bytes_per_expert=s.bytes_per_expert(engine.dtype),
                          flush_every=args.flush_every, hold_timeout_s=args.hold_timeout)
        hook.wait_joined(60.0)
        if device.type == "cuda":
            sync_check["armed"] = arm_sync_check(device) or "yes"
    check_from, check_to = args.warmup, args.warmup + args.sync_check_steps
    step_s: list[float] = []
    on_step_us: list[float] = []
    record_us: list[float] = []
    sync(device)
    dist.barrier()
    sync(device)
    t_prev = time.perf_counter()
    try:
        for step in range(args.steps):
            ctx.step = step
            work_before = len(ctx.copies), len(ctx.prefetches), len(ctx.starts)
            checking = (hook is not None and device.type == "cuda" and sync_check["armed"] == "yes"
                        and check_from <= step < check_to and not sync_check["error"])
            in_hook = 0.0
            if hook is not None:
                if checking:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    t0 = time.perf_counter()
                    hook.on_step(step)
                    in_hook = time.perf_counter() - t0
                except RuntimeError as exc:
                    if not checking or "synchroniz" not in str(exc):
                        raise
                    sync_check["error"] = f"on_step at step {step}: {exc}"
                finally:
                    if checking:
                        torch.cuda.set_sync_debug_mode(0)
            else:
                controller.before_step(step)
            ids = engine.route(step)
            engine.count_into(hist[step], ids)
            recorded = 0.0
            for l in range(s.layers):
                if hook is not None:
                    if checking:
                        torch.cuda.set_sync_debug_mode("error")
                    try:
                        t0 = time.perf_counter()
                        hook.record(l, ids[l])
                        recorded += time.perf_counter() - t0
                    except RuntimeError as exc:
                        if not checking or "synchroniz" not in str(exc):
                            raise
                        sync_check["error"] = f"record at step {step}: {exc}"
                    finally:
                        if checking:
                            torch.cuda.set_sync_debug_mode(0)
                else:
                    own[l].index_add_(0, ids[l].reshape(-1), ones)
                engine.layer(l, ids[l])
            sync(device)
            now = time.perf_counter()
            step_s.append(now - t_prev)
            t_prev = now
            if checking:
                sync_check["steps"] += 1
            elif (hook is not None and step >= args.warmup and work_before ==
                  (len(ctx.copies), len(ctx.prefetches), len(ctx.starts))):  # no copy work here
                on_step_us.append(in_hook * 1e6)
                record_us.append(recorded * 1e6)
        controller.finish()
        status = None
        if hook is not None and rank == 0:
            status = sidecar_history(run_dir, 30.0)
        dist.barrier()
    finally:
        if hook is not None:
            hook.close()
    if status is not None:
        for record in status.get("history", []):
            ctx.events.append({**record, "trigger_step": record.get("started_at_step")})
    result = {"step_s": step_s, "copies": ctx.copies, "prefetches": ctx.prefetches,
              "starts": ctx.starts,
              "events": ctx.events,
              "hook_on_step_us": on_step_us, "hook_record_us": record_us,
              "sync_check": sync_check if hook is not None and device.type == "cuda" else None,
              "mismatched_slots": engine.verify(), "slots_checked": s.layers * s.slots,
              "placement_hash": placement_hash(engine.phys2log)}
    if status is not None:
        result["leader_placement_hash"] = status.get("placement_hash")
        result["leader_counters"] = status.get("counters")
        result["leader_status_timed_out"] = bool(status.get("timed_out"))
    # Every rank must serve the same placement.
    mine = engine.phys2log.to(device)
    everyone = [torch.empty_like(mine) for _ in range(s.world)]
    dist.all_gather(everyone, mine)
    result["placements_agree"] = all(torch.equal(everyone[0], t) for t in everyone)
    # Balancedness measured on the counts every rank routed (summed over ranks).
    dist.all_reduce(hist)
    if rank == 0:
        counts = hist.cpu()
        before = counts[max(0, args.rebalance_at - args.window):args.rebalance_at].sum(0)
        after_from = max(0, args.steps - args.window)
        after = counts[after_from:].sum(0)
        result["balancedness"] = {
            "before": overall_balancedness(before, initial, s.world),
            "before_steps": [max(0, args.rebalance_at - args.window), args.rebalance_at],
            "after": overall_balancedness(after, engine.phys2log, s.world),
            "after_steps": [after_from, args.steps],
            "after_if_not_rebalanced": overall_balancedness(after, initial, s.world)}
    return result


def rank_main(rank: int, args, port: int, run_dirs: dict[str, str], result_dir: str) -> None:
    for key, value in NVLS_OFF.items():
        os.environ.setdefault(key, value)
    try:
        _rank_main(rank, args, port, run_dirs, result_dir)
    except BaseException:
        Path(result_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _rank_main(rank: int, args, port: int, run_dirs: dict[str, str], result_dir: str) -> None:
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.cpu_threads)
    kwargs = {"device_id": device} if cuda else {}
    timeout = timedelta(seconds=args.collective_timeout)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.world, timeout=timeout, **kwargs)
    side = dist.new_group(backend="gloo", timeout=timeout)  # the async mode's CPU group
    copy_group = dist.new_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    dist.all_reduce(torch.ones(1, device=device))  # the communicator exists before any P2P
    dist.all_reduce(torch.ones(1), group=side)
    dist.all_reduce(torch.ones(1, device=device), group=copy_group)  # its communicator exists
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shape = Shape(layers=args.layers, experts=args.experts, slots=args.slots, world=args.world,
                  hidden=args.hidden, inter=args.inter, tokens=args.tokens, topk=args.topk)
    engine = StandInMoE(shape, rank, device, dtype, args.seed, args.sigma, args.drift_steps)
    warm_p2p(device)
    warm_p2p(device, copy_group)
    ceiling_bytes = int(args.ceiling_mb * 1e6)
    ceiling = measure_ceiling(ceiling_bytes, [1], device, args.ceiling_repeats)  # one message, ring
    out = {"rank": rank, "ceiling_gbps": ceiling, "ceiling_bytes": ceiling_bytes, "modes": {},
           "device_name": torch.cuda.get_device_name(device) if cuda else "CPU (gloo)",
           "torch": torch.__version__}
    for mode in args.modes:
        if mode == args.inject_failure and rank == args.world - 1:
            raise RuntimeError(f"injected failure at the start of mode {mode} (--inject-failure)")
        dist.barrier()
        out["modes"][mode] = run_mode(mode, args, rank, device, engine, side, run_dirs.get(mode),
                                      copy_group)
        # After every mode, so that a later failure still leaves the modes that ran.
        tmp = Path(result_dir, f"rank{rank}.json.tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(Path(result_dir, f"rank{rank}.json"))
    dist.barrier()
    dist.destroy_process_group()


# --- the parent: spawn, collect, report --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(args, run_dirs: dict[str, str], result_dir: str) -> tuple[list[dict | None], str]:
    """Run the ranks. Returns what each rank wrote (None where nothing) and '' or what failed."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args, port, run_dirs, result_dir),
                         name=f"decode-rank{r}") for r in range(args.world)]
    deadline = time.monotonic() + args.timeout
    failed = ""
    try:
        for proc in procs:
            proc.start()
        while any(p.is_alive() for p in procs):
            bad = [p for p in procs if p.exitcode not in (None, 0)]
            if bad:
                failed = f"{bad[0].name} exited with {bad[0].exitcode}"
                break
            if time.monotonic() > deadline:
                failed = f"the ranks did not finish within --timeout {args.timeout:g}s"
                break
            time.sleep(0.2)
        if not failed:
            bad = [p for p in procs if p.exitcode != 0]
            if bad:
                failed = f"{bad[0].name} exited with {bad[0].exitcode}"
    finally:  # whatever happened here, no rank outlives the bench
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    if failed:
        errors = "".join(f"--- rank {r} ---\n{Path(result_dir, f'rank{r}.error').read_text()}"
                         for r in range(args.world) if Path(result_dir, f"rank{r}.error").exists())
        failed = f"{failed}\n{errors}"
    files = [Path(result_dir, f"rank{r}.json") for r in range(args.world)]
    return [json.loads(f.read_text()) if f.exists() else None for f in files], failed


def summarize(args, ranks: list[dict]) -> dict:
    """Per mode: the numbers of the table (steps are the slowest rank's)."""
    ceiling = min(r["ceiling_gbps"] for r in ranks)
    summary: dict = {"ceiling_gbps": ceiling, "modes": {}}
    base = None
    for mode in args.modes:
        per_rank = [r["modes"][mode] for r in ranks]
        steps_ms = [max(pr["step_s"][i] for pr in per_rank) * 1e3 for i in range(args.steps)]
        measured = steps_ms[args.warmup:]
        m: dict = {"p50_ms": statistics.median(measured), "p99_ms": percentile(measured, 99),
                   "max_ms": max(measured), "mean_ms": statistics.fmean(measured),
                   "steps_measured": len(measured)}
        copies = [c for pr in per_rank for c in pr["copies"]]
        starts = [c for pr in per_rank for c in pr.get("starts", [])]
        # Steps with copy work: the landing copies and, sent a step ahead, the starts too.
        copy_steps = sorted({c["step"] for c in copies} | {c["step"] for c in starts})
        m["p50_before_trigger_ms"] = statistics.median(steps_ms[args.warmup:args.rebalance_at - AROUND])
        m["steps_ms"] = steps_ms
        m["copy_steps"] = copy_steps
        m["chunks"] = len({c["step"] for c in copies})
        m["sent_ahead"] = bool(starts)
        events = per_rank[0]["events"]
        m["events"] = events
        m["rebalances"] = sum(1 for e in events if e.get("outcome") == "committed")
        if copy_steps:
            first = min([args.rebalance_at] + copy_steps)
            lo, hi = max(args.warmup, first - AROUND), min(args.steps - 1, copy_steps[-1] + AROUND)
            m["window_steps"] = [lo, hi]
            reference = base["p50_ms"] if base else statistics.median(
                [t for i, t in enumerate(steps_ms) if i >= args.warmup and not lo <= i <= hi])
            m["reference_p50_ms"] = reference
            window = steps_ms[lo:hi + 1]
            m["extra_ms"] = sum(t - reference for t in window)
            if base:
                m["extra_vs_same_steps_ms"] = sum(steps_ms[i] - base["steps_ms"][i]
                                                  for i in range(lo, hi + 1))
            after = steps_ms[hi + 1:]
            m["p50_after_rebalance_ms"] = statistics.median(after) if after else None
            # "During the rebalance": from the trigger to the step after the last copy.
            during_lo, during_hi = first, min(args.steps - 1, copy_steps[-1] + 1)
            during = steps_ms[during_lo:during_hi + 1]
            m["worst_window_ms"] = max(during)
            m["worst_window_step"] = during_lo + during.index(max(during))
            # A step's copy work on a rank: its copy call plus, sent ahead, its start call.
            chunk_ms: dict[tuple[int, int], float] = {}
            for r, pr in enumerate(per_rank):
                for c in pr["copies"] + pr.get("starts", []):
                    chunk_ms[r, c["step"]] = chunk_ms.get((r, c["step"]), 0.0) + c["seconds"] * 1e3
            m["longest_chunk_ms"] = max(chunk_ms.values())
            # The same run's own normal step: its variation between runs is larger than a chunk.
            own = steps_ms[max(args.warmup, args.rebalance_at - OWN_NORMAL_STEPS):args.rebalance_at]
            m["own_normal_ms"] = statistics.median(own)
            m["worst_copy_step_ms"] = max(steps_ms[i] for i in copy_steps)
            m["worst_copy_vs_own_normal_ms"] = m["worst_copy_step_ms"] - m["own_normal_ms"]
            m["chunks_prefetched"] = sum(1 for c in per_rank[0]["copies"] if c["prefetched_layers"])
            prefetch_ms = [p["seconds"] * 1e3 for pr in per_rank for p in pr["prefetches"]]
            m["longest_prefetch_ms"] = max(prefetch_ms) if prefetch_ms else None
            m["bytes_moved"] = sum(c["bytes_received"] for c in copies)
            rates = []
            for pr in per_rank:
                b = sum(c["bytes_received"] for c in pr["copies"])
                t = sum(c["seconds"] for c in pr["copies"])
                rates.append((b, b / t / 1e9 if t > 0 else 0.0))
            if not starts:  # sent ahead, the wire time is not inside the timed calls
                m["copy_gbps"] = max(rates)[1]  # the rank that received the most bytes
                m["copy_pct_of_ceiling"] = 100 * m["copy_gbps"] / ceiling if ceiling else 0.0
        m["mismatched_slots"] = sum(pr["mismatched_slots"] for pr in per_rank)
        m["slots_checked"] = sum(pr["slots_checked"] for pr in per_rank)
        m["placements_agree"] = all(pr["placements_agree"] for pr in per_rank)
        m["balancedness"] = per_rank[0].get("balancedness")
        if mode in SIDECAR_MODES:
            on_step = [u for pr in per_rank for u in pr["hook_on_step_us"]]
            record = [u for pr in per_rank for u in pr["hook_record_us"]]
            if on_step:
                m["hook"] = {"on_step_p50_us": statistics.median(on_step),
                             "on_step_p99_us": percentile(on_step, 99),
                             "on_step_max_us": max(on_step),
                             "record_step_p50_us": statistics.median(record),
                             "record_step_p99_us": percentile(record, 99),
                             "record_layer_mean_us": statistics.fmean(record) / args.layers,
                             "steps": len(on_step)}
            m["sync_check"] = [pr["sync_check"] for pr in per_rank]
            m["leader_placement_hash"] = per_rank[0].get("leader_placement_hash")
            m["placement_matches_leader"] = (per_rank[0]["placement_hash"]
                                             == per_rank[0].get("leader_placement_hash"))
            m["leader_counters"] = per_rank[0].get("leader_counters")
        if mode == "no-rebalance":
            base = m
        summary["modes"][mode] = m
    if base is not None:
        for mode, m in summary["modes"].items():
            m["p99_vs_no_rebalance_pct"] = 100 * (m["p99_ms"] / base["p99_ms"] - 1)
            m["p50_vs_no_rebalance_pct"] = 100 * (m["p50_ms"] / base["p50_ms"] - 1)
    for mode in SIDECAR_MODES:
        side = summary["modes"].get(mode)
        if not (side and side.get("chunks")):
            continue
        normal = base["p50_ms"] if base else side["reference_p50_ms"]
        side["goals"] = {
            "worst_step_le_normal_plus_chunk": side["worst_window_ms"] <= normal + side["longest_chunk_ms"],
            "worst_copy_step_le_own_normal_plus_chunk":
                side["worst_copy_vs_own_normal_ms"] <= side["longest_chunk_ms"],
            "p99_within_5pct": base is not None and side["p99_vs_no_rebalance_pct"] <= 5.0,
            "copy_ge_80pct_ceiling": (side["copy_pct_of_ceiling"] >= 80.0
                                      if "copy_pct_of_ceiling" in side else None)}
    return summary


def _f(value, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def render(args, ranks: list[dict], summary: dict) -> str:
    card = ranks[0]["device_name"]
    modes = args.modes
    s = summary["modes"]
    bpe = 3 * args.hidden * args.inter * {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    lines = [
        f"decode loop while experts move: {args.world} x {card}, torch {ranks[0]['torch']}, "
        f"one process per {'GPU (NCCL)' if args.device == 'cuda' else 'rank (gloo, CPU)'}",
        f"stand-in engine: {args.layers} MoE layers, E={args.experts} logical experts, "
        f"P={args.slots * args.world} slots ({args.slots} per rank), H={args.hidden} "
        f"I={args.inter} {args.dtype} ({bpe / 1e6:.1f} MB per expert), {args.tokens} tokens per "
        f"rank, top-{args.topk}, lognormal skew sigma={args.sigma}, drift a quarter turn per "
        f"{args.drift_steps} steps; {args.steps} steps, first {args.warmup} excluded; rebalance "
        f"triggered at step {args.rebalance_at} from the counts of the {args.window} steps "
        f"before; policy {args.policy}; {args.layers_per_step} layer(s) per chunk; about "
        f"{memory_estimate_gb(args):.1f} GB of device memory per rank",
        f"step time = wall time between the ends of two steps (torch.cuda.synchronize() at the "
        f"end of each step is the benchmark's, not the hook's), slowest rank per step; extra = "
        f"sum over steps [trigger-{AROUND}, last copy+{AROUND}] of (step - p50 of the no-rebalance "
        f"run); NCCL P2P ceiling measured in this run: {summary['ceiling_gbps']:.1f} GB/s per "
        f"direction (one {args.ceiling_mb:g} MB message each way)",
    ]
    if any(m in SIDECAR_MODES for m in modes):
        lines.append(f"sidecar modes: one eplb-sidecar each, --interval {args.rebalance_at} --window "
                     f"{args.window} --min-gain 0 --layers-per-step {args.layers_per_step} "
                     f"--policy {args.policy} --planner thread {args.sidecar_args}".rstrip()
                     + f"; WorkerHook(flush_every={args.flush_every}); async mode: begin step = "
                     f"max over ranks of (step + {args.async_margin}); every mode copies with "
                     "CopyExecutor on a process group of its own; sidecar, sent a step ahead: "
                     "the hook starts each chunk's transfers (CopyExecutor.start) one step "
                     "before the step that lands them and switches its layers")
    lines += [
        "",
        "| | " + " | ".join(MODE_TITLES[m] for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]

    def row(name: str, fn) -> None:
        lines.append(f"| {name} | " + " | ".join(fn(s[m]) for m in modes) + " |")

    row("step p50 ms", lambda m: _f(m["p50_ms"]))
    row("step p99 ms", lambda m: _f(m["p99_ms"]))
    row("step max ms", lambda m: _f(m["max_ms"]))
    row("step p50 before the trigger ms (same work in every mode)",
        lambda m: _f(m["p50_before_trigger_ms"]))
    row("step p50 after the last copy ms", lambda m: _f(m.get("p50_after_rebalance_ms")))
    if "no-rebalance" in modes:
        row("p99 vs no rebalance", lambda m: _f(m.get("p99_vs_no_rebalance_pct"), "{:+.1f} %"))
    row("rebalances committed", lambda m: str(m["rebalances"]))
    row("copy steps (chunks)", lambda m: (f"{m['copy_steps'][0]}-{m['copy_steps'][-1]} "
                                          f"({m['chunks']})") if m["chunks"] else "-")
    row("worst step from trigger to last copy + 1 ms",
        lambda m: _f(m.get("worst_window_ms")) + (f" (step {m['worst_window_step']})"
                                                  if "worst_window_step" in m else ""))
    row(f"worst copy step - median of the same run's {OWN_NORMAL_STEPS} steps before the trigger ms",
        lambda m: (f"{m['worst_copy_vs_own_normal_ms']:+.2f} ({m['worst_copy_step_ms']:.2f} - "
                   f"{m['own_normal_ms']:.2f})") if "own_normal_ms" in m else "-")
    row("extra time around the rebalance ms", lambda m: _f(m.get("extra_ms"), "{:+.1f}"))
    if "no-rebalance" in modes:
        row("extra time vs the same steps without rebalance ms",
            lambda m: _f(m.get("extra_vs_same_steps_ms"), "{:+.1f}"))
    row("longest copy work in one step ms (landing + start when sent ahead)",
        lambda m: _f(m.get("longest_chunk_ms")))
    row("chunks prefetched (longest prefetch call ms)",
        lambda m: f"{m['chunks_prefetched']} of {m['chunks']}"
        + (f" ({m['longest_prefetch_ms']:.2f})" if m.get("longest_prefetch_ms") else "")
        if m["chunks"] else "-")
    row("bytes moved (all ranks) MB", lambda m: _f(m["bytes_moved"] / 1e6 if m.get("bytes_moved") else None, "{:.1f}"))
    row("copy GB/s (% of P2P ceiling; not for sent ahead: its wire time runs beside the steps)",
        lambda m: f"{m['copy_gbps']:.1f} ({m['copy_pct_of_ceiling']:.0f} %)" if "copy_gbps" in m else "-")
    row("plan ms (where)", lambda m: _plan_cell(m))
    row("balancedness before (window)", lambda m: _f((m["balancedness"] or {}).get("before"), "{:.3f}"))
    row("balancedness after (last window)", lambda m: _f((m["balancedness"] or {}).get("after"), "{:.3f}"))
    row("weights: mismatched / slots checked",
        lambda m: f"{m['mismatched_slots']} / {m['slots_checked']}"
        + ("" if m["placements_agree"] else " (placements differ!)"))
    lines.append("")
    for mode in [m for m in SIDECAR_MODES if m in s]:
        side, title = s[mode], MODE_TITLES[mode]
        hook = side.get("hook")
        if hook:
            lines.append(
                f"{title}: hook per step, no rebalance in flight ({hook['steps']} rank-steps): on_step p50 "
                f"{hook['on_step_p50_us']:.1f} us, p99 {hook['on_step_p99_us']:.1f} us, max "
                f"{hook['on_step_max_us']:.1f} us; {args.layers} x record() p50 "
                f"{hook['record_step_p50_us']:.1f} us, p99 {hook['record_step_p99_us']:.1f} us "
                f"({hook['record_layer_mean_us']:.1f} us per layer, mean); host time on the "
                f"decode thread")
        checks = [c for c in side.get("sync_check") or [] if c]
        if checks:
            bad = [c["error"] for c in checks if c["error"]]
            armed = all(c["armed"] == "yes" for c in checks)
            lines.append(
                f"{title}: device sync check: on_step + record() ran under "
                f"torch.cuda.set_sync_debug_mode('error') for {min(c['steps'] for c in checks)} "
                f"steps on every rank (armed: a deliberate .item() raised: {armed}): "
                + (f"SYNCHRONIZED: {bad[0]}" if bad else "no device synchronization"))
        else:
            lines.append(f"{title}: device sync check: not run (CPU)")
        lines.append(f"{title}: leader counters {side.get('leader_counters')}, placement "
                     f"{'matches' if side.get('placement_matches_leader') else 'DIFFERS FROM'} "
                     "the leader's")
        goals = side.get("goals")
        if goals:
            normal = s["no-rebalance"]["p50_ms"] if "no-rebalance" in s else side["reference_p50_ms"]
            lines.append(
                f"goals ({title}): worst step {side['worst_window_ms']:.2f} ms <= normal "
                f"{normal:.2f} + one chunk {side['longest_chunk_ms']:.2f} ms: "
                f"{'met' if goals['worst_step_le_normal_plus_chunk'] else 'NOT met'}; worst copy step "
                f"{side['worst_copy_step_ms']:.2f} ms <= the run's own normal {side['own_normal_ms']:.2f}"
                f" + one chunk: {'met' if goals['worst_copy_step_le_own_normal_plus_chunk'] else 'NOT met'}"
                "; p99 within "
                + (f"5 % of no rebalance ({side['p99_vs_no_rebalance_pct']:+.1f} %): "
                   f"{'met' if goals['p99_within_5pct'] else 'NOT met'}"
                   if "p99_vs_no_rebalance_pct" in side else "5 %: n/a (no-rebalance not run)")
                + ("; copies >= 80 % of the "
                   f"ceiling ({side['copy_pct_of_ceiling']:.0f} %): "
                   f"{'met' if goals['copy_ge_80pct_ceiling'] else 'NOT met'}"
                   if goals["copy_ge_80pct_ceiling"] is not None else ""))
    for mode in modes:
        for e in s[mode]["events"]:
            keys = ("epoch", "outcome", "trigger_step", "switch_step", "plan_ms", "gather_ms",
                    "agree_ms", "agreement_ms", "hold_ms", "max_hold_ms", "copy_ms",
                    "balancedness_before", "balancedness_predicted", "experts_moved",
                    "layers_changed")
            text = ", ".join(f"{k}={_f(e[k], '{:.3f}') if isinstance(e[k], float) else e[k]}"
                             for k in keys if e.get(k) is not None)
            lines.append(f"{MODE_TITLES[mode]} rebalance: {text}")
    return "\n".join(lines) + "\n"


def _plan_cell(m: dict) -> str:
    for e in m["events"]:
        if e.get("plan_ms") is not None:
            return f"{e['plan_ms']:.1f}"
    return "-"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world", type=int, default=None,
                   help="ranks, one process per GPU (default: every visible GPU; 2 on CPU)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="modes to run, in this order (default: all five)")
    p.add_argument("--layers", type=int, default=8, help="MoE layers")
    p.add_argument("--slots", type=int, default=9, help="expert slots per GPU per layer")
    p.add_argument("--experts", type=int, default=None,
                   help="logical experts per layer (default: (slots - 1) x world, i.e. one "
                        "redundant slot per GPU, DeepSeek-V3's 256 + 32 on 32 GPUs)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048, help="expert intermediate size")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--tokens", type=int, default=512, help="decode tokens per rank per step")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--sigma", type=float, default=1.5,
                   help="lognormal skew of expert popularity (std of its log)")
    p.add_argument("--drift-steps", type=int, default=8000,
                   help="steps for the popularity to turn a quarter (to an independent ranking)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100, help="first steps left out of the stats")
    p.add_argument("--rebalance-at", type=int, default=1000,
                   help="trigger step (the sidecar's --interval)")
    p.add_argument("--window", type=int, default=500,
                   help="steps of counts the plan uses (the sidecar's --window)")
    p.add_argument("--layers-per-step", type=int, default=1,
                   help="layers per copy chunk (async and sidecar)")
    p.add_argument("--policy", choices=POLICIES, default="deepseek",
                   help="placement policy of every mode (eplb.placement.planner)")
    p.add_argument("--async-margin", type=int, default=2,
                   help="async mode: each rank proposes its current step + this as begin step")
    p.add_argument("--no-async-prefetch", dest="async_prefetch", action="store_false",
                   help="async mode: do not let the copy engine prepare each chunk ahead (the "
                        "hook does, when the copy engine offers prefetch)")
    p.add_argument("--flush-every", type=int, default=16,
                   help="sidecar mode: steps between the hook's counter snapshots")
    p.add_argument("--sync-check-steps", type=int, default=40,
                   help="sidecar mode on CUDA: steps after the warm-up run with the hook's calls "
                        "under set_sync_debug_mode('error')")
    p.add_argument("--ceiling-mb", type=float, default=None,
                   help="message size of the P2P ceiling (default 512 on CUDA, 4 on CPU)")
    p.add_argument("--ceiling-repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--hold-timeout", type=float, default=60.0,
                   help="longest wait for an agreed step (async thread, hook)")
    p.add_argument("--collective-timeout", type=float, default=120.0,
                   help="process group and copy timeout, seconds")
    p.add_argument("--timeout", type=float, default=540.0,
                   help="the whole run, seconds; a hung rank ends the bench with an error")
    p.add_argument("--sidecar-args", default="",
                   help="extra eplb-sidecar flags, one string (e.g. \"--bytes-per-step 400000000\")")
    p.add_argument("--inject-failure", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None,
                   help="write the table here (Markdown) and the raw numbers next to it (.json)")
    args = p.parse_args(argv)
    if args.world is None:
        args.world = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.experts is None:
        args.experts = (args.slots - 1) * args.world
    if args.ceiling_mb is None:
        args.ceiling_mb = 512.0 if args.device == "cuda" else 4.0
    if args.world < 2:
        p.error("needs --world >= 2")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        p.error(f"--world {args.world} needs that many GPUs, found {torch.cuda.device_count()}")
    if not args.experts <= args.slots * args.world:
        p.error("--experts must be at most slots x world")
    if not 0 <= args.warmup < args.rebalance_at - AROUND < args.steps or not 0 < args.window <= args.rebalance_at:
        p.error(f"need 0 <= warmup < rebalance-at - {AROUND}, rebalance-at < steps and "
                "0 < window <= rebalance-at")
    if args.steps > 2 * args.rebalance_at:
        p.error("--steps must be <= 2 x --rebalance-at so that the sidecar triggers once")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in NVLS_OFF.items():
        os.environ.setdefault(key, value)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    print(f"decode bench: {args.world} ranks on {args.device}, modes {' '.join(args.modes)}; "
          f"about {memory_estimate_gb(args):.1f} GB of device memory per rank", flush=True)
    clusters: dict = {}
    run_dirs: dict[str, str] = {}
    ranks: list[dict | None] = []
    failed = ""
    try:
        for mode in [m for m in args.modes if m in SIDECAR_MODES]:
            # One sidecar per sidecar mode: each mode's epoch starts from the initial placement.
            from eplb.demo.cluster import LocalCluster

            cluster = LocalCluster(num_nodes=1, sidecar_args=[
                "--interval", str(args.rebalance_at), "--window", str(args.window),
                "--min-gain", "0", "--layers-per-step", str(args.layers_per_step),
                "--policy", args.policy, "--planner", "thread", "--max-retries", "3",
                "--worker-timeout", "10", "--ack-timeout", "10", "--promise-timeout", "10",
                "--log-level", "INFO", *shlex.split(args.sidecar_args)])
            clusters[mode] = cluster
            cluster.start()
            cluster.wait_ready(60.0)
            run_dirs[mode] = str(cluster.run_dir(0))
        with tempfile.TemporaryDirectory(prefix="eplb-decode-") as result_dir:
            ranks, failed = spawn_ranks(args, run_dirs, result_dir)
        if failed:
            raise RuntimeError(failed)
    except BaseException as exc:
        for cluster in clusters.values():
            for log in sorted(Path(cluster.log_dir).glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-30:]
                print(f"--- last lines of {log} ---", *tail, sep="\n", file=sys.stderr)
        print(f"decode bench failed: {exc}", file=sys.stderr)
        failed = failed or f"{type(exc).__name__}: {exc}"
    finally:
        for cluster in clusters.values():
            cluster.stop()
    if not failed:  # kept when something failed (their logs)
        for cluster in clusters.values():
            shutil.rmtree(cluster.base_dir, ignore_errors=True)
    done = [m for m in args.modes if ranks and all(r is not None and m in r["modes"] for r in ranks)]
    if failed:
        if not done:
            return 1
        print(f"PARTIAL RESULTS: only {', '.join(done)} finished before the failure above",
              file=sys.stderr)
        args = argparse.Namespace(**{**vars(args), "modes": done})
    summary = summarize(args, ranks)
    text = render(args, ranks, summary)
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        raw = {"args": vars(args), "summary": summary,
               "per_rank_step_ms": {m: [[t * 1e3 for t in r["modes"][m]["step_s"]] for r in ranks]
                                    for m in args.modes},
               "copies": {m: [r["modes"][m]["copies"] for r in ranks] for m in args.modes},
               "starts": {m: [r["modes"][m].get("starts", []) for r in ranks] for m in args.modes},
               "ceiling_gbps_per_rank": [r["ceiling_gbps"] for r in ranks],
               "device_name": ranks[0]["device_name"], "torch": ranks[0]["torch"]}
        Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1))
    ok = all(m["mismatched_slots"] == 0 and m["placements_agree"] for m in summary["modes"].values())
    for mode in args.modes:
        if mode != "no-rebalance" and summary["modes"][mode]["rebalances"] != 1:
            print(f"WARNING: {mode} committed {summary['modes'][mode]['rebalances']} rebalances "
                  "(expected exactly 1)")
            ok = False
    if failed:
        print(f"FAILED: the run stopped early: {failed.splitlines()[0]}")
        ok = False
    print("RESULT:", "ok" if ok else "FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
