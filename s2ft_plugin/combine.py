"""Adapter fusion: combining S2FT adapters into one (``add_weighted_adapter``, as PEFT users know it from LoRA).

S2FT deltas are dense blocks over a few rows or columns of each weight, so a weighted sum of adapters is exact: the
combined adapter covers, per module, the union ``U`` of its sources' rows/columns, and its delta on ``U`` is the sum
of the weighted source deltas placed at their rows/columns. Different adapters select different units, so the number
of units varies from module to module; the combined adapter's config names its modules exactly (``target_modules``)
and records each one's count (``unit_pattern``), so saving and loading rebuild the same layers.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Real

import torch

from .structure import ROLES


def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "linear") -> None:
    """Add ``adapter_name`` = sum of ``weights[i]`` x adapter ``adapters[i]`` (S2FT's adapter fusion)."""
    from .model import _check_adapter_name

    if combination_type != "linear":
        raise ValueError(
            f"S2FT adapters combine exactly by addition (combination_type='linear'); {combination_type!r} is a "
            "low-rank approximation or pruning scheme for LoRA factors and does not apply."
        )
    _check_sources(tuner, adapters, weights)
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named '{adapter_name}' already exists.")
    _check_adapter_name(adapter_name)
    combined = _combined_modules(tuner, adapters, weights)
    config = replace(
        tuner.peft_config[adapters[0]],
        target_modules=sorted(combined),
        unit_pattern={path: units for path, (_, _, units) in combined.items()},
        exclude_modules=None, layers_to_transform=None, layers_pattern=None,
        selection="random",  # the units are given, not selected
    )
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        layers = {path: layer for path, _, layer in tuner.s2ft_layers()}
        with torch.no_grad():
            for path, (indices, delta, _) in combined.items():
                layer = layers[path]
                layer.s2ft_indices[adapter_name] = indices.to(layer.s2ft_indices[adapter_name].device)
                layer.s2ft_delta[adapter_name].copy_(delta)
        tuner.arrange()
    except BaseException:
        if adapter_name in tuner.peft_config:
            tuner.delete_adapter(adapter_name)
        raise


def _check_sources(tuner, adapters, weights) -> None:
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"add_weighted_adapter needs a non-empty list of adapter names, got {adapters!r}.")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter needs one weight per adapter: {adapters!r} and {weights!r}.")
    for weight in weights:
        if not isinstance(weight, Real) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ValueError(f"add_weighted_adapter weights must be finite numbers, got {weight!r}.")
    for name in adapters:
        if name not in tuner.peft_config:
            raise ValueError(f"Adapter {name} does not exist")
        experts = _experts_of(tuner, name)
        if experts is not None:
            raise ValueError(
                f"Cannot combine adapter '{name}': it adapts the MoE experts at '{experts}', and S2FT does not combine "
                "expert deltas (each expert's channel union would differ in size); merge the adapters instead."
            )
        if name in tuner.s2ft_uncalibrated:
            raise ValueError(
                f"S2FT adapter '{name}' has a score-based selection that has not been computed; call "
                "s2ft_plugin.initialize_s2ft_selection first."
            )
        if tuner.peft_config[name].modules_to_save:
            raise ValueError(
                f"Cannot combine adapter '{name}': it has modules_to_save, whose full weights do not add like S2FT "
                "deltas."
            )


def _experts_of(tuner, adapter_name: str):
    """Path of the first MoE experts layer ``adapter_name`` adapts, or None."""
    from .moe import Experts

    return next((path for path, module in tuner.model.named_modules()
                 if isinstance(module, Experts) and adapter_name in module.s2ft_indices), None)


def _combined_modules(tuner, adapters, weights) -> dict:
    """{module path: (union indices, combined delta over them, units)} of every module a source adapts."""
    combined = {}
    for path, block, layer in tuner.s2ft_layers():
        sources = [(layer.s2ft_indices[name], layer.s2ft_delta[name].detach(), weight)
                   for name, weight in zip(adapters, weights) if name in layer.s2ft_delta]
        if not sources:
            continue
        union = torch.unique(torch.cat([indices for indices, _, _ in sources]))  # sorted
        union, units = _fitting_units(block, block.role(path), union, layer.unit_size)
        dtype = sources[0][1].dtype
        for _, delta, _ in sources:
            dtype = torch.promote_types(dtype, delta.dtype)
        delta_sum = torch.zeros(layer.delta_shape(union.numel()), dtype=dtype, device=sources[0][1].device)
        dim = 0 if layer.side == "output" else 1
        for indices, delta, weight in sources:
            where = torch.searchsorted(union, indices).to(delta_sum.device)
            delta_sum.index_add_(dim, where, delta.to(dtype), alpha=weight)
        combined[path] = (union, delta_sum, units)
    return combined


def _fitting_units(block, role: str, union: torch.Tensor, unit_size: int) -> tuple[torch.Tensor, int]:
    """(rows/columns, unit count for ``unit_pattern``) of a combined module: a layer rebuilt from the count has
    exactly as many rows/columns as the returned ones.

    A fused projection (q|k|v, gate|up) is counted in query heads or channels, which its first section names. The
    selection of ``c`` query heads spans ``ceil(c / group_size)`` key/value groups, so where the union spreads its
    heads over more groups, its fused rows are widened to every head of those groups (the added rows get zero deltas).
    """
    if ROLES[role][2] != "fused":
        return union, union.numel() // unit_size
    units = block.units_from_elements(role, union)
    groups = torch.unique(units // block.group_size)
    if groups.numel() != -(-units.numel() // block.group_size):
        units = (groups[:, None] * block.group_size + torch.arange(block.group_size)).flatten()
        union = torch.sort(block.elements(role, units)).values
    return union, units.numel()
