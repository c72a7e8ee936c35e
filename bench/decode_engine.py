"""The stand-in EP decode engine of ``bench/decode_gpu.py`` (a benchmark, not the product).

One rank of an expert-parallel MoE decode loop: ``L`` MoE layers, each with ``S = P / G`` local
expert slots of DeepSeek-V3 shape (w13 ``[S, 2I, H]``, w2 ``[S, H, I]``), a router whose expert
popularity is skewed (lognormal) and drifts, token dispatch and combine with
``all_to_all_single``, and the real expert matmuls (w13 -> SiLU gate -> w2) for the rows each
slot receives. The most loaded GPU decides how long a layer takes, since every rank waits for it
in the combine all-to-all.

Dispatch follows DeepEP's "normal" mode: the per-(destination, slot) row counts go first (an
all-to-all of a small device tensor), and one host read of those counts per layer gives the split
sizes and the per-slot matmul shapes. That read is the stand-in engine's own host sync, not the
hook's.

Each expert slot is filled with one value that names (layer, expert) exactly in bf16, so after a
rebalance every slot can be checked bit-exactly against the expert its placement says it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    """Sizes of the stand-in model (one EP group of ``world`` ranks).

    ``physical = slots * world`` slots per layer; ``experts <= physical`` logical experts.
    """

    layers: int
    experts: int
    slots: int  # per GPU per layer
    world: int
    hidden: int
    inter: int
    tokens: int  # per rank per step
    topk: int

    @property
    def physical(self) -> int:
        return self.slots * self.world

    def bytes_per_expert(self, dtype: torch.dtype) -> int:
        return 3 * self.hidden * self.inter * torch.empty(0, dtype=dtype).element_size()


def expert_tags(phys2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The value every weight of slot ``p`` in layer ``l`` holds when it holds expert
    ``phys2log[l, p]``: ``((l * E + e) % 255 + 1) / 4096``, exact in bf16, fp16 and fp32 and
    distinct between the experts of one layer while ``E <= 255``.

    Args:
        phys2log: ``[L, P]`` integer placement.
    Returns:
        ``[L, P]`` float64.
    """
    layers = torch.arange(phys2log.shape[0], dtype=torch.int64).unsqueeze(1)
    return ((layers * num_experts + phys2log.to(torch.int64)) % 255 + 1).to(torch.float64) / 4096


class StandInMoE:
    """One rank's MoE layers, router and dispatch.

    Args:
        shape: the sizes; rank: this rank in the default process group (the EP group).
        device: where weights and activations live; dtype: weights and activations.
        seed: same on every rank (the popularity); per-rank token randomness is derived from it.
        sigma: lognormal skew of the expert popularity (std of the log popularity).
        drift_steps: the popularity turns by a quarter (from one random ranking to an
            independent one) every ``drift_steps`` steps, smoothly.
    """

    def __init__(self, shape: Shape, rank: int, device: torch.device, dtype: torch.dtype,
                 seed: int, sigma: float, drift_steps: int) -> None:
        if shape.experts > 255:
            raise ValueError("expert tags are distinct only for E <= 255")
        if shape.topk > shape.experts:
            raise ValueError("topk must be <= experts")
        self.shape, self.rank, self.device, self.dtype = shape, rank, device, dtype
        self.seed, self.sigma, self.drift_steps = seed, sigma, drift_steps
        s = shape
        self.w13 = [torch.empty(s.slots, 2 * s.inter, s.hidden, dtype=dtype, device=device)
                    for _ in range(s.layers)]
        self.w2 = [torch.empty(s.slots, s.hidden, s.inter, dtype=dtype, device=device)
                   for _ in range(s.layers)]
        self.weights = [[self.w13[l], self.w2[l]] for l in range(s.layers)]
        gen = torch.Generator().manual_seed(seed)
        # Two independent standard-normal log-popularities; the router rotates from one to the
        # other, so the marginal skew stays lognormal(sigma) while the ranking drifts.
        self._pop_a = torch.randn(s.layers, s.experts, generator=gen).to(device)
        self._pop_b = torch.randn(s.layers, s.experts, generator=gen).to(device)
        xgen = torch.Generator().manual_seed(seed * 1_000_003 + 17 + rank)
        self.x = torch.randn(s.tokens, s.hidden, generator=xgen).to(device=device, dtype=dtype)
        self._gen = torch.Generator(device=device)
        self._layer_offsets = (torch.arange(s.layers, device=device) * s.experts).view(-1, 1, 1)
        self._ones = torch.ones(s.layers * s.tokens * s.topk, dtype=torch.int64, device=device)
        self._row_ids = torch.arange(s.tokens * s.topk, device=device)
        self._token_of_row = self._row_ids // s.topk
        self._local_slot_ids = torch.arange(s.slots, device=device).repeat(s.world)  # [G*S]
        max_replicas = s.physical - s.experts + 1
        self._rep_table = torch.zeros(s.layers, s.experts, max_replicas, dtype=torch.int64,
                                      device=device)
        self._nrep = torch.ones(s.layers, s.experts, dtype=torch.int64, device=device)
        self.phys2log = torch.zeros(s.layers, s.physical, dtype=torch.int64)

    # --- placement and weights -----------------------------------------------------------------

    def reset(self, phys2log: torch.Tensor) -> None:
        """Serve ``phys2log`` ([L, P]) from scratch: fill every local slot with its expert's tag,
        rebuild the routing tables and restart the token random stream (so every mode sees the
        same tokens)."""
        self.phys2log = phys2log.to(torch.int64).clone()
        tags = expert_tags(self.phys2log, self.shape.experts)
        s = self.shape
        for l in range(s.layers):
            for slot in range(s.slots):
                value = float(tags[l, self.rank * s.slots + slot])
                self.w13[l][slot].fill_(value)
                self.w2[l][slot].fill_(value)
        self.set_layers(list(range(s.layers)), self.phys2log)
        self._gen.manual_seed(self.seed * 7919 + 1 + self.rank)

    def set_layers(self, layers: list[int], new: torch.Tensor) -> None:
        """Switch the routing maps of ``layers`` to ``new`` ([L, P]) after their weights moved.
        Copies a small table to the device (a host sync on CUDA: only at a switch)."""
        if not layers:
            return
        s = self.shape
        table = self._rep_table[layers].cpu()
        nrep = self._nrep[layers].cpu()
        for i, l in enumerate(layers):
            self.phys2log[l] = new[l].to(torch.int64)
            row = self.phys2log[l].tolist()
            holders: dict[int, list[int]] = {}
            for p, e in enumerate(row):
                holders.setdefault(e, []).append(p)
            for e in range(s.experts):
                slots = holders[e]
                nrep[i, e] = len(slots)
                table[i, e, :] = slots[0]
                table[i, e, :len(slots)] = torch.tensor(slots)
        idx = torch.tensor(layers, device=self.device)
        self._rep_table.index_copy_(0, idx, table.to(self.device))
        self._nrep.index_copy_(0, idx, nrep.to(self.device))

    def verify(self) -> int:
        """Slots of this rank whose weights are not bit-exactly their expert's tag (every
        element of w13 and w2 is compared). Host-syncing; run after the timed loop."""
        s = self.shape
        tags = expert_tags(self.phys2log, s.experts)
        bad = 0
        for l in range(s.layers):
            for slot in range(s.slots):
                want = float(tags[l, self.rank * s.slots + slot])
                ok = bool((self.w13[l][slot] == want).all()) and bool((self.w2[l][slot] == want).all())
                bad += not ok
        return bad

    # --- the decode step -------------------------------------------------------------------------

    def route(self, step: int) -> torch.Tensor:
        """Top-k logical experts of every token of this rank in every layer at ``step``:
        Gumbel-top-k sampling from softmax(popularity logits), i.e. ``k`` distinct experts
        drawn in proportion to the popularity. Returns ``[L, T, k]`` int64 on the device."""
        s = self.shape
        theta = 0.5 * math.pi * step / self.drift_steps
        logits = self.sigma * (self._pop_a * math.cos(theta) + self._pop_b * math.sin(theta))
        u = torch.rand(s.layers, s.tokens, s.experts, generator=self._gen, device=self.device)
        gumbel = -torch.log(-torch.log(u.clamp_(1e-12, 1.0 - 1e-7)))
        return (logits.unsqueeze(1) + gumbel).topk(s.topk, dim=2).indices

    def count_into(self, counts: torch.Tensor, ids: torch.Tensor) -> None:
        """Add every layer's selections of ``ids`` ([L, T, k]) to ``counts`` ([L, E] int64):
        one kernel, no sync (the benchmark's own bookkeeping)."""
        counts.view(-1).index_add_(0, (ids + self._layer_offsets).reshape(-1), self._ones)

    def layer(self, l: int, ids: torch.Tensor) -> torch.Tensor:
        """Run MoE layer ``l`` for this rank's tokens routed by ``ids`` ([T, k] logical experts):
        dispatch, expert matmuls, combine. Returns the layer output ``[T, H]``."""
        s = self.shape
        flat = ids.reshape(-1)  # [N], N = T * k
        # Logical expert -> physical slot: spread a token's picks over the expert's replicas.
        choice = (self._row_ids + self.rank) % self._nrep[l, flat]
        slot = self._rep_table[l, flat, choice]  # [N] global physical slot
        order = torch.argsort(slot, stable=True)  # grouped by destination rank, then slot
        send_x = self.x.index_select(0, self._token_of_row[order])
        send_counts = torch.zeros(s.physical, dtype=torch.int64, device=self.device)
        send_counts.index_add_(0, slot, self._ones[:flat.numel()])  # [G*S] (bincount syncs on CUDA)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)  # [G*S]: from rank g, for my slot j
        host = torch.cat([send_counts, recv_counts]).tolist()  # the engine's one sync per layer
        send_by_slot, recv_by_slot = host[:s.physical], host[s.physical:]
        send_splits = [sum(send_by_slot[g * s.slots:(g + 1) * s.slots]) for g in range(s.world)]
        recv_splits = [sum(recv_by_slot[g * s.slots:(g + 1) * s.slots]) for g in range(s.world)]
        per_slot = [sum(recv_by_slot[g * s.slots + j] for g in range(s.world))
                    for j in range(s.slots)]
        received = sum(recv_splits)
        recv_x = torch.empty(received, s.hidden, dtype=self.dtype, device=self.device)
        dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits)
        # Rows from each source arrive sorted by local slot: regroup them by slot.
        slot_of_row = torch.repeat_interleave(self._local_slot_ids, recv_counts,
                                              output_size=received)
        perm = torch.argsort(slot_of_row, stable=True)
        xs = recv_x.index_select(0, perm)
        out = torch.empty_like(xs)
        offset = 0
        for j, n in enumerate(per_slot):
            if n:
                h = xs[offset:offset + n] @ self.w13[l][j].t()  # [n, 2I]
                act = F.silu(h[:, :s.inter]) * h[:, s.inter:]
                out[offset:offset + n] = act @ self.w2[l][j].t()  # [n, H]
                offset += n
        back = torch.empty_like(out)
        back[perm] = out
        returned = torch.empty(flat.numel(), s.hidden, dtype=self.dtype, device=self.device)
        dist.all_to_all_single(returned, back, send_splits, recv_splits)
        y = torch.zeros(s.tokens, s.hidden, dtype=self.dtype, device=self.device)
        y.index_add_(0, self._token_of_row[order], returned)
        return y
