"""An S²FT adapter's tensors against the modules its config adapts, checked in the order PEFT's loader checks them.

For every module the config adapts on the model: both tensors are there (:func:`check_present`), the indices can
address the projection with the count the config gives it (:func:`check_indices`; on fused MoE experts each expert's
channels, :func:`check_expert_channels`), the delta has the projection's shape and finite values
(:func:`check_delta`); then no tensor is left without a module (:func:`stray_error`). Each
consumer says where (PEFT: adapter name and module; vLLM and the converter: folder and module) and where the
geometry comes from (PEFT: the layers it built; vLLM: the served model's config).
"""

from __future__ import annotations

from typing import Optional

import torch

# part of fused MoE experts -> the tensor holding its delta, beside the experts' ``s2ft_indices`` (E, k): down_proj's
# (E, H, k) on the channels' columns, gate/up's (E, k, H) on their rows
EXPERT_DELTAS = {"down_proj": "s2ft_down_delta", "gate_proj": "s2ft_gate_delta", "up_proj": "s2ft_up_delta"}


def check_present(where: str, indices: Optional[torch.Tensor], delta: Optional[torch.Tensor]) -> None:
    if indices is None or delta is None:
        raise missing_error(where, "indices" if indices is None else "delta")


def missing_error(where: str, what: str) -> ValueError:
    return ValueError(f"{where} has no {what}; the adapter was saved for other target modules or is incomplete.")


def check_indices(where: str, indices: torch.Tensor, axis_size: int, unit_size: int = 1,
                  expected_count: Optional[int] = None) -> None:
    """Raise a ValueError naming the problem if ``indices`` cannot address ``expected_count`` rows or columns (whole
    units of ``unit_size``: a head's rows/columns) of an axis of ``axis_size``."""
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"{where}: indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}.")
    if expected_count is not None and indices.numel() != expected_count:
        raise ValueError(
            f"{where}: {indices.numel()} indices but the config gives this layer {expected_count}; the adapter was "
            "trained with another head/channel count or on another model."
        )
    _check_range(where, indices, axis_size)
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError(f"{where}: indices contain duplicates.")
    if unit_size > 1:
        units = indices.view(-1, unit_size) if indices.numel() % unit_size == 0 else None
        offsets = torch.arange(unit_size, device=indices.device)
        if (
            units is None
            or bool((units[:, 0] % unit_size).any())
            or not torch.equal(units - units[:, :1], offsets.expand_as(units))
        ):
            raise ValueError(f"{where}: indices must cover whole heads of {unit_size} rows/columns.")


def check_expert_channels(where: str, indices: torch.Tensor, experts: int, channels: int,
                          expected_count: Optional[int] = None) -> None:
    """Raise a ValueError naming the problem if ``indices`` cannot name ``expected_count`` channels of each of
    ``experts`` fused experts with ``channels`` channels each: (experts, k), each expert's own channels."""
    if indices.dim() != 2 or indices.shape[0] != experts or indices.dtype.is_floating_point \
            or indices.dtype == torch.bool:
        raise ValueError(f"{where}: indices must be an integer tensor of shape ({experts}, k), got {indices.dtype} "
                         f"{tuple(indices.shape)}.")
    if expected_count is not None and indices.shape[1] != expected_count:
        raise ValueError(
            f"{where}: {indices.shape[1]} channels per expert but the config gives {expected_count}; the adapter was "
            "trained with another channel count or on another model."
        )
    _check_range(where, indices, channels)
    if indices.numel() and bool((torch.sort(indices, dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError(f"{where}: indices repeat a channel within an expert.")


def _check_range(where: str, indices: torch.Tensor, size: int) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"{where}: indices must lie in [0, {size}), got [{int(indices.min())}, "
                         f"{int(indices.max())}].")


def check_delta(where: str, delta: torch.Tensor, shape: tuple, what: str = "delta") -> None:
    if tuple(delta.shape) != tuple(shape):
        raise ValueError(f"{where} has a {what} of shape {tuple(delta.shape)} but this base model needs "
                         f"{tuple(shape)}.")
    # NaN propagates to both ends of the range: one reduction instead of a mask as large as the delta (6x faster)
    if delta.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(delta))).all()):
        raise ValueError(f"{where} has a {what} holding NaN or infinite values; it was not loaded.")


def stray_error(adapter: str, key: str) -> ValueError:
    """The error for a tensor ``key`` of ``adapter`` that belongs to no module the config adapts on this model."""
    return ValueError(
        f"{adapter} holds '{key}', which has no place in this model: the adapter was trained on a model with other "
        "layers or projections, or its config does not name all its target modules."
    )
