"""Run a copy plan over ``torch.distributed`` point-to-point operations.

The worker hook calls a :class:`CopyExecutor` at the agreed steps for each chunk of layers: it is
a :class:`~eplb.worker_hook.copy_engine.CopyEngine` of pipeline depth 1. The
plan comes from :mod:`eplb.placement.copy_plan` (pure, the same on every rank); this module only
moves bytes. Per layer:

1. stage (clone) the OLD contents of the local slots that a local copy reads and this layer
   overwrites;
2. run the transfers in the plan's batches, every rank in the same order (a batch is capped so
   batched NCCL send/recv stays far from the op counts where it is reported to hang). In a batch,
   the experts going to one peer are packed into one buffer, cut into pieces of about
   ``piece_bytes``; each piece is one group of isend/irecv calls;
3. unpack what arrived, then run the local copies (from staged/unchanged slots, or from slots just
   received).

On CUDA the work runs on two side streams that first wait for the current stream: staging,
packing and NCCL on one, unpacking and local copies on the other, so that unpacking piece
``i - 1`` overlaps piece ``i`` on the wire. Every pack of a layer is queued before its first
group call (the packs read OLD contents, and :meth:`CopyExecutor.prefetch` can queue them a step
ahead). The host only queues work, then waits
once per call (allowed: this happens only at the agreed steps).

Steps 1 and 2 touch no weight (the transfers land in buffers), so :meth:`CopyExecutor.start` can
issue a chunk's transfers one step before the call that lands them: the wire then runs beside the
engine's step, and the call at the next step only unpacks. The hook does this at agreed steps
only (chunk ``i`` starts at ``S + i`` and lands at ``S + i + 1``, as the worker's agreement
schedules for ``pipeline_depth = 1``), so every rank issues the same
P2P ops at the same point of its step. With a process group of its own the copy overlaps the
engine's collectives; on the engine's group NCCL runs it before them, in the same order on every
rank. Every wait has a deadline
(``timeout_s`` per layer); a failure or timeout raises :class:`CopyError`, after which the
weights are in an unknown state and the engine must stop serving (DESIGN.md §4.7).

NCCL note: a batch only involves the ranks with transfers in it, so the group's NCCL communicator
must already exist (a collective ran on it, or it was created eagerly with ``device_id``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb.placement.copy_plan import LayerCopyPlan, LocalCopy, PeerOp, plan_copies

# How often the host polls a CUDA copy for completion: it spins (yielding the GIL) for the first
# _SPIN_S seconds, then sleeps _POLL_S between polls.
_SPIN_S = 0.005
_POLL_S = 0.0001
# Byte alignment of each weight tensor inside a packed expert (any dtype views in place).
_ALIGN = 16


class CopyError(RuntimeError):
    """Copying expert weights failed; the local weights may be half-updated.

    Attributes:
        epoch: the rebalance epoch.
        layer: the layer being copied, or None when the failure is not tied to one layer.
        peer: the EP rank (group rank) of the failed transfer, or None when unknown.
    """

    def __init__(self, epoch: int, layer: int | None, peer: int | None, detail: str) -> None:
        self.epoch = epoch
        self.layer = layer
        self.peer = peer
        self.detail = detail
        where = f"layer {layer}" if layer is not None else "no single layer"
        who = f"peer rank {peer}" if peer is not None else "peer unknown"
        super().__init__(f"expert copy failed: epoch {epoch}, {where}, {who}: {detail}")


@dataclass
class _Totals:
    """Running counts of one call, turned into :class:`ChunkStats` at the end."""

    sent: int = 0
    received: int = 0
    copies: int = 0
    ops: int = 0
    batches: int = 0
    staged: int = 0
    prefetched: int = 0
    started: int = 0


@dataclass(frozen=True)
class ChunkStats:
    """What one call of :class:`CopyExecutor` did on this rank.

    ``p2p_ops`` counts the isend/irecv calls issued (one per peer, direction and piece: the
    experts travel packed); ``batches`` counts the group calls (pieces) issued;
    ``staged_bytes`` is the most extra device memory one layer took (packed sends and receive
    buffers, staged local-copy sources); ``seconds`` is wall time of this call;
    ``prefetched_layers`` counts the layers that :meth:`CopyExecutor.prefetch` had prepared and
    ``started_layers`` those whose transfers :meth:`CopyExecutor.start` had issued (their wire
    time is not in ``seconds``).
    """

    epoch: int
    layers: tuple[int, ...]
    bytes_sent: int
    bytes_received: int
    local_copies: int
    p2p_ops: int
    batches: int
    staged_bytes: int
    seconds: float
    prefetched_layers: int = 0
    started_layers: int = 0


class CopyExecutor:
    """Copies expert weights between ranks when the placement changes.

    Args:
        rank: this rank's EP rank ``r`` (its rank in ``group``), ``0 <= r < G``.
        num_gpus: ``G``, the EP size.
        weights: ``weights[l][k]`` is weight tensor ``k`` of layer ``l``, shaped ``[S, ...]`` with
            ``S = P / G`` local slots first; any dtype; tensor ``k`` has the same shape and dtype
            in every layer. Updated in place.
        ranks_per_node: ranks per node (``node = rank // ranks_per_node``), to prefer same-node
            sources.
        group: the EP process group, or None for the default group; group ranks ``0..G-1`` are
            the EP ranks. A group of its own (not the one the engine's collectives use) lets
            transfers issued by :meth:`start` run beside the engine's step.
        max_ops_per_batch: bounds one batch to ``max_ops_per_batch // tensors per expert``
            expert transfers of this rank (at least one).
        timeout_s: the longest one layer's transfers may take, in seconds.
        bytes_budget: most extra device bytes one layer may take on any rank (every packed send
            and receive buffer of the layer, and the staged local-copy sources); None for no
            limit. Checked on the global plan before any transfer, so with equal budgets every
            rank fails alike.
        piece_bytes: experts sent to one peer in one batch travel in pieces of
            ``max(1, piece_bytes // packed expert bytes)`` experts, each its own isend/irecv, so
            that unpacking overlaps the wire on CUDA; 0 (the default) = one piece per
            peer and batch. On 2 x H200 over NVLink pieces were slower (each group call costs
            about 60 us, and copy kernels slow NCCL down about as much as they overlap it; see
            ``bench/copy_breakdown.py``); they may pay off where the wire is slow (PCIe, network).
    """

    def __init__(self, rank: int, num_gpus: int, weights: Sequence[Sequence[torch.Tensor]],
                 ranks_per_node: int, group: dist.ProcessGroup | None = None,
                 max_ops_per_batch: int = 256, timeout_s: float = 60.0,
                 bytes_budget: int | None = None, piece_bytes: int = 0) -> None:
        if num_gpus < 1 or not 0 <= rank < num_gpus:
            raise ValueError(f"rank {rank} is not in [0, {num_gpus})")
        if ranks_per_node < 1 or max_ops_per_batch < 1 or timeout_s <= 0 or piece_bytes < 0:
            raise ValueError("ranks_per_node, max_ops_per_batch and timeout_s must be positive, "
                             "piece_bytes >= 0")
        self.rank = rank
        self.num_gpus = num_gpus
        self.ranks_per_node = ranks_per_node
        self.group = group
        self.max_ops_per_batch = max_ops_per_batch
        self.timeout_s = timeout_s
        self.bytes_budget = bytes_budget
        self.weights = [list(layer) for layer in weights]
        self.slots_per_gpu, self.bytes_per_expert, self.device = _check_weights(self.weights)
        self._tensors_per_layer = len(self.weights[0])
        self._layout = self._slices()
        last_offset, last_bytes = self._layout[-1]
        self._packed_expert_bytes = -(-(last_offset + last_bytes) // _ALIGN) * _ALIGN
        # Experts this rank moves in one batch (bounds the packed buffers).
        self.transfers_per_batch = max(1, max_ops_per_batch // self._tensors_per_layer)
        self._global_ranks = (list(range(num_gpus)) if group is None
                              else [dist.get_global_rank(group, r) for r in range(num_gpus)])
        if dist.is_initialized():
            size, me = dist.get_world_size(group), dist.get_rank(group)
            if size != num_gpus or me != rank:
                raise ValueError(f"group has size {size} and rank {me}, expected {num_gpus} "
                                 f"and {rank}")
        self.experts_per_piece = (max(1, piece_bytes // self._packed_expert_bytes)
                                  if piece_bytes else self.transfers_per_batch)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._unpack_stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._prefetched: dict[tuple[int, int], _Prepared] = {}
        self._in_flight: dict[tuple[int, int], _Prepared] = {}

    #: :class:`~eplb.worker_hook.copy_engine.CopyEngine`: a chunk started at step ``S + i``
    #: lands at ``S + i + 1``.
    pipeline_depth = 1

    def __call__(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> ChunkStats:
        """Switch the slots of ``layers`` from ``old`` to ``new`` (the same as :meth:`land`; a
        CopyExecutor is also a plain one-call ``copy_fn``)."""
        return self.land(epoch, layers, old, new)

    def land(self, epoch: int, layers: list[int], old: torch.Tensor,
             new: torch.Tensor) -> ChunkStats:
        """Switch the slots of ``layers`` from ``old`` to ``new``.

        Layers that :meth:`prefetch` prepared for this epoch and the same placements skip the
        planning, packing and staging here; layers that :meth:`start` started only land here
        (their transfers were issued then).

        Args:
            epoch: the rebalance epoch (for errors and stats).
            layers: the layers of this chunk, copied in this order (the same on every rank).
            old: ``[L, P]`` full placement before the switch.
            new: ``[L, P]`` full placement after it.
        Returns:
            this rank's :class:`ChunkStats`.
        Raises:
            CopyError: on bad input, a staging budget overrun, a failed transfer or a timeout, or
                when :meth:`start` started a layer for other placements.
        """
        began = time.perf_counter()
        self._check_shapes(epoch, old, new)
        layers = [int(x) for x in layers]
        totals = _Totals()
        pending: list[_Piece] = []
        with self._side_stream():
            started = [self._take_started(epoch, layer, old, new) for layer in layers]
            totals.started = sum(prep is not None for prep in started)
            prepared = self._ready(epoch, layers, old, new, started)
            totals.prefetched = sum(prep.was_prefetched for prep in prepared)
            for prep in prepared:
                if not prep.plan.is_empty:
                    if not prep.issued:
                        self._issue(epoch, prep)
                    pending += self._land(epoch, prep, totals)
        if self._stream is not None:
            self._wait_cuda(epoch, pending, time.monotonic() + self.timeout_s * max(1, len(layers)))
        return ChunkStats(epoch, tuple(layers), totals.sent, totals.received, totals.copies,
                          totals.ops, totals.batches, totals.staged, time.perf_counter() - began,
                          totals.prefetched, totals.started)

    def start(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor) -> None:
        """Issue the transfers of ``layers`` now and return without waiting; the next call of
        this executor for the same epoch, layers and placements lands them (unpacks, runs the
        local copies) and only then changes weights. Uses what :meth:`prefetch` prepared.

        Every rank must call it at the same point (the hook does so at agreed steps only), as
        it issues P2P ops. Until the landing call the layers' weights must not change, and no
        other layer may be started twice.

        Same arguments as :meth:`__call__`.

        Raises:
            CopyError: on bad input, a staging budget overrun, a transfer that cannot start, or
                layers of another epoch still in flight (land or abandon them first).
        """
        self._check_shapes(epoch, old, new)
        layers = [int(x) for x in layers]
        stale = sorted({key for key in self._in_flight if key[0] != epoch or key[1] in layers})
        if stale:
            raise CopyError(epoch, stale[0][1], None, f"layers {[k[1] for k in stale]} of epochs "
                            f"{sorted({k[0] for k in stale})} are still in flight; land them first")
        with self._side_stream():
            none: list[_Prepared | None] = [None] * len(layers)
            for layer, prep in zip(layers, self._ready(epoch, layers, old, new, none)):
                prep.rows = (old[layer].clone(), new[layer].clone())
                if not prep.plan.is_empty:
                    self._issue(epoch, prep)
                self._in_flight[(epoch, layer)] = prep

    def abandon(self, timeout_s: float | None = None) -> None:
        """Wait (at most ``timeout_s``, default the per-layer timeout) for transfers that
        :meth:`start` issued and no call landed, then drop them without touching weights. Peers
        must abandon the same layers, or their transfers cannot finish.

        Raises:
            CopyError: a transfer failed or did not finish in time.
        """
        flights, self._in_flight = list(self._in_flight.items()), {}
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        for (epoch, _), prep in flights:
            self._drain(epoch, prep, deadline)

    def prefetch(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> None:
        """Plan ``layers`` and pack what this rank will send (and stage what it will read) now,
        so that the call at the agreed step mostly moves bytes. Call it any time before that
        call while the weights of ``layers`` stay unchanged (a layer's weights change only in
        its own copy). On CUDA this only queues device work on the side stream: it never waits
        for the device. The buffers stay allocated until the copy (about the bytes the layers
        send, plus staging); anything prefetched for another epoch is dropped.

        Same arguments as :meth:`__call__`.

        Raises:
            CopyError: on bad input or a staging budget overrun (as the copy itself would).
        """
        self._check_shapes(epoch, old, new)
        self._prefetched = {key: prep for key, prep in self._prefetched.items() if key[0] == epoch}
        plans = self._plan(epoch, [int(x) for x in layers], old, new)
        with self._side_stream():
            for plan in plans:
                prep = self._prepare(plan)
                prep.rows = (old[plan.layer].clone(), new[plan.layer].clone())
                prep.was_prefetched = True
                self._prefetched[(epoch, plan.layer)] = prep

    def _side_stream(self):
        """A context that queues device work on the side stream, behind the work already queued
        on the current stream (whose kernels may still read the weights)."""
        if self._stream is None:
            return nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._stream)

    def _take_prefetched(self, epoch: int, layer: int, old: torch.Tensor,
                         new: torch.Tensor) -> _Prepared | None:
        prep = self._prefetched.pop((epoch, layer), None)
        if prep is None or prep.rows is None:
            return None
        old_row, new_row = prep.rows
        if not (torch.equal(old_row, old[layer]) and torch.equal(new_row, new[layer])):
            return None  # prefetched for other placements: plan again
        return prep

    def _ready(self, epoch: int, layers: list[int], old: torch.Tensor, new: torch.Tensor,
               known: list[_Prepared | None]) -> list[_Prepared]:
        """One preparation per layer: the one in ``known`` (started), else what :meth:`prefetch`
        prepared for these placements, else planned and prepared now (all missing layers in one
        plan). Device work goes to the current stream (the side stream, from this class)."""
        prepared = [prep or self._take_prefetched(epoch, layer, old, new)
                    for layer, prep in zip(layers, known)]
        missing = [layer for layer, prep in zip(layers, prepared) if prep is None]
        fresh = {plan.layer: self._prepare(plan)
                 for plan in self._plan(epoch, missing, old, new)} if missing else {}
        return [prep or fresh[layer] for layer, prep in zip(layers, prepared)]

    def _take_started(self, epoch: int, layer: int, old: torch.Tensor,
                      new: torch.Tensor) -> _Prepared | None:
        prep = self._in_flight.pop((epoch, layer), None)
        if prep is None:
            return None
        assert prep.rows is not None
        old_row, new_row = prep.rows
        if not (torch.equal(old_row, old[layer]) and torch.equal(new_row, new[layer])):
            # The peers' ops are matched to what was started: land nothing, fail loudly.
            self._in_flight[(epoch, layer)] = prep
            self.abandon()
            raise CopyError(epoch, layer, None, "its transfers were started for other placements "
                            "than this call's; the weights are unchanged, but this rank no longer "
                            "agrees with its peers")
        return prep

    def _check_shapes(self, epoch: int, old: torch.Tensor, new: torch.Tensor) -> None:
        expected = [len(self.weights), self.slots_per_gpu * self.num_gpus]
        if list(old.shape) != expected or list(new.shape) != expected:
            raise CopyError(epoch, None, None, f"placements must be {expected}, got "
                            f"{list(old.shape)} and {list(new.shape)}")

    def _plan(self, epoch: int, layers: list[int], old: torch.Tensor,
              new: torch.Tensor) -> list[LayerCopyPlan]:
        try:
            plans = plan_copies(old, new, layers, self.num_gpus, self.ranks_per_node)
        except ValueError as exc:
            raise CopyError(epoch, None, None, f"cannot plan: {exc}") from exc
        if self.bytes_budget is not None:
            for plan in plans:
                # The busiest rank decides, so every rank with the same budget fails alike
                # before any transfer starts.
                need = max(self._working_bytes(plan, r) for r in range(self.num_gpus))
                if need > self.bytes_budget:
                    raise CopyError(epoch, plan.layer, None,
                                    f"staging needs {need} bytes, over the budget of "
                                    f"{self.bytes_budget}")
        return plans

    def _prepare(self, plan: LayerCopyPlan) -> _Prepared:
        """Everything of one layer's copy that reads only OLD contents or nothing: this rank's
        pieces (one group call each, with its send buffers packed and its receive buffers
        allocated), the staged local-copy sources and the local copies. Device work goes to the
        current stream (the side stream, when called from this class)."""
        weights = self.weights[plan.layer]
        prep = _Prepared(plan)
        if plan.is_empty:
            return prep
        prep.copies = plan.local_copies_of(self.rank)
        prep.working_bytes = self._working_bytes(plan, self.rank)
        prep.staged = {slot: [t[slot].clone() for t in weights]
                       for slot in plan.copy_sources_to_stage(self.rank)}
        for b, batch in enumerate(plan.batches(self.transfers_per_batch)):
            ops = plan.ops_for(self.rank, batch)
            if not ops:
                continue
            sends, recvs = _slots_by_peer(ops, "send"), _slots_by_peer(ops, "recv")
            longest = max(len(slots) for slots in [*sends.values(), *recvs.values()])
            for first in range(0, longest, self.experts_per_piece):
                window = slice(first, first + self.experts_per_piece)
                piece = _Piece(plan.layer)
                for peer in sorted(set(sends) | set(recvs)):
                    out, into = sends.get(peer, [])[window], recvs.get(peer, [])[window]
                    if out:
                        buf = self._pack(weights, out)
                        piece.p2p.append(dist.P2POp(dist.isend, buf, self._global_ranks[peer],
                                                    self.group, b))
                        piece.peers.append(peer)
                        piece.buffers.append(buf)
                        piece.sent += len(out) * self.bytes_per_expert
                    if into:
                        buf = torch.empty(len(into) * self._packed_expert_bytes,
                                          dtype=torch.uint8, device=self.device)
                        piece.p2p.append(dist.P2POp(dist.irecv, buf, self._global_ranks[peer],
                                                    self.group, b))
                        piece.peers.append(peer)
                        piece.buffers.append(buf)
                        piece.landing.append((into, buf))
                        piece.received += len(into) * self.bytes_per_expert
                prep.pieces.append(piece)
        return prep

    def _issue(self, epoch: int, prep: _Prepared) -> None:
        """Issue every piece of a prepared layer: one group call each, nothing waited for."""
        for piece in prep.pieces:
            piece.works = self._start(epoch, piece.layer, piece.p2p, piece.peers)
            piece.p2p = []
        prep.issued = True

    def _land(self, epoch: int, prep: _Prepared, totals: _Totals) -> list[_Piece]:
        """Finish one issued layer: the experts going to one peer in one batch travel packed in
        one buffer (NCCL moves one large message far faster than many), cut into pieces of at
        most ``piece_bytes``; each piece is one group call. On CUDA nothing here waits for the
        device: unpacking runs on a second side stream behind the NCCL works, and
        :meth:`_wait_cuda` waits once per call.

        Returns:
            the pieces, for the caller to wait on (CUDA; on gloo they are complete).
        """
        weights = self.weights[prep.plan.layer]
        deadline = time.monotonic() + self.timeout_s
        pieces, prep.pieces = prep.pieces, []
        for piece in pieces:
            totals.ops += len(piece.peers)
            totals.batches += 1
            totals.sent += piece.sent
            totals.received += piece.received
        totals.staged = max(totals.staged, prep.working_bytes)
        copies = prep.copies

        if self._stream is None:  # gloo: wait on the host, then unpack in order
            for piece in pieces:
                self._wait_host(epoch, piece, deadline)
                for slots, buf in piece.landing:
                    self._unpack(weights, slots, buf)
            self._local_copies(weights, copies, prep.staged)
            totals.copies += len(copies)
            return pieces

        packed = torch.cuda.Event()
        packed.record(self._stream)
        with torch.cuda.stream(self._unpack_stream):
            self._unpack_stream.wait_event(packed)  # no slot is written before every pack ran
            for piece in pieces:
                for work in piece.works:
                    work.wait()  # the unpack stream waits for the NCCL stream, the host does not
                for slots, buf in piece.landing:
                    self._unpack(weights, slots, buf)
            self._local_copies(weights, copies, prep.staged)
        totals.copies += len(copies)
        # The buffers were allocated on the side stream: once it waits for the unpack stream
        # (which waited for every NCCL work), the caching allocator may hand them out again.
        self._stream.wait_stream(self._unpack_stream)
        prep.staged = {}
        for piece in pieces:
            piece.landing, piece.buffers = [], []
        return pieces

    def _drain(self, epoch: int, prep: _Prepared, deadline: float) -> None:
        """Wait for an issued layer's transfers without landing them, then free its buffers."""
        pieces, prep.pieces = prep.pieces, []
        if self._stream is None:
            for piece in pieces:
                self._wait_host(epoch, piece, deadline)
            return
        with torch.cuda.stream(self._stream):
            for piece in pieces:
                for work in piece.works:
                    work.wait()  # buffers go back to the allocator only after the wire is done
        self._wait_cuda(epoch, pieces, deadline)

    def _local_copies(self, weights: list[torch.Tensor], copies: list[LocalCopy],
                      staged: dict[int, list[torch.Tensor]]) -> None:
        for copy in copies:
            for k, tensor in enumerate(weights):
                if copy.from_old and copy.src_local_slot in staged:
                    src = staged[copy.src_local_slot][k]
                else:
                    src = tensor[copy.src_local_slot]
                tensor[copy.dst_local_slot].copy_(src)

    def _working_bytes(self, plan: LayerCopyPlan, rank: int) -> int:
        """Extra device bytes ``rank`` holds while copying ``plan``'s layer: every packed send and
        every receive buffer of the layer (all are issued before the first is unpacked), and the
        staged local-copy sources."""
        transfers = len(plan.sends_of(rank)) + len(plan.recvs_of(rank))
        return (transfers * self._packed_expert_bytes
                + len(plan.copy_sources_to_stage(rank)) * self.bytes_per_expert)

    def _slices(self) -> list[tuple[int, int]]:
        """(offset, bytes) of each weight tensor of one expert inside a packed expert; offsets
        are aligned so that any dtype can be viewed in place."""
        out, offset = [], 0
        for t in self.weights[0]:
            nbytes = t[0].numel() * t.element_size()
            out.append((offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        return out

    def _pack(self, weights: list[torch.Tensor], slots: list[int]) -> torch.Tensor:
        """One contiguous byte buffer holding the experts of ``slots``, in order."""
        buf = torch.empty(len(slots) * self._packed_expert_bytes, dtype=torch.uint8,
                          device=self.device)
        for i, slot in enumerate(slots):
            base = i * self._packed_expert_bytes
            for (offset, nbytes), tensor in zip(self._layout, weights):
                src = tensor[slot].contiguous().reshape(-1).view(torch.uint8)
                buf[base + offset:base + offset + nbytes].copy_(src)
        return buf

    def _unpack(self, weights: list[torch.Tensor], slots: list[int], buf: torch.Tensor) -> None:
        for i, slot in enumerate(slots):
            base = i * self._packed_expert_bytes
            for (offset, nbytes), tensor in zip(self._layout, weights):
                dst = tensor[slot]
                dst.copy_(buf[base + offset:base + offset + nbytes].view(dst.dtype).view(dst.shape))

    def _start(self, epoch: int, layer: int, p2p: list[dist.P2POp], peers: list[int]) -> list:
        """Issue one group of P2P ops; the works it returns."""
        try:
            return dist.batch_isend_irecv(p2p)
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes a CopyError
            unique = sorted(set(peers))
            raise CopyError(epoch, layer, unique[0] if len(unique) == 1 else None,
                            f"could not start transfers with peers {unique}: {exc}") from exc

    def _wait_host(self, epoch: int, piece: _Piece, deadline: float) -> None:
        """gloo: wait for one piece's works on the host, at most until ``deadline``."""
        for i, work in enumerate(piece.works):
            peer = piece.peer_of(i, len(piece.works))
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                if work.wait(timeout=timedelta(seconds=remaining)) is False:
                    raise CopyError(epoch, piece.layer, peer, f"timed out after {self.timeout_s}s "
                                    f"(peers {sorted(set(piece.peers))})")
            except CopyError:
                raise
            except Exception as exc:  # noqa: BLE001 - gloo reports a timeout as RuntimeError
                raise CopyError(epoch, piece.layer, peer, f"transfer failed (peers "
                                f"{sorted(set(piece.peers))}, timeout {self.timeout_s}s): "
                                f"{exc}") from exc

    def _wait_cuda(self, epoch: int, pieces: list[_Piece], deadline: float) -> None:
        """CUDA: wait until every queued copy ran, at most until ``deadline``. NCCL's ``wait()``
        only orders streams, so the host polls (spinning first: this is the agreed step, and a
        layer takes about a millisecond) and names the first unfinished piece on a timeout."""
        done = torch.cuda.Event()
        done.record(self._stream)
        started = time.monotonic()
        while not done.query():
            now = time.monotonic()
            if now > deadline:
                for piece in pieces:
                    for i, work in enumerate(piece.works):
                        if not work.is_completed():
                            raise CopyError(epoch, piece.layer, piece.peer_of(i, len(piece.works)),
                                            f"timed out after {self.timeout_s}s per layer "
                                            f"(peers {sorted(set(piece.peers))})")
                raise CopyError(epoch, None, None, f"local copies did not finish within "
                                f"{deadline - started:.1f}s")
            time.sleep(0 if now - started < _SPIN_S else _POLL_S)
        try:
            for piece in pieces:
                for work in piece.works:
                    work.wait()  # raises if NCCL reported an error for this work
        except Exception as exc:  # noqa: BLE001
            raise CopyError(epoch, None, None, f"transfer failed: {exc}") from exc


@dataclass
class _Piece:
    """One group call of P2P ops of one layer, this rank's side: the ops (in issue order) and
    their peers, the receive buffers to unpack as ``(local slots, buffer)``, every buffer (kept
    alive until the NCCL ops ran), the bytes moved, and once started, the works."""

    layer: int
    p2p: list[dist.P2POp] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)
    landing: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    works: list = field(default_factory=list)

    def peer_of(self, i: int, works: int) -> int | None:
        """The peer of work ``i``: gloo returns one work per op, NCCL one for the group."""
        if works == len(self.peers):
            return self.peers[i]
        unique = set(self.peers)
        return unique.pop() if len(unique) == 1 else None


@dataclass
class _Prepared:
    """One layer made ready to copy on this rank: its pieces in issue order, the staged OLD
    tensors of local-copy sources by local slot, the local copies, the extra device bytes it
    holds, the placements' rows it was planned from (``[P]`` each; set by
    :meth:`CopyExecutor.prefetch` and :meth:`CopyExecutor.start`), whether ``prefetch`` made it
    and whether its pieces were issued."""

    plan: LayerCopyPlan
    pieces: list[_Piece] = field(default_factory=list)
    staged: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    copies: list[LocalCopy] = field(default_factory=list)
    working_bytes: int = 0
    rows: tuple[torch.Tensor, torch.Tensor] | None = None
    was_prefetched: bool = False
    issued: bool = False


def _slots_by_peer(ops: list[PeerOp], kind: str) -> dict[int, list[int]]:
    """Local slots of ``ops`` of ``kind``, per peer, in op order (the order both sides use)."""
    out: dict[int, list[int]] = {}
    for op in ops:
        if op.kind == kind:
            out.setdefault(op.peer, []).append(op.local_slot)
    return out


def _check_weights(weights: list[list[torch.Tensor]]) -> tuple[int, int, torch.device]:
    """Check the per-layer structure; return ``(S, bytes per expert, device)``."""
    if not weights or not weights[0]:
        raise ValueError("weights must hold at least one layer with at least one tensor")
    first = weights[0]
    slots = first[0].shape[0] if first[0].dim() > 0 else 0
    device = first[0].device
    for layer, tensors in enumerate(weights):
        if len(tensors) != len(first):
            raise ValueError(f"layer {layer} has {len(tensors)} tensors, layer 0 has {len(first)}")
        for k, (t, ref) in enumerate(zip(tensors, first)):
            if t.dim() == 0 or t.shape[0] != slots or t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(f"weights[{layer}][{k}] is {t.dtype}{list(t.shape)}; expected "
                                 f"{ref.dtype}{list(ref.shape)} with {slots} local slots first")
            if t.device != device:
                raise ValueError(f"weights[{layer}][{k}] is on {t.device}, not {device}")
    if slots == 0:
        raise ValueError("weights have no local slots")
    per_expert = sum(t[0].numel() * t.element_size() for t in first)
    return slots, per_expert, device
