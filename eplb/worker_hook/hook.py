"""The engine-facing hook of one EP rank.

Per decode step the engine calls :meth:`WorkerHook.record` for each MoE layer (or
:meth:`WorkerHook.add_counts` once) and :meth:`WorkerHook.on_step` once, before the step runs.
Those calls only touch tensors on the engine's device and a lock: no device synchronization,
no collective, no socket (invariant I3). A background thread owns the ZeroMQ socket, talks to the
sidecar and answers the protocol; the decode thread hands it work through a queue and a pipe.

The exception is the agreed switch step S of an epoch and the steps after it: at S
:meth:`on_step` waits (with a timeout) if the outcome is still unknown, and from S on it starts
and lands chunks of layers through the engine's copy engine, which may run P2P transfers. Which
chunk, when, is the :class:`~eplb.worker_hook.agreement.WorkerAgreement`'s decision (its
``actions_at``); the hook carries the actions out and reports back, and decides nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NoReturn

import torch
import zmq

from eplb.paths import (RunDirError, RunDirMissing, check_run_dir, default_run_dir,
                        group_access_from_env, workers_endpoint)
from eplb.placement.rules import default_placement, validate_placement
from eplb.proto import (Abort, Bye, Commit, Counts, Heartbeat, Hello, Message, Plan, Prepare,
                        ProtocolError, Rejoin, Welcome, decode, encode)
from eplb.worker_hook.agreement import (Action, CopyChunk, Hold, LandChunk, Prefetch, StartChunk,
                                        WorkerAgreement)
from eplb.worker_hook.copy_engine import CopyEngine, CopyFn, as_copy_engine

log = logging.getLogger("eplb.worker")

#: Host buffers for counts snapshots in flight to the socket thread.
_SNAPSHOT_BUFFERS = 4
#: Longest time a counts snapshot waits in the outbox before the socket thread sends it.
OUTBOX_POLL_S = 0.05
#: After a refusal for now (``Welcome(retry=True)``), say HELLO again after this long.
HELLO_RETRY_S = 1.0


class HookError(RuntimeError):
    """Base of the errors :meth:`WorkerHook.on_step` raises; the engine must stop serving."""


class HoldTimeout(HookError):
    """The rank promised not to pass step S and the outcome never came."""


class CopyFailed(HookError):
    """A copy failed: this rank's maps may not match the others'."""


@dataclass
class _CountsSnapshot:
    from_step: int
    to_step: int
    buffer: torch.Tensor  # [L, ids + 2] int64 on the host (pinned when the device is CUDA)
    ready: object | None  # torch.cuda.Event, or None when the copy was synchronous
    placement: torch.Tensor  # [L, P] the placement served while these were counted


class WorkerHook:
    """Join the sidecar of this node and take part in rebalances.

    Args:
        rank: global EP rank of this process; world_size: EP size ``G``.
        num_layers: ``L`` MoE layers; num_experts: ``E`` logical experts; num_physical: ``P``
            slots per layer (``P % G == 0``).
        phys2log: ``[L, P]`` the placement served now; defaults to :func:`default_placement`.
        copy_fn: the engine's weight copies: a :class:`~eplb.worker_hook.copy_engine.CopyEngine`
            (a :class:`~eplb.worker_hook.copy_exec.CopyExecutor` is one), or a plain
            :data:`~eplb.worker_hook.copy_engine.CopyFn` callable that copies a chunk in one
            call. Without one the rank cannot take part in an epoch that moves its layers, so it
            is required in production.
        device: where the counters live (the engine's device).
        count_ids: the ids :meth:`record` and :meth:`add_counts` take: ``"logical"`` experts in
            ``[0, E)``, or ``"physical"`` slots in ``[0, P)`` as engines pass them after routing
            (counted per slot, turned into logical counts with the placement served while they
            were counted).
        node: this rank's node index (reported only; the sidecar knows its own).
        run_dir: the sidecar's run directory (default: :func:`eplb.paths.default_run_dir`).
        bytes_per_expert: size of one expert's weights, for reporting.
        flush_every: steps between copies of the counters to the host.
        heartbeat_s: seconds between heartbeats to the sidecar.
        hold_timeout_s: longest wait at S for the outcome of a promised epoch.
        on_event: called from the background thread with each protocol message received.
        group_access: accept a run directory of another user whose group is one of this
            process's (the sidecar's ``--group-access``); default ``$EPLB_GROUP_ACCESS``.

    Raises:
        HookError: the run directory belongs to someone else (see
            :func:`eplb.paths.check_run_dir`); the message says what to do.
    """

    def __init__(self, rank: int, world_size: int, num_layers: int, num_experts: int,
                 num_physical: int, phys2log: torch.Tensor | None = None, *,
                 copy_fn: CopyEngine | CopyFn | None = None, device: str | torch.device = "cpu",
                 node: int = 0, run_dir: str | Path | None = None, bytes_per_expert: int = 0,
                 flush_every: int = 64, heartbeat_s: float = 0.5, hold_timeout_s: float = 30.0,
                 on_event: Callable[[Message], None] | None = None,
                 zmq_context: zmq.Context | None = None,
                 group_access: bool | None = None,
                 count_ids: Literal["logical", "physical"] = "logical") -> None:
        if phys2log is None:
            phys2log = default_placement(num_layers, num_experts, num_physical)
        validate_placement(phys2log.cpu(), num_experts, num_physical, world_size, num_layers)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, {world_size})")
        if count_ids not in ("logical", "physical"):
            raise ValueError(f"count_ids must be 'logical' or 'physical', not {count_ids!r}")
        self.rank, self.world_size, self.node = rank, world_size, node
        self.num_layers, self.num_experts, self.num_physical = num_layers, num_experts, num_physical
        self.device = torch.device(device)
        self.copy_fn = copy_fn
        self._engine = as_copy_engine(copy_fn)
        self.flush_every = max(1, flush_every)
        self.heartbeat_s = heartbeat_s
        self.hold_timeout_s = hold_timeout_s
        self.on_event = on_event
        self.bytes_per_expert = bytes_per_expert
        self.run_dir = Path(run_dir) if run_dir else default_run_dir()
        self.endpoint = workers_endpoint(self.run_dir)
        self.group_access = group_access_from_env() if group_access is None else group_access
        try:
            check_run_dir(self.run_dir, self.group_access)
        except RunDirMissing:
            pass  # the socket thread waits for the sidecar to make it, and checks it then
        except RunDirError as exc:
            raise HookError(f"rank {rank}: will not connect: {exc}") from None

        self._agreement = WorkerAgreement(rank, num_experts, world_size, phys2log.cpu(),
                                          bytes_per_expert, can_copy=copy_fn is not None,
                                          pipeline_depth=self._engine.pipeline_depth)
        self._lock = threading.Lock()
        self._outcome = threading.Condition(self._lock)
        self._step = 0
        self._failure: HookError | None = None
        self.joined = threading.Event()
        self._hello_sent_at = 0.0
        self._answered = threading.Event()
        self.join_error = ""
        self.retry_error = ""  # the last refusal for now (the rank is held by another process)
        self._retry_at: float | None = None  # when to say HELLO again after such a refusal
        self._gave_up = False  # wait_joined timed out: stop asking
        self._dir_refused = False  # the run directory failed check_run_dir
        self.max_on_step_seconds = 0.0
        self.frames_rejected = 0

        # Counters: cumulative int64 on the device, ``[L, n + 2]`` for ``n`` ids (E logical or
        # P physical): column 0 takes ids < 0 (padding) and rows past num_valid, columns 1..n
        # the ids 0..n-1, column n + 1 ids >= n. Allocated here once, like the tensors record()
        # reads, and never replaced: CUDA graphs captured with record() inside hold their
        # pointers. Snapshots go to the host without a sync.
        self.count_ids = count_ids
        self._id_count = n = num_physical if count_ids == "physical" else num_experts
        self._counts = torch.zeros(num_layers, n + 2, dtype=torch.int64, device=self.device)
        self._count_rows = list(self._counts.unbind(0))  # [n + 2] views, one per layer
        self._one = torch.ones(1, dtype=torch.int64, device=self.device)  # expanded, never copied
        self._pin = self.device.type == "cuda"
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(_SNAPSHOT_BUFFERS):
            self._free.put(self._new_snapshot_buffer())
        self._last_snapshot = torch.zeros(num_layers, n + 2, dtype=torch.int64)
        # Physical counts: the placement they were counted under ([L, P] on the host; replaced,
        # never changed, when layers switch, so a snapshot may keep a reference).
        self._counted_under = self._agreement.phys2log.clone()
        self._flushed_at = 0

        self._out: queue.SimpleQueue[Message | _CountsSnapshot] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self._context = zmq_context or zmq.Context.instance()
        self._thread = threading.Thread(target=self._run, name=f"eplb-hook-{rank}", daemon=True)
        self._thread.start()

    # --- decode thread: the per-step path -------------------------------------------------------

    def record(self, layer: int, topk_ids: torch.Tensor,
               num_valid: torch.Tensor | None = None) -> None:
        """Count the experts chosen in ``layer`` this step, on the engine's device, no host sync.

        Safe inside a captured CUDA graph, and to call eagerly between replays with any number
        of ids: it reads and writes no buffer that is ever replaced.

        Args:
            layer: MoE layer index in ``[0, L)``.
            topk_ids: ``[T, K]`` (or ``[T]``) integer ids, logical or physical as the hook's
                ``count_ids``; ids below 0 (padding) or past the last id are not counted.
            num_valid: optional 0-d integer tensor on the same device: only rows ``t <
                num_valid`` count (graph padding rows past it do not).
        """
        # Two small kernels; a single searchsorted was slower on an H100, and one index_add_ of
        # raw ids cannot skip -1 (bench/record_kernels.py).
        columns = topk_ids.clamp(-1, self._id_count).add_(1)
        if num_valid is not None:
            rows = torch.arange(topk_ids.shape[0], device=topk_ids.device)
            padding = (rows >= num_valid).view(-1, *([1] * (topk_ids.dim() - 1)))
            columns.masked_fill_(padding, 0)
        columns = columns.reshape(-1)
        self._count_rows[layer].index_add_(0, columns, self._one.expand(columns.numel()))

    def counters(self) -> torch.Tensor:
        """``[L, n]`` the counts so far per id (E logical or P physical, as ``count_ids``), on
        the device: a view of the live counters (read it after the device has caught up)."""
        return self._counts[:, 1:self._id_count + 1]

    def add_counts(self, counts: torch.Tensor) -> None:
        """Add an engine's own per-step counts: ``[L, E]`` (logical) or ``[L, P]`` (physical,
        as the hook's ``count_ids``) integer, on the engine's device."""
        self.counters().add_(counts)

    def on_step(self, step: int) -> None:
        """Call at the start of decode step ``step`` (steps only go up). Usually returns at once;
        at the agreed switch step it may wait for the outcome, and from there on it starts and
        lands the chunks the agreement schedules.

        Raises:
            HoldTimeout, CopyFailed: the rank must stop serving (DESIGN.md §4.7).
        """
        if self._failure is not None:
            raise self._failure
        started = time.perf_counter()
        with self._lock:
            self._step = step
            actions = self._agreement.actions_at(step)
            if actions and isinstance(actions[0], Hold):
                actions = self._hold(actions[0], started)
        for action in actions:
            self._carry_out(action, step)
        if step - self._flushed_at >= self.flush_every:
            self._snapshot_counts(step)
        elapsed = time.perf_counter() - started
        if elapsed > self.max_on_step_seconds:
            self.max_on_step_seconds = elapsed

    @property
    def phys2log(self) -> torch.Tensor:
        """``[L, P]`` the placement this rank serves now (layers switch chunk by chunk)."""
        return self._agreement.phys2log

    @property
    def current_step(self) -> int:
        """The step the decode loop last started."""
        return self._step

    @property
    def state(self) -> str:
        return self._agreement.state.value

    def _hold(self, hold: Hold, started: float) -> tuple[Action, ...]:
        """Wait (lock held, released while waiting) for the outcome of the promised epoch;
        the actions at this step once it is known."""
        deadline = started + self.hold_timeout_s
        log.info("rank %d: holding at step %d for the outcome of epoch %d", self.rank, hold.step,
                 hold.epoch)
        actions = self._agreement.actions_at(self._step)
        while actions and isinstance(actions[0], Hold):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                self._failure = HoldTimeout(
                    f"rank {self.rank}: promised not to run step {hold.step} before the outcome of "
                    f"epoch {hold.epoch}, and none came within {self.hold_timeout_s:g}s; the "
                    "sidecar or leader is unreachable. Stop this engine instance.")
                log.critical("%s", self._failure)
                raise self._failure
            self._outcome.wait(remaining)
            actions = self._agreement.actions_at(self._step)
        self._agreement.held(time.perf_counter() - started)
        return actions

    def _carry_out(self, action: Prefetch | StartChunk | LandChunk, step: int) -> None:
        """Hand one scheduled action to the copy engine and report the result to the agreement
        (DONE or DONE(error) go to the sidecar)."""
        chunk = action.chunk
        layers = list(chunk.layers)
        started = time.perf_counter()
        if isinstance(action, Prefetch):
            try:
                self._engine.prefetch(chunk.epoch, layers, chunk.old, chunk.new)
            except Exception as exc:  # noqa: BLE001 - the chunk is prepared when it starts/lands
                log.warning("rank %d epoch %d: prefetch of chunk %d failed (%s: %s); it will be "
                            "prepared at its step", self.rank, chunk.epoch, chunk.index,
                            type(exc).__name__, exc)
            with self._lock:
                self._agreement.prefetched(chunk)
        elif isinstance(action, StartChunk):
            try:
                self._engine.start(chunk.epoch, layers, chunk.old, chunk.new)
            except Exception as exc:  # a half-issued transfer leaves the peers unmatched
                self._fail(chunk, exc)
            with self._lock:
                self._agreement.chunk_started(chunk, time.perf_counter() - started)
            log.debug("rank %d step %d epoch %d: chunk %d/%d (layers %s) started", self.rank,
                      step, chunk.epoch, chunk.index + 1, chunk.num_chunks, layers)
        elif isinstance(action, LandChunk):
            if self.count_ids == "physical":
                self._snapshot_counts(step, force=True)  # counted under the maps of before
            try:
                stats = self._engine.land(chunk.epoch, layers, chunk.old, chunk.new)
            except Exception as exc:  # any engine error: this rank's maps are now suspect
                self._fail(chunk, exc)
            seconds = time.perf_counter() - started
            received = int(getattr(stats, "bytes_received", 0) or 0)
            with self._lock:
                replies = self._agreement.chunk_landed(chunk, received, seconds)
                self._counted_under = self._agreement.phys2log.clone()
            log.debug("rank %d step %d epoch %d: chunk %d/%d (layers %s) landed in %.2f ms",
                      self.rank, step, chunk.epoch, chunk.index + 1, chunk.num_chunks, layers,
                      seconds * 1e3)
            self._send_from_decode_thread(replies)

    def _fail(self, chunk: CopyChunk, exc: Exception) -> NoReturn:
        """Mark the rank unsafe after a failed copy of ``chunk``, report DONE(error), raise."""
        with self._lock:
            replies = self._agreement.copy_failed(chunk, f"{type(exc).__name__}: {exc}")
        self._failure = CopyFailed(f"rank {self.rank}: copy of epoch {chunk.epoch} chunk "
                                   f"{chunk.index} failed: {exc}. Stop this engine instance.")
        log.critical("%s", self._failure)
        self._send_from_decode_thread(replies)
        raise self._failure from exc

    def _new_snapshot_buffer(self) -> torch.Tensor:
        return torch.zeros(self.num_layers, self._id_count + 2, dtype=torch.int64,
                           pin_memory=self._pin)

    def _snapshot_counts(self, step: int, force: bool = False) -> None:
        """Queue a copy of the counters for the socket thread. ``force``: even when every
        buffer is in flight (physical counts must be cut where layers switch)."""
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            if not force:
                return  # the sender is behind; keep counting, the next snapshot covers these
            buffer = self._new_snapshot_buffer()
        ready = None
        if self.device.type == "cuda":
            buffer.copy_(self._counts, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            buffer.copy_(self._counts)
        # No wake-up: the socket thread collects snapshots within OUTBOX_POLL_S. Waking it here
        # would hand it the GIL in the middle of the decode step (measured: ~40 us on_step).
        self._send_from_decode_thread(
            [_CountsSnapshot(self._flushed_at, step, buffer, ready, self._counted_under)],
            wake=False)
        self._flushed_at = step

    def _send_from_decode_thread(self, items: list, wake: bool = True) -> None:
        for item in items:
            self._out.put(item)
        if items and wake:
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so the thread is awake anyway

    # --- background thread: the socket ----------------------------------------------------------

    def _run(self) -> None:
        if not self._run_dir_checked():
            return
        sock = self._context.socket(zmq.DEALER)
        # Unique per connection: the sidecar binds the rank to it (and the pid) at HELLO.
        identity = f"{self.rank}.{os.getpid()}.{secrets.token_hex(8)}"
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._hello(sock)
        next_beat = time.monotonic() + self.heartbeat_s
        try:
            while not self._stop.is_set():
                timeout_ms = max(0.0, min(next_beat - time.monotonic(), OUTBOX_POLL_S) * 1000)
                ready = dict(poller.poll(timeout_ms))
                if sock in ready:
                    self._receive_all(sock)
                if self._wake_r in ready:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                self._drain_outbox(sock)
                if time.monotonic() >= next_beat:
                    self._send(sock, Heartbeat(rank=self.rank, step=self._step))
                    self._ask_outcome(sock)
                    next_beat = time.monotonic() + self.heartbeat_s
                if (self._retry_at is not None and time.monotonic() >= self._retry_at
                        and not self._gave_up):
                    self._retry_at = None
                    self._hello(sock)
            self._drain_outbox(sock)
            self._send(sock, Bye(rank=self.rank))
        except Exception:  # keep the engine informed rather than dying silently
            log.exception("rank %d: hook thread crashed", self.rank)
        finally:
            sock.close()

    def _run_dir_checked(self) -> bool:
        """Wait for the run directory, then check who owns it (before any connect: a stranger's
        directory made after this hook started must not be joined). False: refused, or closed."""
        while True:
            try:
                check_run_dir(self.run_dir, self.group_access)
                return True
            except RunDirMissing:
                if self._stop.wait(0.1):
                    return False
            except RunDirError as exc:
                self._dir_refused = True
                self.join_error = f"will not connect: {exc}"
                log.error("rank %d: %s", self.rank, self.join_error)
                self._answered.set()
                return False

    def _hello(self, sock: zmq.Socket) -> None:
        with self._lock:
            placement = self._agreement.phys2log.clone()
            applied_epoch = self._agreement.applied_epoch
        self._hello_sent_at = time.monotonic()
        self._send(sock, Hello(rank=self.rank, node=self.node, world_size=self.world_size,
                               num_layers=self.num_layers, num_experts=self.num_experts,
                               num_physical=self.num_physical,
                               bytes_per_expert=self.bytes_per_expert, step=self._step,
                               pid=os.getpid(), phys2log=placement,
                               applied_epoch=applied_epoch))

    def _ask_outcome(self, sock: zmq.Socket) -> None:
        """While promised, ask for the outcome once a heartbeat: a COMMIT or ABORT lost with a
        restarting sidecar or leader is sent again from the leader's decision log."""
        with self._lock:
            query = self._agreement.outcome_query()
        if query is not None:
            self._send(sock, query)

    def _receive_all(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frame)
            except ProtocolError as exc:  # invariant I4: count, log, carry on
                self.frames_rejected += 1
                log.warning("rank %d: dropped a bad frame from the sidecar (%s): %s", self.rank,
                            exc.reason, exc)
                continue
            self._on_message(sock, msg)

    def _on_message(self, sock: zmq.Socket, msg: Message) -> None:
        if isinstance(msg, Welcome):
            if msg.ok:
                self.retry_error = ""
                self.joined.set()
                self._answered.set()
                self._ask_outcome(sock)  # rejoined while promised: the outcome may be lost
            elif msg.retry:  # refused for now: another live connection holds this rank
                self.retry_error = msg.error
                if not self._gave_up:
                    log.warning("rank %d: refused for now, saying HELLO again in %gs: %s",
                                self.rank, HELLO_RETRY_S, msg.error)
                    self._retry_at = time.monotonic() + HELLO_RETRY_S
            else:
                self.join_error = msg.error
                log.error("rank %d: the leader refused this worker: %s", self.rank, msg.error)
                self._answered.set()
        elif isinstance(msg, Rejoin):
            # A sidecar restarted and lost our HELLO. A refused worker stays out: its
            # configuration must change first, so asking again would only repeat the refusal.
            if not self.join_error and time.monotonic() - self._hello_sent_at > 1.0:
                log.warning("rank %d: joining again: %s", self.rank, msg.reason)
                self.joined.clear()
                self._hello(sock)
        elif isinstance(msg, (Plan, Prepare, Commit, Abort)):
            with self._lock:
                replies = self._agreement.on_message(msg, self._step)
                self._outcome.notify_all()
            log.info("rank %d step %d: %s epoch %d -> %s", self.rank, self._step, msg.TYPE,
                     msg.epoch, ", ".join(r.TYPE for r in replies) or "-")
            for reply in replies:
                self._send(sock, reply)
        if self.on_event is not None:
            try:
                self.on_event(msg)
            except Exception:
                log.exception("rank %d: on_event callback failed", self.rank)

    def _drain_outbox(self, sock: zmq.Socket) -> None:
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _CountsSnapshot):
                if item.ready is not None:
                    item.ready.synchronize()  # this thread waits for the copy, not the engine
                delta = (item.buffer - self._last_snapshot)[:, 1:self._id_count + 1]
                self._last_snapshot.copy_(item.buffer)
                if self._free.qsize() < _SNAPSHOT_BUFFERS:
                    self._free.put(item.buffer)
                if self.count_ids == "physical":  # [L, P] per slot -> [L, E] per expert
                    delta = torch.zeros(self.num_layers, self.num_experts,
                                        dtype=torch.int64).scatter_add_(1, item.placement, delta)
                item = Counts(rank=self.rank, from_step=item.from_step, to_step=item.to_step,
                              counts=delta)
            self._send(sock, item)

    def _send(self, sock: zmq.Socket, msg: Message) -> None:
        try:
            sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("rank %d: sidecar not keeping up; dropped %s", self.rank, msg.TYPE)

    # --- lifecycle ------------------------------------------------------------------------------

    def wait_joined(self, timeout: float) -> None:
        """Block until the leader accepted this worker; raise with the reason otherwise."""
        if self._gave_up and self.retry_error and not self.joined.is_set():
            self._gave_up = False  # waiting again: ask again
            self._retry_at = time.monotonic()
        self._answered.wait(timeout)
        if not self.joined.is_set():
            self._gave_up = True
            if self._dir_refused:  # the message says what to do
                raise HookError(f"rank {self.rank} could not join: {self.join_error}")
            if self.retry_error and not self.join_error:
                raise HookError(f"rank {self.rank} could not join: refused for {timeout:g}s, "
                                f"asking each second: {self.retry_error}")
            why = self.join_error or f"no answer from {self.endpoint} within {timeout:g}s"
            raise HookError(f"rank {self.rank} could not join: {why}. Is eplb-sidecar running "
                            "with the same --run-dir?")

    def close(self, timeout: float = 5.0) -> None:
        """Say goodbye and stop the background thread."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass
        self._thread.join(timeout)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "WorkerHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
