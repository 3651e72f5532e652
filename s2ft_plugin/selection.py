"""Choosing which heads or channels of a block S²FT trains."""

from __future__ import annotations

import zlib

import torch

from .structure import ROLES, Block


def random_scores(block: Block, seed: int) -> torch.Tensor:
    """Seeded per block name, so the draw does not depend on the order in which blocks are visited."""
    return seeded_scores(block.name, block.num_units, seed)


def seeded_scores(name: str, count: int, seed: int) -> torch.Tensor:
    """``count`` uniform scores drawn from ``seed`` and ``name`` alone."""
    generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    return torch.rand(count, generator=generator)


def selection_count(config, block: Block, role: str, module_key: str) -> int:
    """How many of the block's units (query heads or channels) to select so that ``role``'s projection covers the count
    its config gives it: the block's count, or the ``unit_pattern`` entry of ``module_key`` (key/value heads for
    k/v_proj, selected as whole groups)."""
    count = config.pattern_units(module_key)
    if count is None:
        return config.unit_count(block.kind, block.num_units)
    axis = ROLES[role][2]
    if count > block.axis_units(axis):
        raise ValueError(
            f"S2FTConfig.unit_pattern gives '{module_key}' {count} units but it has only {block.axis_units(axis)}."
        )
    return count * block.group_size if axis == "key_value" else count


def select_units(block: Block, count: int, scores: torch.Tensor, order: str = "large") -> torch.Tensor:
    """The ``count`` best units of ``block`` by ``scores`` (highest for ``large``, lowest for ``small``), sorted.

    With grouped-query attention a query head shares its key/value head with its group, so heads are taken group by
    group: ``count // group_size`` whole groups with the best total scores, then the best heads of the group whose best
    ``count % group_size`` heads score highest. The selection then touches as few key/value heads as possible and
    co-permutes into one contiguous run.
    """
    scores = scores.float() if order == "large" else -scores.float()
    group = block.group_size
    per_group = scores.view(-1, group)
    full, remainder = divmod(count, group)
    chosen_groups = torch.topk(per_group.sum(1), full).indices if full else torch.empty(0, dtype=torch.long)
    heads = [(chosen_groups[:, None] * group + torch.arange(group)).flatten()]
    if remainder:
        rest = torch.ones(per_group.shape[0], dtype=torch.bool)
        rest[chosen_groups] = False
        candidates = torch.nonzero(rest).flatten()
        best_in_group = torch.topk(per_group[candidates], remainder, dim=1)
        pick = torch.argmax(best_in_group.values.sum(1))
        heads.append(candidates[pick] * group + best_in_group.indices[pick])
    return torch.sort(torch.cat(heads)).values
