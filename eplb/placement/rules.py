"""The rules a placement obeys: validation, the default placement, a fingerprint.

A placement is ``phys2log: [L, P]`` (integer): physical slot ``p`` of layer ``l`` holds logical
expert ``phys2log[l, p]``. With ``G`` GPUs (the EP size), rank ``r`` owns slots
``[r * P / G, (r + 1) * P / G)``. Every logical expert ``0 <= e < E`` appears at least once in
every layer (DESIGN.md §3, invariant I5). Loads and balancedness are in :mod:`eplb.placement.load`.
"""

from __future__ import annotations

import hashlib

import torch


class InvalidPlacement(ValueError):
    """A placement breaks a rule of DESIGN.md §3; the message names the rule and where."""


def validate_placement(phys2log: torch.Tensor, num_experts: int, num_physical: int, num_gpus: int,
                       num_layers: int | None = None) -> None:
    """Raise :class:`InvalidPlacement` unless ``phys2log`` is a usable placement (invariant I5).

    Args:
        phys2log: ``[L, P]`` integer tensor.
        num_experts: ``E``, logical experts per layer.
        num_physical: ``P``, physical slots per layer; ``P >= E`` and ``P % num_gpus == 0``.
        num_gpus: ``G``, the EP size.
        num_layers: ``L`` if the caller knows it; checked when given.
    """
    if num_gpus <= 0:
        raise InvalidPlacement(f"num_gpus must be positive, got {num_gpus}")
    if num_physical % num_gpus != 0:
        raise InvalidPlacement(
            f"num_physical={num_physical} is not divisible by num_gpus={num_gpus}")
    if num_physical < num_experts:
        raise InvalidPlacement(
            f"num_physical={num_physical} is smaller than num_experts={num_experts}")
    if phys2log.dtype not in (torch.int32, torch.int64, torch.int16):
        raise InvalidPlacement(f"phys2log must be an integer tensor, got {phys2log.dtype}")
    if phys2log.dim() != 2:
        raise InvalidPlacement(f"phys2log must be [L, P], got shape {list(phys2log.shape)}")
    layers, slots = phys2log.shape
    if num_layers is not None and layers != num_layers:
        raise InvalidPlacement(f"phys2log has {layers} layers, expected {num_layers}")
    if slots != num_physical:
        raise InvalidPlacement(f"phys2log has {slots} slots per layer, expected {num_physical}")
    if layers == 0:
        raise InvalidPlacement("phys2log has no layers")
    low, high = int(phys2log.min()), int(phys2log.max())
    if low < 0 or high >= num_experts:
        raise InvalidPlacement(
            f"phys2log values must lie in [0, {num_experts}), found range [{low}, {high}]")
    present = torch.zeros(layers, num_experts, dtype=torch.bool)
    present.scatter_(1, phys2log.long(), True)
    if not bool(present.all()):
        layer = int((~present).any(dim=1).nonzero()[0])
        missing = (~present[layer]).nonzero().flatten().tolist()
        raise InvalidPlacement(f"layer {layer} has no slot for logical experts {missing[:8]}"
                               + (" …" if len(missing) > 8 else ""))


def default_placement(num_layers: int, num_experts: int, num_physical: int) -> torch.Tensor:
    """The placement an engine starts with: experts in order, redundant slots cycling from 0.

    Returns:
        phys2log: ``[L, P]`` int64 with ``phys2log[l, p] = p % E``.
    """
    return (torch.arange(num_physical, dtype=torch.int64) % num_experts).repeat(num_layers, 1)


def placement_hash(phys2log: torch.Tensor) -> str:
    """A short fingerprint of a placement (shape and values), equal on every process."""
    flat = phys2log.to(torch.int64).contiguous()
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(list(flat.shape)).encode())
    digest.update(tensor_bytes(flat))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor, without needing numpy."""
    import ctypes

    t = tensor.detach().cpu().contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
