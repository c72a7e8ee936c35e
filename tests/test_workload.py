"""The planner benchmark's synthetic loads and drift models (eplb.demo.workload)."""

from __future__ import annotations

import torch

from eplb.demo.workload import drift_windows, noise_windows, planner_load


def test_pair_drift_swaps_loads_and_keeps_each_layers_values() -> None:
    base = planner_load("lognormal=1.0", 3, 16, seed=1)
    windows = drift_windows(base, 4, seed=2, swaps=2)
    assert len(windows) == 4
    for window in windows:
        assert torch.equal(window.sort(dim=1).values, base.sort(dim=1).values)
    assert not torch.equal(windows[-1], base)


def test_noise_drift_is_a_seeded_random_walk_of_small_factors() -> None:
    base = planner_load("lognormal=0.5", 4, 256, seed=3)
    windows = noise_windows(base, 5, seed=4, sigma=0.1)
    assert len(windows) == 5
    assert all(torch.equal(a, b) for a, b in zip(windows, noise_windows(base, 5, seed=4, sigma=0.1)))
    before = base
    for window in windows:
        assert window.dtype == base.dtype and bool((window > 0).all())
        step = (window / before).log()
        assert 0.08 < float(step.std()) < 0.12  # sigma 0.1 over 1024 draws
        before = window
    # every expert's load changes, yet the ranking shifts only a little
    assert bool((windows[0] != base).all())
    ranks = base.argsort(dim=1).argsort(dim=1).double()
    moved = windows[0].argsort(dim=1).argsort(dim=1).double() - ranks
    assert float(moved.abs().mean()) < 256 * 0.1
