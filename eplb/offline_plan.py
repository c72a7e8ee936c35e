"""``eplbctl plan``: plan a placement offline from a load file (no sidecar needed).

Reads expert load as ``[L, E]`` (or ``[steps, L, E]``, summed) from ``.pt``, ``.json`` or ``.npy``,
bare or inside a dict under ``logical_count`` (SGLang's expert-distribution dump); optionally the
current placement ``[L, P]`` (bare or under ``physical_to_logical_map``), which the ``stable``
policy starts from (without it, ``stable`` plans from scratch). Writes the new placement
as ``{"physical_to_logical_map": [L, P]}`` in ``.pt`` or ``.json``, the form SGLang's
``--init-expert-location`` reads, and returns a summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from eplb.coordinator.planner import PlannerSpec, plan_placement
from eplb.placement import InvalidPlacement, overall_balancedness, validate_placement
from eplb.worker_hook.copy_plan import plan_copies


class PlanInputError(ValueError):
    """A file or option of ``eplbctl plan`` is unusable; the message says which and why."""


def _read(path: Path, key: str) -> torch.Tensor:
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            data: Any = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".npy":
            try:
                import numpy
            except ImportError:
                raise PlanInputError(f"{path}: reading .npy needs numpy; pip install numpy, or "
                                     "save the load as .pt or .json") from None
            data = numpy.load(path, allow_pickle=False)
        else:
            raise PlanInputError(f"{path}: unknown format {suffix!r}; use .pt, .json or .npy")
    except PlanInputError:
        raise
    except Exception as exc:
        raise PlanInputError(f"{path}: cannot read: {type(exc).__name__}: {exc}") from None
    if isinstance(data, dict):
        if key not in data:
            raise PlanInputError(f"{path}: a dict without {key!r} (keys: {sorted(map(str, data))[:8]})")
        data = data[key]
    try:
        return torch.as_tensor(data)
    except Exception as exc:
        raise PlanInputError(f"{path}: {key} is not a numeric array: {exc}") from None


def read_load(path: Path) -> torch.Tensor:
    """``[L, E]`` float64 load from ``path`` (``[steps, L, E]`` is summed over steps)."""
    load = _read(path, "logical_count")
    if load.dim() == 3:
        load = load.sum(dim=0)
    if load.dim() != 2 or load.numel() == 0:
        raise PlanInputError(f"{path}: load must be [L, E] or [steps, L, E], got {list(load.shape)}")
    load = load.to(torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise PlanInputError(f"{path}: load holds negative, NaN or infinite values")
    return load


def read_placement(path: Path) -> torch.Tensor:
    p2l = _read(path, "physical_to_logical_map")
    if p2l.is_floating_point() or p2l.dim() != 2:
        raise PlanInputError(f"{path}: placement must be an integer [L, P], got "
                             f"{p2l.dtype} {list(p2l.shape)}")
    return p2l.to(torch.int64)


def write_placement(path: Path, phys2log: torch.Tensor) -> None:
    suffix = path.suffix.lower()
    if suffix == ".pt":
        torch.save({"physical_to_logical_map": phys2log.to(torch.int64)}, path)
    elif suffix == ".json":
        path.write_text(json.dumps({"physical_to_logical_map": phys2log.tolist()}))
    else:
        raise PlanInputError(f"--output {path}: use a .pt or .json file name")


def plan_offline(load_path: Path, num_physical: int, num_gpus: int, spec: PlannerSpec,
                 current_path: Path | None = None, output: Path | None = None,
                 bytes_per_expert: int = 0) -> dict[str, Any]:
    """Plan from files; write ``output`` if given; return the summary (JSON-able)."""
    if output is not None and output.suffix.lower() not in (".pt", ".json"):
        raise PlanInputError(f"--output {output}: use a .pt or .json file name")
    load = read_load(load_path)
    layers, experts = load.shape
    current = None
    if current_path is not None:
        current = read_placement(current_path)
        try:
            validate_placement(current, experts, num_physical, num_gpus, layers)
        except InvalidPlacement as exc:
            raise PlanInputError(f"{current_path}: {exc}") from None
    try:
        started = time.perf_counter()
        phys2log = plan_placement(load, num_physical, num_gpus, spec, current)
        plan_ms = (time.perf_counter() - started) * 1e3
    except (ValueError, InvalidPlacement) as exc:
        raise PlanInputError(f"cannot plan {layers} layers x {experts} experts into "
                             f"{num_physical} slots on {num_gpus} GPUs: {exc}") from None
    summary: dict[str, Any] = {
        "policy": spec.policy, "layers": layers, "experts": experts, "num_physical": num_physical,
        "num_gpus": num_gpus, "plan_ms": round(plan_ms, 3),
        "balancedness_after": overall_balancedness(load, phys2log, num_gpus),
    }
    if current is not None:
        summary["balancedness_before"] = overall_balancedness(load, current, num_gpus)
        summary["slots_changed"] = int((current != phys2log).sum())
        plans = plan_copies(current, phys2log, list(range(layers)), num_gpus, ranks_per_node=1)
        summary["experts_moved"] = sum(len(p.recvs) for p in plans)
        if bytes_per_expert:
            summary["bytes_moved"] = summary["experts_moved"] * bytes_per_expert
    if output is not None:
        write_placement(output, phys2log)
        summary["output"] = str(output)
    return summary
