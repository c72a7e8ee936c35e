"""``eplbctl plan``: plan a placement offline from a load file (no sidecar needed).

Inputs (``--load``, one or more files, or a directory of SGLang dumps):

* expert load ``[L, E]`` (or ``[steps, L, E]``, summed) in ``.pt``, ``.json`` or ``.npy``, bare or
  in a dict under ``logical_count``: SGLang's ``stat`` dump (``_StatAccumulator.dump``) is such a
  dict, ``logical_count: [buffer_steps, L, E]``;
* SGLang's ``per_pass``/``per_token`` dump (``_DetailAccumulator.dump``, one
  ``expert_distribution_recorder_<time>_<rank>.pt`` per rank): a dict with ``records``, a list of
  one dict per forward pass holding ``global_physical_count: [L, P]``, and
  ``last_physical_to_logical_map: [L, P]``, the placement served when the dump was written. Counts
  are summed over records (and files) and mapped to logical experts with that map.

``L`` counts every decoder layer, dense ones included. A layer is MoE when some token was routed
in it (its load row is not all zero) unless ``--moe-layers`` names them; only MoE layers are
planned and only they enter the balancedness figures. The written placement keeps all ``L``
layers (the shape SGLang's ``--init-expert-location`` reads): dense layers keep the current row.

Optionally the current placement ``[L, P]`` (``--current``, bare or under
``physical_to_logical_map``; an SGLang per-pass dump supplies its own), which the ``stable`` policy
starts from (without one, ``stable`` plans from scratch). Writes ``{"physical_to_logical_map":
[L, P]}`` in ``.pt`` or ``.json`` and returns a summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from eplb.placement.planner import PlannerSpec, plan_placement
from eplb.placement.load import overall_balancedness
from eplb.placement.rules import InvalidPlacement, default_placement, validate_placement
from eplb.placement.copy_plan import plan_copies

#: what ``--load`` accepts, quoted in every error about an input file
LOAD_FORMATS = ("expected a .pt, .json or .npy file holding expert load [L, E] or [steps, L, E] "
                "(bare, or in a dict under 'logical_count' as SGLang's stat dump), or an SGLang "
                "per-pass dump (.pt: a dict with 'records', each with 'global_physical_count' "
                "[L, P], and 'last_physical_to_logical_map' [L, P]), or a directory of those dumps")
PLACEMENT_FORMATS = ("expected a .pt or .json file holding an integer [L, P] placement, bare or "
                     "in a dict under 'physical_to_logical_map'")
#: file names SGLang's recorder gives its dumps (``_dump_to_file``), looked for in a directory
DUMP_GLOB = "expert_distribution_recorder_*.pt"


class PlanInputError(ValueError):
    """A file or option of ``eplbctl plan`` is unusable; the message says which and why."""


@dataclass
class LoadInput:
    """What ``--load`` held.

    Attributes:
        load: ``[L, E]`` float64 routed-token counts per logical expert, all layers.
        placement: ``[L, P]`` int64 map the dump was recorded under (per-pass dumps), else None.
        passes: forward passes recorded (per-pass dumps), else 0.
        files: how many files were read.
    """

    load: torch.Tensor
    placement: torch.Tensor | None
    passes: int = 0
    files: int = 1

    def describe(self) -> str:
        """What ``--load`` held, in words, for the summary."""
        if self.placement is None:
            return "load" if self.files == 1 else f"load, summed over {self.files} files"
        return f"SGLang per-pass dump: {self.passes} passes in {self.files} file(s)"


# ------------------------------------------------------------------------------------ reading


def _read_raw(path: Path, expected: str) -> Any:
    """The object stored in ``path`` (.pt, .json or .npy); any failure names ``expected``."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise PlanInputError(f"{path}: no such file; {expected}")
    if suffix not in (".pt", ".json", ".npy"):
        raise PlanInputError(f"{path}: unknown format {suffix!r}; {expected}")
    try:
        if suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True)
        if suffix == ".json":
            return json.loads(path.read_text())
        try:
            import numpy
        except ImportError:
            raise PlanInputError(f"{path}: reading .npy needs numpy; pip install numpy, or "
                                 "save the load as .pt or .json") from None
        return numpy.load(path, allow_pickle=False)
    except PlanInputError:
        raise
    except Exception as exc:
        raise PlanInputError(f"{path}: cannot read ({type(exc).__name__}: {exc}); "
                             f"{expected}") from None


def _tensor(path: Path, data: Any, key: str, expected: str) -> torch.Tensor:
    """``data`` (or ``data[key]`` when a dict) as a tensor."""
    if isinstance(data, dict):
        if key not in data:
            raise PlanInputError(f"{path}: a dict without {key!r} (keys: "
                                 f"{sorted(map(str, data))[:8]}); {expected}")
        data = data[key]
    try:
        return torch.as_tensor(data)
    except Exception as exc:
        raise PlanInputError(f"{path}: {key} is not a numeric array ({exc}); {expected}") from None


def _checked_load(path: Path, load: torch.Tensor) -> torch.Tensor:
    """``load`` as ``[L, E]`` float64 (``[steps, L, E]`` summed), finite and non-negative."""
    if load.dim() == 3:
        load = load.sum(dim=0)
    if load.dim() != 2 or load.numel() == 0 or load.dtype == torch.bool:
        raise PlanInputError(f"{path}: load must be [L, E] or [steps, L, E], got "
                             f"{list(load.shape)}; {LOAD_FORMATS}")
    load = load.to(torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise PlanInputError(f"{path}: load holds negative, NaN or infinite values")
    return load


def is_sglang_pass_dump(data: Any) -> bool:
    """Whether ``data`` is what SGLang's ``per_pass``/``per_token`` recorder mode saves."""
    return isinstance(data, dict) and "records" in data


def logical_load_from_pass_dump(path: Path, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical load of an SGLang per-pass dump.

    Args:
        path: the file, for messages.
        data: ``{"records": [{"global_physical_count": [L, P], ...}, ...],
            "last_physical_to_logical_map": [L, P]}``.
    Returns:
        ``(load [L, E] float64, placement [L, P] int64)``; ``E`` is the map's largest id + 1.
    """
    fmt = LOAD_FORMATS
    if "last_physical_to_logical_map" not in data:
        raise PlanInputError(f"{path}: an SGLang dump without 'last_physical_to_logical_map'; "
                             f"{fmt}")
    placement = _tensor(path, data, "last_physical_to_logical_map", fmt)
    if placement.dim() != 2 or placement.is_floating_point() or placement.numel() == 0:
        raise PlanInputError(f"{path}: last_physical_to_logical_map must be an integer [L, P], "
                             f"got {placement.dtype} {list(placement.shape)}")
    placement = placement.to(torch.int64)
    if int(placement.min()) < 0:
        raise PlanInputError(f"{path}: last_physical_to_logical_map holds negative expert ids")
    records = data["records"]
    if not isinstance(records, (list, tuple)) or not records:
        raise PlanInputError(f"{path}: 'records' is empty: the recorder dumped no forward pass "
                             "(start recording, serve some requests, then dump)")
    physical = torch.zeros(placement.shape, dtype=torch.float64)
    for index, record in enumerate(records):
        count = _tensor(path, record, "global_physical_count", fmt)
        if tuple(count.shape) != tuple(placement.shape):
            raise PlanInputError(f"{path}: record {index} global_physical_count is "
                                 f"{list(count.shape)}, the map is {list(placement.shape)}")
        physical += count.to(torch.float64)
    load = torch.zeros(placement.shape[0], int(placement.max()) + 1, dtype=torch.float64)
    load.scatter_add_(1, placement, physical)
    return _checked_load(path, load), placement


def _expand(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each directory replaced by the SGLang dumps in it (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob(DUMP_GLOB))
            if not found:
                raise PlanInputError(f"{path}: a directory without {DUMP_GLOB} files; "
                                     f"{LOAD_FORMATS}")
            files.extend(found)
        else:
            files.append(path)
    return files


def _read_one(path: Path) -> LoadInput:
    data = _read_raw(path, LOAD_FORMATS)
    if is_sglang_pass_dump(data):
        load, placement = logical_load_from_pass_dump(path, data)
        return LoadInput(load, placement, len(data["records"]))
    return LoadInput(_checked_load(path, _tensor(path, data, "logical_count", LOAD_FORMATS)), None)


def read_load_input(paths: Path | Sequence[Path]) -> LoadInput:
    """Read and sum every ``--load`` file (SGLang writes one per-pass dump per rank).

    Returns:
        the summed ``[L, E]`` load, and the dumps' placement when they carry one (all the same).
    """
    files = _expand([paths] if isinstance(paths, Path) else list(paths))
    if not files:
        raise PlanInputError(f"--load names no file; {LOAD_FORMATS}")
    parts = [_read_one(path) for path in files]
    first = parts[0]
    load = first.load.clone()
    for path, part in zip(files[1:], parts[1:]):
        if part.load.shape != load.shape:
            raise PlanInputError(f"{path}: load is {list(part.load.shape)}, {files[0]} has "
                                 f"{list(load.shape)}; every --load file must be of one model")
        if (part.placement is None) != (first.placement is None):
            raise PlanInputError(f"{path} and {files[0]}: one is an SGLang per-pass dump and the "
                                 "other is not; plan from files of one kind")
        if part.placement is not None and not torch.equal(part.placement, first.placement):
            raise PlanInputError(f"{path}: recorded under another placement than {files[0]}; "
                                 "plan from the dumps of one recording")
        load += part.load
    return LoadInput(load, first.placement, sum(part.passes for part in parts), len(files))


def read_load(path: Path) -> torch.Tensor:
    """``[L, E]`` float64 load from ``path``, any format :data:`LOAD_FORMATS` names."""
    return read_load_input(path).load


def read_placement(path: Path) -> torch.Tensor:
    """``[L, P]`` int64 placement from ``path`` (bare, or under ``physical_to_logical_map``)."""
    p2l = _tensor(path, _read_raw(path, PLACEMENT_FORMATS), "physical_to_logical_map",
                  PLACEMENT_FORMATS)
    if p2l.is_floating_point() or p2l.dim() != 2:
        raise PlanInputError(f"{path}: placement must be an integer [L, P], got "
                             f"{p2l.dtype} {list(p2l.shape)}; {PLACEMENT_FORMATS}")
    return p2l.to(torch.int64)


# ------------------------------------------------------------------------------------ layers


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Layer ids of ``spec``: comma-separated ``N`` or ``A:B`` (``A`` to ``B - 1``; open ends ok).

    >>> parse_layers("3:", 6), parse_layers("0,2:4", 6)
    ([3, 4, 5], [0, 2, 3])
    """
    chosen: set[int] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            if ":" in item:
                start, _, end = item.partition(":")
                chosen.update(range(int(start or 0), int(end) if end else num_layers))
            else:
                chosen.add(int(item))
        except ValueError:
            raise PlanInputError(f"--moe-layers {spec!r}: {item!r} is not N or A:B") from None
    outside = sorted(i for i in chosen if not 0 <= i < num_layers)
    if outside or not chosen:
        raise PlanInputError(f"--moe-layers {spec!r}: names no layer or layers {outside} outside "
                             f"0..{num_layers - 1} (the load has {num_layers} layers)")
    return sorted(chosen)


def format_layers(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0:3,5"``, the syntax ``--moe-layers`` reads ("" when empty)."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([layer, layer + 1])
    return ",".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in runs)


def moe_layer_mask(load: torch.Tensor, spec: str | None) -> torch.Tensor:
    """Which layers are MoE: ``[L]`` bool.

    Without ``spec``, the layers with any routed token (a dense layer never routes, so its row is
    all zero in every pass). With ``spec`` (``--moe-layers``), those layers; a layer left out that
    did route tokens is refused, since the figures and the plan would silently ignore it.
    """
    routed = load.sum(dim=1) > 0
    if spec is None:
        if not bool(routed.any()):
            raise PlanInputError("the load is all zero: no layer routed a token, nothing to plan "
                                 "from (record while serving requests)")
        return routed
    mask = torch.zeros_like(routed)
    mask[parse_layers(spec, load.shape[0])] = True
    dropped = (routed & ~mask).nonzero().flatten().tolist()
    if dropped:
        raise PlanInputError(f"--moe-layers {spec!r} leaves out layers {format_layers(dropped)}, "
                             "which routed tokens; name every MoE layer, or omit --moe-layers to "
                             "take the layers that routed tokens")
    return mask


# ------------------------------------------------------------------------------------ planning


def _check_output(output: Path | None) -> None:
    """Refuse a bad ``--output`` before any work."""
    if output is None:
        return
    if output.is_dir():
        raise PlanInputError(f"--output {output}: is a directory; give a file name ending in "
                             ".pt or .json")
    if output.suffix.lower() not in (".pt", ".json"):
        raise PlanInputError(f"--output {output}: use a .pt or .json file name")
    parent = output.parent
    if parent.exists() and not parent.is_dir():
        raise PlanInputError(f"--output {output}: {parent} is a file, not a directory; write "
                             "elsewhere")
    if not parent.is_dir():
        raise PlanInputError(f"--output {output}: directory {parent} does not exist; create it "
                             f"first (mkdir -p {parent}) or write elsewhere")


def write_placement(path: Path, phys2log: torch.Tensor) -> None:
    """Write ``{"physical_to_logical_map": [L, P]}`` as ``.pt`` or ``.json``."""
    _check_output(path)
    try:
        if path.suffix.lower() == ".pt":
            torch.save({"physical_to_logical_map": phys2log.to(torch.int64)}, path)
        else:
            path.write_text(json.dumps({"physical_to_logical_map": phys2log.tolist()}))
    except OSError as exc:
        raise PlanInputError(f"--output {path}: cannot write ({exc.strerror or exc}); check "
                             "the directory's permissions and free space") from None


def _current(input_: LoadInput, current_path: Path | None, num_physical: int | None
             ) -> tuple[torch.Tensor | None, str]:
    """The placement to start from and where it came from: ``--current``, else the dump's map."""
    if current_path is not None:
        return read_placement(current_path), f"--current {current_path}"
    dumped = input_.placement
    if dumped is None:
        return None, "none"
    if num_physical is not None and dumped.shape[1] != num_physical:
        return None, (f"none: the dump's map has {dumped.shape[1]} slots, not "
                      f"--num-physical {num_physical}")
    return dumped, "the dump's last_physical_to_logical_map"


def _balancedness_note(load: torch.Tensor, mask: torch.Tensor) -> str:
    """How the balancedness figures were averaged, for the summary."""
    dense = (~mask).nonzero().flatten().tolist()
    note = f"mean over the {int(mask.sum())} MoE layers only"
    if dense:
        note += f"; {len(dense)} dense layers ({format_layers(dense)}) left out"
    idle = int((mask & (load.sum(dim=1) == 0)).sum())
    if idle:
        note += f"; {idle} of the MoE layers routed nothing and count as 1.0"
    return note


def plan_offline(load_path: Path | Sequence[Path], num_physical: int | None, num_gpus: int,
                 spec: PlannerSpec, current_path: Path | None = None, output: Path | None = None,
                 bytes_per_expert: int = 0, moe_layers: str | None = None) -> dict[str, Any]:
    """Plan from files; write ``output`` if given; return the summary (JSON-able).

    Args:
        load_path: ``--load`` file(s) or directory, see :data:`LOAD_FORMATS`.
        num_physical: ``P``; None: the current placement's (``--current`` or the dump's).
        num_gpus: ``G``. spec: the policy.
        current_path: ``--current``; overrides the placement a per-pass dump carries.
        output: where to write ``{"physical_to_logical_map": [L, P]}``.
        bytes_per_expert: to report bytes moved.
        moe_layers: ``--moe-layers`` spec; None: layers that routed tokens.
    """
    _check_output(output)
    input_ = read_load_input(load_path)
    load = input_.load
    layers, experts = load.shape
    current, current_from = _current(input_, current_path, num_physical)
    if num_physical is None:
        if current is None:
            raise PlanInputError("give --num-physical (slots per layer): the load carries no "
                                 "placement to take it from")
        num_physical = current.shape[1]
    if current is not None:
        try:
            validate_placement(current, experts, num_physical, num_gpus, layers)
        except InvalidPlacement as exc:
            raise PlanInputError(f"current placement ({current_from}): {exc}") from None
    mask = moe_layer_mask(load, moe_layers)
    moe_load = load[mask]
    try:
        started = time.perf_counter()
        moe_plan = plan_placement(moe_load, num_physical, num_gpus, spec,
                                  None if current is None else current[mask])
        plan_ms = (time.perf_counter() - started) * 1e3
    except (ValueError, InvalidPlacement) as exc:
        raise PlanInputError(f"cannot plan {int(mask.sum())} MoE layers x {experts} experts into "
                             f"{num_physical} slots on {num_gpus} GPUs: {exc}") from None
    phys2log = (default_placement(layers, experts, num_physical) if current is None
                else current.clone())
    phys2log[mask] = moe_plan
    summary: dict[str, Any] = {
        "policy": spec.policy, "input": input_.describe(), "layers": layers,
        "moe_layers": format_layers(mask.nonzero().flatten().tolist()),
        "moe_layers_from": "--moe-layers" if moe_layers else "the layers that routed tokens",
        "experts": experts, "num_physical": num_physical, "num_gpus": num_gpus,
        "current": current_from, "plan_ms": round(plan_ms, 3),
        "balancedness_over": _balancedness_note(load, mask),
        "balancedness_after": overall_balancedness(moe_load, moe_plan, num_gpus),
    }
    if current is not None:
        summary["balancedness_before"] = overall_balancedness(moe_load, current[mask], num_gpus)
        summary["slots_changed"] = int((current != phys2log).sum())
        plans = plan_copies(current, phys2log, list(range(layers)), num_gpus, ranks_per_node=1)
        summary["experts_moved"] = sum(len(p.recvs) for p in plans)
        if bytes_per_expert:
            summary["bytes_moved"] = summary["experts_moved"] * bytes_per_expert
    if output is not None:
        write_placement(output, phys2log)
        summary["output"] = str(output)
    return summary
