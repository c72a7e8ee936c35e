"""Run a copy plan over ``torch.distributed`` point-to-point operations.

The worker hook calls a :class:`CopyExecutor` at the agreed step for each chunk of layers. The
plan comes from :mod:`eplb.worker_hook.copy_plan` (pure, the same on every rank); this module only
moves bytes. Per layer:

1. stage (clone) the OLD contents of the local slots that are read and also overwritten;
2. run the transfers in the plan's batches, every rank in the same order (a batch is capped so
   batched NCCL send/recv stays far from the op counts where it is reported to hang);
3. run the local copies (from staged/unchanged slots, or from slots just received).

Every wait has a deadline (``timeout_s`` per batch); a failure or timeout raises
:class:`CopyError`, after which the weights are in an unknown state and the engine must stop
serving (DESIGN.md §4.7). On CUDA the work runs on a side stream that first waits for the current
stream; the host synchronizes with that stream before returning, which is allowed here since it
only happens at the agreed step.

NCCL note: a batch only involves the ranks with transfers in it, so the group's NCCL communicator
must already exist (a collective ran on it, or it was created eagerly with ``device_id``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb.worker_hook.copy_plan import LayerCopyPlan, PeerOp, plan_copies

# How often a CUDA batch is polled for completion while waiting for its deadline.
_POLL_S = 0.00005
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


@dataclass(frozen=True)
class ChunkStats:
    """What one call of :class:`CopyExecutor` did on this rank.

    ``p2p_ops`` counts the isend/irecv calls issued (one per peer and direction in each batch:
    the experts travel packed); ``staged_bytes`` is the most extra device memory one layer took (packed sends,
    staged local-copy sources, one batch of receive buffers); ``seconds`` is wall time.
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
            the EP ranks.
        max_ops_per_batch: bounds one batch to ``max_ops_per_batch // tensors per expert``
            expert transfers of this rank (at least one), which bounds its receive buffers. Each
            batch issues one isend and one irecv per peer, the experts packed into one buffer.
        timeout_s: deadline of each batch, in seconds.
        bytes_budget: most extra device bytes one layer may take on any rank (packed sends,
            staged local-copy sources, one batch of receive buffers); None for no limit. Checked
            on the global plan before any transfer, so with equal budgets every rank fails alike.
    """

    def __init__(self, rank: int, num_gpus: int, weights: Sequence[Sequence[torch.Tensor]],
                 ranks_per_node: int, group: dist.ProcessGroup | None = None,
                 max_ops_per_batch: int = 256, timeout_s: float = 60.0,
                 bytes_budget: int | None = None) -> None:
        if num_gpus < 1 or not 0 <= rank < num_gpus:
            raise ValueError(f"rank {rank} is not in [0, {num_gpus})")
        if ranks_per_node < 1 or max_ops_per_batch < 1 or timeout_s <= 0:
            raise ValueError("ranks_per_node, max_ops_per_batch and timeout_s must be positive")
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
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None

    def __call__(self, epoch: int, layers: list[int], old: torch.Tensor,
                 new: torch.Tensor) -> ChunkStats:
        """Switch the slots of ``layers`` from ``old`` to ``new``.

        Args:
            epoch: the rebalance epoch (for errors and stats).
            layers: the layers of this chunk, copied in this order (the same on every rank).
            old: ``[L, P]`` full placement before the switch.
            new: ``[L, P]`` full placement after it.
        Returns:
            this rank's :class:`ChunkStats`.
        Raises:
            CopyError: on bad input, a staging budget overrun, a failed transfer or a timeout.
        """
        start = time.perf_counter()
        plans = self._plan(epoch, layers, old, new)
        totals = _Totals()
        stream_ctx = nullcontext()
        if self._stream is not None:
            # The side stream must not overwrite weights that queued kernels still read.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            stream_ctx = torch.cuda.stream(self._stream)
        with stream_ctx:
            for plan in plans:
                if not plan.is_empty:
                    self._run_layer(epoch, plan, totals)
        if self._stream is not None:
            self._stream.synchronize()
        return ChunkStats(epoch, tuple(int(x) for x in layers), totals.sent, totals.received,
                          totals.copies, totals.ops, totals.batches, totals.staged,
                          time.perf_counter() - start)

    def _plan(self, epoch: int, layers: list[int], old: torch.Tensor,
              new: torch.Tensor) -> list[LayerCopyPlan]:
        expected = [len(self.weights), self.slots_per_gpu * self.num_gpus]
        if list(old.shape) != expected or list(new.shape) != expected:
            raise CopyError(epoch, None, None, f"placements must be {expected}, got "
                            f"{list(old.shape)} and {list(new.shape)}")
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

    def _run_layer(self, epoch: int, plan: LayerCopyPlan, totals: _Totals) -> None:
        """Copy one layer: every expert a peer needs from this rank is packed, with the others
        going to that peer in the same batch, into one buffer sent with one isend (NCCL moves one
        large message far faster than many); received buffers are unpacked into their slots."""
        weights = self.weights[plan.layer]
        batches = [plan.ops_for(self.rank, batch)
                   for batch in plan.batches(self.transfers_per_batch)]
        # Pack every outgoing expert now, from the OLD contents, before any slot is written.
        packed = [{peer: self._pack(weights, [op.local_slot for op in ops if op.kind == "send"
                                              and op.peer == peer])
                   for peer in sorted({op.peer for op in ops if op.kind == "send"})}
                  for ops in batches]
        # Old contents that local copies read from slots this layer overwrites.
        copies = plan.local_copies_of(self.rank)
        staged = {slot: [t[slot].clone() for t in weights]
                  for slot in plan.copy_sources_to_stage(self.rank)}
        totals.staged = max(totals.staged, self._working_bytes(plan, self.rank))

        for b, (ops, sends) in enumerate(zip(batches, packed)):
            if not ops:
                continue
            p2p: list[dist.P2POp] = []
            peers: list[int] = []
            landing: list[tuple[list[int], torch.Tensor]] = []
            for peer in sorted({op.peer for op in ops}):
                if peer in sends:
                    p2p.append(dist.P2POp(dist.isend, sends[peer], self._global_ranks[peer],
                                          self.group, b))
                    peers.append(peer)
                    totals.sent += sends[peer].numel() // self._packed_expert_bytes * \
                        self.bytes_per_expert
                slots = [op.local_slot for op in ops if op.kind == "recv" and op.peer == peer]
                if slots:
                    buf = torch.empty(len(slots) * self._packed_expert_bytes, dtype=torch.uint8,
                                      device=self.device)
                    p2p.append(dist.P2POp(dist.irecv, buf, self._global_ranks[peer], self.group, b))
                    peers.append(peer)
                    landing.append((slots, buf))
                    totals.received += len(slots) * self.bytes_per_expert
            self._exchange(epoch, plan.layer, p2p, peers, ops)
            for slots, buf in landing:
                self._unpack(weights, slots, buf)
            totals.ops += len(p2p)
            totals.batches += 1

        for copy in copies:
            for k, tensor in enumerate(weights):
                if copy.from_old and copy.src_local_slot in staged:
                    src = staged[copy.src_local_slot][k]
                else:
                    src = tensor[copy.src_local_slot]
                tensor[copy.dst_local_slot].copy_(src)
            totals.copies += 1

    def _working_bytes(self, plan: LayerCopyPlan, rank: int) -> int:
        """Extra device bytes ``rank`` holds while copying ``plan``'s layer: every packed send
        (all packed up front), the staged local-copy sources, and the largest batch's receives."""
        recvs = max((sum(op.kind == "recv" for op in plan.ops_for(rank, batch))
                     for batch in plan.batches(self.transfers_per_batch)), default=0)
        packed = len(plan.sends_of(rank)) + recvs
        return (packed * self._packed_expert_bytes
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

    def _exchange(self, epoch: int, layer: int, p2p: list[dist.P2POp], peers: list[int],
                  ops: list[PeerOp]) -> None:
        """Start one batch and wait for all of it, at most ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        batch_peers = sorted({op.peer for op in ops})
        try:
            works = dist.batch_isend_irecv(p2p)
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes a CopyError
            raise CopyError(epoch, layer, batch_peers[0] if len(batch_peers) == 1 else None,
                            f"could not start a batch with peers {batch_peers}: {exc}") from exc
        for i, work in enumerate(works):
            # Gloo returns one work per op; NCCL may return one for the coalesced batch.
            if len(works) == len(peers):
                peer: int | None = peers[i]
            else:
                peer = batch_peers[0] if len(batch_peers) == 1 else None
            try:
                if self._cuda:
                    # NCCL's wait() only orders streams; polling the work keeps the deadline.
                    while not work.is_completed():
                        if time.monotonic() > deadline:
                            raise CopyError(epoch, layer, peer, f"timed out after "
                                            f"{self.timeout_s}s (batch peers {batch_peers})")
                        time.sleep(_POLL_S)
                    work.wait()
                else:
                    remaining = max(deadline - time.monotonic(), 0.001)
                    if work.wait(timeout=timedelta(seconds=remaining)) is False:
                        raise CopyError(epoch, layer, peer, f"timed out after {self.timeout_s}s "
                                        f"(batch peers {batch_peers})")
            except CopyError:
                raise
            except Exception as exc:  # noqa: BLE001 - gloo reports a timeout as RuntimeError
                raise CopyError(epoch, layer, peer, f"transfer failed (batch peers "
                                f"{batch_peers}, timeout {self.timeout_s}s): {exc}") from exc


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
