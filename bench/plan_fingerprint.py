"""SHA-256 of every plan the planner makes on the planner benchmark's inputs, and of the copy
plan between successive plans: run it before and after a change that must not change behaviour,
and diff the two outputs.

Inputs: bench/planner.py's shapes (58 layers, 256 experts in 288 slots, 8 groups; 32 / 72 / 144
GPUs over 4 / 9 / 18 nodes), its three loads and two drift models, for two seeds each; every
policy plans the base load from the default placement, then the drift windows (``stable`` from
its own last plan, as in the benchmark). Then small shapes with integer loads (many ties, idle
experts) from random current placements. Each line is ``name sha256``; a plan line hashes the
plan ``[L, P]`` and the :class:`~eplb.placement.planner.PlanResult` fields (balancedness before
and after, slots moved, skip reason), a copy line the transfers and local copies of
:func:`~eplb.placement.copy_plan.plan_copies` for the switch to that plan.

    .venv/bin/python bench/plan_fingerprint.py > /tmp/fingerprint.txt
    .venv/bin/python bench/plan_fingerprint.py --windows 2 --seeds 1   # quicker
"""

from __future__ import annotations

import argparse
import hashlib

import torch

from eplb.demo.workload import drift_windows, noise_windows, planner_load, random_placement
from eplb.placement.copy_plan import changed_layers, plan_copies
from eplb.placement.planner import POLICIES, PlannerSpec, plan_rebalance
from eplb.placement.rules import default_placement

L, E, P, GROUPS = 58, 256, 288, 8
SIZES = ((32, 4), (72, 9), (144, 18))
KINDS = ("lognormal=0.5", "lognormal=1.0", "zipf=1.1")


def tensor_sha(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype} {list(t.shape)}".encode())
    digest.update(repr(t.flatten().tolist()).encode())
    return digest.hexdigest()


def plan_line(name: str, load: torch.Tensor, current: torch.Tensor, gpus: int,
              spec: PlannerSpec) -> tuple[str, torch.Tensor]:
    """One plan and its fingerprint line."""
    result = plan_rebalance(load, current, gpus, min_gain=0.0, force=True, spec=spec)
    digest = hashlib.sha256(tensor_sha(result.phys2log).encode())
    digest.update(repr((result.balancedness_before, result.balancedness_after,
                        result.experts_moved, result.skip_reason)).encode())
    return f"{name} plan {digest.hexdigest()}", result.phys2log


def copy_line(name: str, old: torch.Tensor, new: torch.Tensor, gpus: int, ranks_per_node: int) -> str:
    """The copy plan of the switch from ``old`` to ``new`` and its fingerprint line."""
    plans = plan_copies(old, new, changed_layers(old, new), gpus, ranks_per_node)
    digest = hashlib.sha256()
    for plan in plans:
        digest.update(repr((plan.layer, plan.recvs, plan.local_copies)).encode())
    return f"{name} copy {digest.hexdigest()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4, help="drift windows per load")
    p.add_argument("--seeds", type=int, default=2, help="seeds per shape and load (bench's seed first)")
    args = p.parse_args()
    torch.set_num_threads(1)
    count = 0
    for gpus, nodes in SIZES:
        for kind in KINDS:
            for s in range(args.seeds):
                seed = gpus + 1000 * s
                base = planner_load(kind, L, E, seed)
                for model in ("pairs", "noise"):
                    windows = (drift_windows(base, args.windows, seed=seed + 1) if model == "pairs"
                               else noise_windows(base, args.windows, seed=seed + 1, sigma=0.1))
                    for policy in POLICIES:
                        spec = PlannerSpec(policy, GROUPS, nodes)
                        current = default_placement(L, E, P)
                        for w, load in enumerate([base] + windows):
                            name = f"G={gpus} {kind} seed={seed} {model} {policy} w={w}"
                            line, plan = plan_line(name, load, current, gpus, spec)
                            print(line)
                            print(copy_line(name, current, plan, gpus, gpus // nodes))
                            count += 1
                            current = plan
    # small shapes, integer loads: ties and idle experts; a cap on moves for stable
    for layers, experts, physical, gpus, nodes in ((4, 12, 16, 4, 2), (3, 8, 8, 4, 1), (5, 20, 30, 6, 3),
                                                   (2, 16, 48, 8, 2)):
        for seed in range(6):
            gen = torch.Generator().manual_seed(seed)
            load = torch.randint(0, 5, (layers, experts), generator=gen).double()
            current = random_placement(layers, experts, physical, gen)
            for spec in [PlannerSpec(policy, 4 if experts % 4 == 0 else 1, nodes) for policy in POLICIES] \
                    + [PlannerSpec("stable", max_moves=3)]:
                name = f"small L={layers} E={experts} P={physical} G={gpus} seed={seed} {spec.policy} cap={spec.max_moves}"
                line, plan = plan_line(name, load, current, gpus, spec)
                print(line)
                print(copy_line(name, current, plan, gpus, gpus // nodes))
                count += 1
    print(f"plans {count}")


if __name__ == "__main__":
    main()
