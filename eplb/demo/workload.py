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


def planner_load(kind: str, num_layers: int, num_experts: int, seed: int) -> torch.Tensor:
    """A window's expert load of the kind the planner benchmark uses.

    Args:
        kind: ``"lognormal=SIGMA"`` (load ``exp(N(0, SIGMA^2)) * 1000`` per expert) or
            ``"zipf=S"`` (load ``1e6 / rank^S`` over a random ranking of the experts per layer).
    Returns:
        ``[L, E]`` float64 loads.
    """
    name, _, value = kind.partition("=")
    gen = torch.Generator().manual_seed(seed)
    if name == "lognormal":
        noise = torch.randn(num_layers, num_experts, generator=gen, dtype=torch.float64)
        return (noise * float(value)).exp() * 1000
    if name == "zipf":
        ranks = torch.stack([torch.randperm(num_experts, generator=gen)
                             for _ in range(num_layers)]) + 1
        return 1e6 / ranks.double() ** float(value)
    raise ValueError(f"unknown load kind {kind!r}: use lognormal=SIGMA or zipf=S")


def drift_windows(base: torch.Tensor, windows: int, seed: int, swaps: int = 4) -> list[torch.Tensor]:
    """``windows`` successive loads ``[L, E]``: each swaps the loads of ``swaps`` random pairs of
    experts in every layer of the one before (a ranking that shifts a little each window)."""
    gen = torch.Generator().manual_seed(seed)
    out, load = [], base.clone()
    for _ in range(windows):
        for _ in range(swaps):
            i, j = torch.randint(base.shape[1], (2,), generator=gen).tolist()
            load[:, [i, j]] = load[:, [j, i]]
        out.append(load.clone())
    return out


def noise_windows(base: torch.Tensor, windows: int, seed: int, sigma: float = 0.1) -> list[torch.Tensor]:
    """``windows`` successive loads ``[L, E]``: each multiplies every load of the one before by
    ``exp(N(0, sigma^2))``, drawn per layer and expert (a random walk: the ranking shifts a
    little each window, mostly among experts of similar load, as sampling noise and slow trends
    move it)."""
    gen = torch.Generator().manual_seed(seed)
    out, load = [], base.clone()
    for _ in range(windows):
        step = torch.randn(load.shape, generator=gen, dtype=torch.float64).mul_(sigma).exp_()
        load = load * step.to(load.dtype)
        out.append(load.clone())
    return out


def random_placement(layers: int, experts: int, physical: int, gen: torch.Generator) -> torch.Tensor:
    """A valid placement to plan from (the planner's tests and bench/plan_fingerprint.py): every
    expert once, the other ``P - E`` slots random experts, each layer shuffled.

    Returns:
        ``[L, P]`` int64.
    """
    rows = []
    for _ in range(layers):
        row = torch.cat([torch.arange(experts), torch.randint(experts, (physical - experts,), generator=gen)])
        rows.append(row[torch.randperm(physical, generator=gen)])
    return torch.stack(rows)
