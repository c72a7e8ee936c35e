"""Which expert weights move where when a placement changes: pure planning, no communication.

A placement is ``phys2log: [L, P]``; with ``G`` ranks, rank ``r`` owns the physical slots
``[r * S, (r + 1) * S)`` with ``S = P / G``, and holds them as local slots ``0 .. S-1``.
At the agreed step every rank switches from ``old`` to ``new`` by copying expert weights.

Every rank calls these functions with the same inputs and gets the same global plan, so each
send has its receive without any message being exchanged. (vLLM's EPLB works out a
rank's sends and receives inside the function that runs them; here the whole plan is a value apart
from the executor, so it is tested without a process group, costed by offline planning
(``eplbctl plan``), and split into batches that every rank runs in the same order.) Rules for one layer:

- a slot whose expert does not change is never touched;
- a slot whose new expert is already on the rank in the OLD placement is filled by a local copy
  that reads OLD contents (swaps and cycles inside a rank work because the old contents of every
  slot that is both read and overwritten are kept, see ``staged_slots``: the executor packs what
  it sends before any write and stages ``copy_sources_to_stage``);
- otherwise the rank receives the expert once from a rank holding it in the OLD placement,
  preferring one on its own node (``node = rank // ranks_per_node``), then the holder with the
  fewest sends so far in this layer; further slots of the same rank that need the same expert
  are filled by a local copy of the received slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Recv:
    """One expert of one layer moved between ranks: ``dst_rank`` receives from ``src_rank``.

    Slots are local slot indices (``0 <= slot < S``). ``src_local_slot`` holds ``expert`` in the
    OLD placement; ``dst_local_slot`` holds it in the NEW one.
    """

    dst_rank: int
    dst_local_slot: int
    src_rank: int
    src_local_slot: int
    expert: int


@dataclass(frozen=True)
class LocalCopy:
    """A copy between two local slots of one rank: ``dst_local_slot <- src_local_slot``.

    ``from_old`` True: read the OLD contents of ``src_local_slot`` (the expert was already on
    this rank). ``from_old`` False: read ``src_local_slot`` after this layer's receives landed
    (a second local slot wanting an expert the rank receives once).
    """

    rank: int
    dst_local_slot: int
    src_local_slot: int
    expert: int
    from_old: bool


@dataclass(frozen=True)
class PeerOp:
    """One point-to-point operation seen from ``rank``: send to or receive from ``peer``.

    ``index`` is the position of the transfer in :attr:`LayerCopyPlan.recvs`; both sides see the
    same index, so it orders the ops between two ranks and serves as the message tag.
    """

    kind: Literal["send", "recv"]
    rank: int
    peer: int
    local_slot: int
    expert: int
    index: int


@dataclass(frozen=True)
class LayerCopyStats:
    """Work of one layer's copy. Every field is a tuple of length ``G`` indexed by rank.

    ``p2p_ops`` counts expert transfers (one send or one receive of a whole expert); the
    executor packs the experts a batch moves between two ranks into one operation each way.
    """

    layer: int
    bytes_received: tuple[int, ...]
    bytes_sent: tuple[int, ...]
    local_copies: tuple[int, ...]
    p2p_ops: tuple[int, ...]
    staged_slots: tuple[int, ...]


@dataclass(frozen=True)
class LayerCopyPlan:
    """The global copy plan of one layer (every rank's part of it).

    Attributes:
        layer: the layer index ``l``.
        num_gpus: ``G``.
        slots_per_gpu: ``S = P / G``.
        recvs: transfers between ranks, ordered by ``(dst_rank, dst_local_slot)``.
        local_copies: copies inside a rank, ordered by ``(rank, dst_local_slot)``.
    """

    layer: int
    num_gpus: int
    slots_per_gpu: int
    recvs: tuple[Recv, ...]
    local_copies: tuple[LocalCopy, ...]

    @property
    def is_empty(self) -> bool:
        """True when no slot of this layer changes."""
        return not self.recvs and not self.local_copies

    def recvs_of(self, rank: int) -> list[Recv]:
        """Transfers that ``rank`` receives."""
        return [t for t in self.recvs if t.dst_rank == rank]

    def sends_of(self, rank: int) -> list[Recv]:
        """Transfers that ``rank`` sends."""
        return [t for t in self.recvs if t.src_rank == rank]

    def local_copies_of(self, rank: int) -> list[LocalCopy]:
        """Local copies that ``rank`` performs."""
        return [c for c in self.local_copies if c.rank == rank]

    def staged_slots(self, rank: int) -> list[int]:
        """Local slots of ``rank`` whose OLD contents must be saved before any write.

        These are the slots read as old contents (a send source or a ``from_old`` copy source)
        that are also overwritten in this layer. Sources are chosen among slots whose expert does
        not change whenever the rank has one, so this list is usually short.
        """
        reads = {t.src_local_slot for t in self.sends_of(rank)}
        return sorted((reads & self._writes(rank)) | set(self.copy_sources_to_stage(rank)))

    def copy_sources_to_stage(self, rank: int) -> list[int]:
        """Local slots of ``rank`` that a ``from_old`` local copy reads and this layer overwrites:
        the staging the executor needs once sends are packed before any write."""
        reads = {c.src_local_slot for c in self.local_copies_of(rank) if c.from_old}
        return sorted(reads & self._writes(rank))

    def _writes(self, rank: int) -> set[int]:
        return ({t.dst_local_slot for t in self.recvs_of(rank)}
                | {c.dst_local_slot for c in self.local_copies_of(rank)})

    def batches(self, max_transfers_per_rank: int) -> list[list[int]]:
        """Split the transfers into batches that every rank runs in the same order.

        A transfer and its two ends are always in the same batch, and no rank takes part in more
        than ``max_transfers_per_rank`` transfers (sends plus receives) of one batch, so running
        the batches one after the other on every rank cannot deadlock. First fit over
        :attr:`recvs` in order, hence deterministic.

        Returns:
            a list of batches, each a list of indices into :attr:`recvs` in increasing order.
        """
        if max_transfers_per_rank < 1:
            raise ValueError(f"max_transfers_per_rank must be >= 1, got {max_transfers_per_rank}")
        batches: list[list[int]] = []
        load: list[list[int]] = []  # load[b][rank]: transfers of rank in batch b
        for index, t in enumerate(self.recvs):
            for b, counts in enumerate(load):
                if (counts[t.src_rank] < max_transfers_per_rank
                        and counts[t.dst_rank] < max_transfers_per_rank):
                    break
            else:
                b = len(batches)
                batches.append([])
                load.append([0] * self.num_gpus)
            batches[b].append(index)
            load[b][t.src_rank] += 1
            load[b][t.dst_rank] += 1
        return batches

    def ops_for(self, rank: int, indices: Iterable[int] | None = None) -> list[PeerOp]:
        """The point-to-point operations of ``rank``, in the order both sides agree on.

        Args:
            rank: the rank whose operations are listed.
            indices: only these transfers (indices into :attr:`recvs`, e.g. one of
                :meth:`batches`); all transfers when None.
        Returns:
            ops ordered by ``(peer, kind, index)``: grouped by peer, and between two ranks in each
            direction in increasing transfer index, which is the order the peer uses too.
        """
        chosen = range(len(self.recvs)) if indices is None else indices
        ops: list[PeerOp] = []
        for index in chosen:
            t = self.recvs[index]
            if t.src_rank == rank:
                ops.append(PeerOp("send", rank, t.dst_rank, t.src_local_slot, t.expert, index))
            if t.dst_rank == rank:
                ops.append(PeerOp("recv", rank, t.src_rank, t.dst_local_slot, t.expert, index))
        ops.sort(key=lambda op: (op.peer, op.kind, op.index))
        return ops

    def stats(self, bytes_per_expert: int) -> LayerCopyStats:
        """Bytes, copies and transfers per rank, for experts of ``bytes_per_expert`` bytes."""
        g = self.num_gpus
        received, sent, copies, ops = [0] * g, [0] * g, [0] * g, [0] * g
        for t in self.recvs:
            received[t.dst_rank] += bytes_per_expert
            sent[t.src_rank] += bytes_per_expert
            ops[t.dst_rank] += 1
            ops[t.src_rank] += 1
        for c in self.local_copies:
            copies[c.rank] += 1
        staged = tuple(len(self.staged_slots(r)) for r in range(g))
        return LayerCopyStats(self.layer, tuple(received), tuple(sent), tuple(copies), tuple(ops),
                              staged)


def changed_layers(old: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Layers in which at least one slot changes its expert.

    Args:
        old: ``[L, P]`` placement before the switch.
        new: ``[L, P]`` placement after it.
    Returns:
        increasing layer indices.
    """
    _check_pair(old, new)
    return (old.cpu() != new.cpu()).any(dim=1).nonzero().flatten().tolist()


def chunk_layers(layers: Sequence[int], layers_per_chunk: int | None = None,
                 bytes_per_layer: int | Sequence[int] | None = None,
                 bytes_per_chunk: int | None = None) -> list[list[int]]:
    """Split ``layers`` (kept in order) into chunks, one chunk copied per step.

    Give ``layers_per_chunk``, or ``bytes_per_chunk`` with ``bytes_per_layer``, or both (the
    stricter wins). ``bytes_per_layer`` is one number for every layer or one per entry of
    ``layers`` (e.g. the bytes the busiest rank moves in that layer). A chunk always holds at
    least one layer, even when that layer alone exceeds the bytes budget.
    """
    if layers_per_chunk is None and bytes_per_chunk is None:
        raise ValueError("give layers_per_chunk or bytes_per_chunk")
    if layers_per_chunk is not None and layers_per_chunk < 1:
        raise ValueError(f"layers_per_chunk must be >= 1, got {layers_per_chunk}")
    if bytes_per_chunk is not None:
        if bytes_per_layer is None:
            raise ValueError("bytes_per_chunk needs bytes_per_layer")
        if bytes_per_chunk < 0:
            raise ValueError(f"bytes_per_chunk must be >= 0, got {bytes_per_chunk}")
    sizes: list[int] | None = None
    if bytes_per_chunk is not None and bytes_per_layer is not None:
        if isinstance(bytes_per_layer, int):
            sizes = [bytes_per_layer] * len(layers)
        else:
            sizes = [int(b) for b in bytes_per_layer]
        if len(sizes) != len(layers):
            raise ValueError(f"bytes_per_layer has {len(sizes)} entries for {len(layers)} layers")
        if any(b < 0 for b in sizes):
            raise ValueError("bytes_per_layer must be >= 0")
    chunks: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i, layer in enumerate(layers):
        size = sizes[i] if sizes is not None else 0
        full = ((layers_per_chunk is not None and len(current) >= layers_per_chunk)
                or (bytes_per_chunk is not None and current_bytes + size > bytes_per_chunk))
        if current and full:
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(int(layer))
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks


def plan_layer(layer: int, old_row: torch.Tensor, new_row: torch.Tensor, num_gpus: int,
               ranks_per_node: int) -> LayerCopyPlan:
    """Plan the copies of one layer.

    Args:
        layer: the layer index, recorded in the plan.
        old_row: ``[P]`` logical expert of each physical slot before the switch.
        new_row: ``[P]`` logical expert of each physical slot after it.
        num_gpus: ``G``; ``P % G == 0``.
        ranks_per_node: ranks per node; rank ``r`` is on node ``r // ranks_per_node``.
    Returns:
        the layer's :class:`LayerCopyPlan`.
    Raises:
        ValueError: on bad shapes or sizes, or when ``new_row`` needs an expert that no slot of
            ``old_row`` holds.
    """
    if old_row.dim() != 1 or old_row.shape != new_row.shape:
        raise ValueError(f"rows must be [P] and equal in shape, got {list(old_row.shape)} and "
                         f"{list(new_row.shape)}")
    _check_sizes(old_row.shape[0], num_gpus, ranks_per_node)
    old: list[int] = old_row.cpu().tolist()
    new: list[int] = new_row.cpu().tolist()
    slots = len(old) // num_gpus

    holders: dict[int, list[int]] = {}  # expert -> physical slots holding it in OLD
    for p, expert in enumerate(old):
        holders.setdefault(expert, []).append(p)

    def source_slot(rank: int, expert: int) -> int | None:
        """Local slot of ``rank`` holding ``expert`` in OLD; a slot that keeps it is preferred,
        because its contents stay valid and it never needs staging."""
        mine = [p for p in holders.get(expert, ()) if p // slots == rank]
        if not mine:
            return None
        keeps = [p for p in mine if new[p] == expert]
        return (keeps or mine)[0] - rank * slots

    sends = [0] * num_gpus  # transfers each rank sends in this layer so far
    recvs: list[Recv] = []
    copies: list[LocalCopy] = []
    for rank in range(num_gpus):
        received: dict[int, int] = {}  # expert -> local slot it lands in on this rank
        for local in range(slots):
            p = rank * slots + local
            expert = new[p]
            if old[p] == expert:
                continue
            src = source_slot(rank, expert)
            if src is not None:
                copies.append(LocalCopy(rank, local, src, expert, from_old=True))
            elif expert in received:
                copies.append(LocalCopy(rank, local, received[expert], expert, from_old=False))
            else:
                holder = _pick_holder(rank, expert, holders, new, slots, sends, ranks_per_node,
                                      num_gpus, layer)
                sends[holder] += 1
                src = source_slot(holder, expert)
                assert src is not None
                recvs.append(Recv(rank, local, holder, src, expert))
                received[expert] = local
    return LayerCopyPlan(layer, num_gpus, slots, tuple(recvs), tuple(copies))


def plan_copies(old: torch.Tensor, new: torch.Tensor, layers: Sequence[int], num_gpus: int,
                ranks_per_node: int) -> list[LayerCopyPlan]:
    """Plan the copies of ``layers`` (in that order) for the switch from ``old`` to ``new``.

    Args:
        old: ``[L, P]`` placement before the switch.
        new: ``[L, P]`` placement after it.
        layers: layer indices to plan; a layer with no change gets an empty plan.
        num_gpus: ``G``; ``P % G == 0``.
        ranks_per_node: ranks per node.
    Returns:
        one :class:`LayerCopyPlan` per entry of ``layers``.
    """
    _check_pair(old, new)
    _check_sizes(old.shape[1], num_gpus, ranks_per_node)
    old, new = old.cpu(), new.cpu()
    for layer in layers:
        if not 0 <= layer < old.shape[0]:
            raise ValueError(f"layer {layer} out of range [0, {old.shape[0]})")
    return [plan_layer(int(layer), old[layer], new[layer], num_gpus, ranks_per_node)
            for layer in layers]


def _pick_holder(rank: int, expert: int, holders: dict[int, list[int]], new: list[int],
                 slots: int, sends: list[int], ranks_per_node: int, num_gpus: int,
                 layer: int) -> int:
    """The rank ``rank`` receives ``expert`` from: same node first, then fewest sends so far,
    then a holder whose copy stays in place (no staging), then the nearest rank after ``rank``
    (so ties spread around the ring instead of piling on rank 0)."""
    candidates = sorted({p // slots for p in holders.get(expert, ())})
    if not candidates:
        raise ValueError(f"layer {layer}: expert {expert} is needed but no slot holds it in the "
                         f"old placement")
    node = rank // ranks_per_node

    def key(holder: int) -> tuple[bool, int, bool, int]:
        keeps = any(p // slots == holder and new[p] == expert for p in holders[expert])
        return (holder // ranks_per_node != node, sends[holder], not keeps,
                (holder - rank) % num_gpus)

    return min(candidates, key=key)


def _check_pair(old: torch.Tensor, new: torch.Tensor) -> None:
    if old.dim() != 2 or old.shape != new.shape:
        raise ValueError(f"placements must be [L, P] and equal in shape, got {list(old.shape)} "
                         f"and {list(new.shape)}")


def _check_sizes(num_physical: int, num_gpus: int, ranks_per_node: int) -> None:
    if num_gpus < 1 or ranks_per_node < 1:
        raise ValueError(f"num_gpus and ranks_per_node must be >= 1, got {num_gpus} and "
                         f"{ranks_per_node}")
    if num_physical % num_gpus != 0:
        raise ValueError(f"P={num_physical} is not divisible by num_gpus={num_gpus}")
