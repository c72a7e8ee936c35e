"""The demo's synthetic MoE routing: skewed expert popularity whose ranking drifts over time.

Pure functions of (seed, step, rank), so every rank sees the same popularity at the same step and
its own tokens.
"""

from __future__ import annotations

import torch


def popularity(num_layers: int, num_experts: int, step: int, seed: int, sigma: float = 1.0,
               drift_every: int = 400, swaps: int = 2) -> torch.Tensor:
    """Expert popularity at ``step``: lognormal weights whose ranking shifts every
    ``drift_every`` steps (``swaps`` random pairs of experts trade popularity each time).

    Returns:
        ``[L, E]`` float64 probabilities (rows sum to 1).
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(num_layers, num_experts, generator=gen, dtype=torch.float64).mul(sigma).exp()
    phase = step // drift_every
    order = torch.arange(num_experts)
    for p in range(phase):
        g = torch.Generator().manual_seed(seed * 7919 + p)
        for _ in range(swaps):
            i, j = torch.randint(num_experts, (2,), generator=g).tolist()
            order[[i, j]] = order[[j, i]]
    weights = base[:, order]
    return weights / weights.sum(dim=1, keepdim=True)


def route(probs: torch.Tensor, tokens: int, top_k: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """Pick ``top_k`` distinct experts per token for every layer.

    Args:
        probs: ``[L, E]`` popularity.
    Returns:
        ``[L, tokens, top_k]`` int64 expert ids.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + rank)
    layers, experts = probs.shape
    flat = probs.repeat_interleave(tokens, dim=0)  # [L * T, E]
    ids = torch.multinomial(flat.float(), top_k, replacement=False, generator=gen)
    return ids.reshape(layers, tokens, top_k)
