"""The ``deepseek`` placement policy: DeepSeek's published EPLB algorithm, written anew as pure,
layer-vectorized tensor functions (replica counts by the rule every policy shares,
:func:`~eplb.placement.policy.replicate.replicate_heaviest`: DeepSeek's ``replicate_experts``).

Hierarchical form (``num_nodes`` divides ``num_groups``): pack expert groups onto nodes, replicate
the heaviest experts within each node, then pack the replicas onto the node's GPUs. With one node
(or groups that do not divide among nodes) the same steps run as the global form.

Every greedy loop runs over item positions with all rows (layers, or layers x nodes) at once, so the
cost grows with the number of items, not with the number of layers.
"""

from __future__ import annotations

import torch

from eplb.placement.policy.replicate import replicate_heaviest


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each, heaviest
    item first, each to the lightest pack that still has room (lowest index on ties).

    Args:
        weight: ``[X, n]`` item weights, one packing problem per row.
        num_packs: packs per row; must divide ``n``.
    Returns:
        pack_index ``[X, n]`` (pack of each item) and rank_in_pack ``[X, n]`` (its position in the
        pack, in order of assignment), both int64.
    """
    rows, items = weight.shape
    if items % num_packs:
        raise ValueError(f"{items} items do not divide into {num_packs} packs")
    per_pack = items // num_packs
    if per_pack == 1:
        index = torch.arange(items, dtype=torch.int64).expand(rows, items).clone()
        return index, torch.zeros(rows, items, dtype=torch.int64)
    order = weight.float().sort(dim=-1, descending=True).indices  # [X, n]
    weight = weight.float()
    row = torch.arange(rows)
    load = torch.zeros(rows, num_packs)
    count = torch.zeros(rows, num_packs, dtype=torch.int64)
    pack_index = torch.empty(rows, items, dtype=torch.int64)
    rank_in_pack = torch.empty(rows, items, dtype=torch.int64)
    for k in range(items):
        item = order[:, k]  # [X]
        candidates = torch.where(count < per_pack, load, torch.full_like(load, float("inf")))
        pack = candidates.argmin(dim=-1)  # first minimum: the lowest pack index on ties
        pack_index[row, item] = pack
        rank_in_pack[row, item] = count[row, pack]
        load[row, pack] += weight[row, item]
        count[row, pack] += 1
    return pack_index, rank_in_pack


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of each row's permutation. ``perm: [X, n]`` -> ``[X, n]``."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1], dtype=perm.dtype).expand_as(perm).clone())
    return inv


def rebalance_hierarchical(weight: torch.Tensor, num_physical: int, num_groups: int,
                           num_nodes: int, num_gpus: int) -> torch.Tensor:
    """The hierarchical policy.

    Args:
        weight: ``[L, E]`` expert loads.
        num_physical: ``P`` replicas per layer; ``P % num_gpus == 0``.
        num_groups: expert groups (``E % num_groups == 0``, ``num_groups % num_nodes == 0``).
        num_nodes: nodes; ``num_gpus % num_nodes == 0``.
        num_gpus: ``G``.
    Returns:
        phys2log ``[L, P]`` int64: GPU ``g`` holds slots ``[g * P/G, (g + 1) * P/G)``.
    """
    layers, experts = weight.shape
    if experts % num_groups or num_groups % num_nodes or num_gpus % num_nodes \
            or num_physical % num_gpus:
        raise ValueError(f"shapes do not divide: E={experts} groups={num_groups} "
                         f"nodes={num_nodes} gpus={num_gpus} P={num_physical}")
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = experts // num_nodes
    physical_per_node = num_physical // num_nodes
    weight = weight.float()

    # 1. Groups to nodes. "mlog" numbers experts node by node: node n holds mlog
    #    [n * E/nodes, (n + 1) * E/nodes).
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)  # [L, groups]
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    first_mlog = (group_pack * groups_per_node + group_rank) * group_size  # [L, groups]
    log2mlog = (first_mlog.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)  # [L, E]
    mlog2log = _inverse(log2mlog)

    # 2. Replicas within each node (rows: layer x node).
    mlog_load = weight.gather(-1, mlog2log).view(-1, experts_per_node)  # [L*nodes, E/nodes]
    replicas = replicate_heaviest(mlog_load, physical_per_node)
    originals = torch.arange(experts_per_node).expand(mlog_load.shape[0], -1)
    phy2mlog = torch.cat([originals, replicas.extra], dim=1)  # [L*nodes, P/nodes]
    mlog_count = replicas.counts

    # 3. Replicas to the node's GPUs.
    phy_load = (mlog_load / mlog_count).gather(-1, phy2mlog)  # [L*nodes, P/nodes]
    gpu_pack, gpu_rank = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2slot = gpu_pack * (num_physical // num_gpus) + gpu_rank
    slot2mlog = phy2mlog.gather(-1, _inverse(phy2slot))  # [L*nodes, P/nodes]
    node_offset = torch.arange(0, experts, experts_per_node).view(1, -1, 1)
    slot2mlog = (slot2mlog.view(layers, num_nodes, -1) + node_offset).flatten(-2)  # [L, P]
    return mlog2log.gather(-1, slot2mlog)


def rebalance_deepseek(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                       num_gpus: int) -> torch.Tensor:
    """DeepSeek's policy: hierarchical when the groups divide among the nodes, else global (the
    same steps with one node and one group).

    Args:
        weight: ``[L, E]``; num_physical: ``P``; num_groups, num_nodes, num_gpus as above.
    Returns:
        phys2log ``[L, P]`` int64.
    """
    if num_groups % num_nodes == 0 and weight.shape[1] % num_groups == 0:
        return rebalance_hierarchical(weight, num_physical, num_groups, num_nodes, num_gpus)
    return rebalance_hierarchical(weight, num_physical, 1, 1, num_gpus)
