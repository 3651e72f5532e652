"""vLLM's linear LoRA layers, extended so that each slot holds either a LoRA adapter or an S²FT one.

Each layer gets S²FT buffers of its own when the engine starts, per projection it packs (``qkv_proj``: q, k, v;
``gate_up_proj``: gate, up; ``o_proj``; ``down_proj``): a per-slot index table (slots x k, padded with position 0) and
the deltas (zero where padded), with k from :mod:`vllm_ext.capacity` (the adapters a server starts with, or
``VLLM_S2FT_MAX_K``), independent of ``--max-lora-rank``. Buffers are written in place when an adapter enters a slot
and never reallocated, so CUDA graphs captured at start-up keep reading them.

The loader hands an S²FT module to ``set_lora`` as a LoRA pair whose one-hot factor is replaced by its 1-D integer
``indices`` (no LoRA factor is ever 1-D), already cut to this rank's shard and laid out as the slot holds it
(:meth:`S2FTLayerMixin.s2ft_module`); ``apply`` adds the S²FT slots after vLLM's own base + LoRA computation
(:mod:`vllm_ext.sparse`). Slots holding LoRA adapters keep vLLM's LoRA buffers and kernels, so S²FT, LoRA and base
requests mix in one batch. On CPU (eager), a layer skips the LoRA kernels and the S²FT projections that no slot of the
batch uses; elsewhere everything runs every step, as graph capture needs.

Tensor parallelism: indices are split exactly like the dense weights they address (see :func:`shard_s2ft`); the
fully sharded LoRA layers (``--fully-sharded-loras``) get the same S²FT path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm.lora.layers import (
    MergedColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithShardedLoRA,
    MergedQKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithShardedLoRA,
    RowParallelLinearWithLoRA,
    RowParallelLinearWithShardedLoRA,
)
from vllm.platforms import current_platform

from .adapter import PACKED, SIDES
from .capacity import SETTING, SIZED, engine_setting, max_k_per_projection
from .sparse import (
    add_input_side_grouped,
    add_input_side_punica,
    add_output_side_grouped,
    add_output_side_punica,
    grouped_fits,
)

K_ALIGNMENT = 8  # k of every buffer is a multiple of this, so its rows meet the grouped GEMM's alignment


def is_selector(tensor) -> bool:
    """True for the 1-D integer tensor that stands in for a one-hot LoRA factor."""
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and not tensor.is_floating_point()


def shard_s2ft(indices: torch.Tensor, delta: torch.Tensor, dim: int, start: int, size: int):
    """The part of an S²FT module that a tensor-parallel shard owning ``[start, start + size)`` of the indexed axis
    applies: local indices and the matching slices of ``delta`` along ``dim`` (its k axis). Empty when none fall in.
    """
    keep = (indices >= start) & (indices < start + size)
    return indices[keep] - start, delta.index_select(dim, keep.nonzero().squeeze(1))


@dataclass
class S2FTSlice:
    """The S²FT buffers of one projection of a layer."""

    projection: str
    side: str  # "input": o_proj/down_proj columns; "output": rows of a q/k/v/gate/up slice
    index: torch.Tensor  # (slots, k) int64 local positions
    # input side: (slots, 1, out, k) punica, (slots, out, k) grouped; output side: (slots, 1, k, in), (slots, k, in):
    # per slot, the adapter's own layout
    delta: torch.Tensor
    offset: int  # output side: first column of the slice in the layer's (local, packed) output
    grouped: bool  # CPU formulation (vllm_ext.sparse)
    used: set = field(default_factory=set)  # slots that hold S²FT for this projection (host side)
    # per slot: positions its adapter wrote (0: none); past them index and delta hold zeros, so a switch writes only
    # what the new adapter holds and clears only what the old one held beyond it
    filled: list = field(default_factory=list)

    def __post_init__(self):
        self.filled = [0] * self.index.shape[0]

    @property
    def k(self) -> int:
        return self.index.shape[1]

    @property
    def _k_dim(self) -> int:
        """The k axis of one slot's delta, (out, K) on the input side, (K, in) on the output side."""
        return 1 if self.side == "input" else 0

    def layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A module's delta ((out, k) on the input side, (k, in) on the output side) as a slot holds it: contiguous,
        in the buffers' dtype (a copy only where the adapter's dtype differs)."""
        return delta.to(self.delta.dtype).contiguous()

    def _positions(self, slot: int, start: int, stop: int) -> torch.Tensor:
        slot_delta = self.delta[slot] if self.grouped else self.delta[slot, 0]
        return slot_delta.narrow(self._k_dim, start, stop - start)

    def reset(self, slot: int) -> None:
        filled = self.filled[slot]
        if filled:
            self.index[slot, :filled] = 0
            self._positions(slot, 0, filled).zero_()
            self.filled[slot] = 0
        self.used.discard(slot)

    def set(self, slot: int, indices: torch.Tensor, delta: torch.Tensor) -> None:
        """Write local ``indices`` (k_r,) and ``delta`` (in :meth:`layout`) into ``slot``; the rest stays zero."""
        k, filled = indices.numel(), self.filled[slot]
        if filled > k:
            self.index[slot, k:filled] = 0
            self._positions(slot, k, filled).zero_()
        self.filled[slot] = k
        if k == 0:
            self.used.discard(slot)
            return
        self.index[slot, :k].copy_(indices, non_blocking=True)
        self._positions(slot, 0, k).copy_(delta, non_blocking=True)
        self.used.add(slot)

    def add(self, output: torch.Tensor, x: torch.Tensor, punica_wrapper) -> torch.Tensor:
        if self.grouped:
            groups = punica_wrapper.s2ft_groups
            if not self.used & groups.active:
                return output
            if self.side == "input":
                return add_input_side_grouped(output, x, groups, self.index, self.delta)
            return add_output_side_grouped(output, x, groups, self.index, self.delta, self.offset)
        slots = punica_wrapper._token_lora_indices[: x.shape[0]]
        if self.side == "input":
            return add_input_side_punica(punica_wrapper, output, x, slots, self.index, self.delta)
        return add_output_side_punica(punica_wrapper, output, x, slots, self.index, self.delta, self.offset)


def _sized_at_start() -> str | None:
    """The buffer sizes the plugin worked out from the adapters given at start-up (``vllm_ext.capacity``), from the
    engine config vLLM sets while it builds the model's LoRA layers."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None:
        raise RuntimeError("vllm_ext: vLLM built its LoRA layers outside its config context; this vLLM release is not "
                           "supported (vLLM 0.32 only).")
    additional = config.additional_config
    return additional.get(SIZED) if isinstance(additional, dict) else None


class S2FTLayerMixin:
    """Per slot: nothing, a LoRA adapter (vLLM's buffers and kernels) or an S²FT adapter (``s2ft_slices``)."""

    s2ft_side: str  # the side of every projection this layer can hold

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.s2ft_sized = _sized_at_start()
        limits = max_k_per_projection(engine_setting(self.s2ft_sized))
        projections = self.s2ft_projections()
        self.s2ft_slices: list[S2FTSlice | None] = [
            self._create_s2ft_slice(i, name, limits.get(name, 0), max_loras, lora_config.lora_dtype)
            for i, name in enumerate(projections)
        ] if len(projections) == self.n_slices else [None] * self.n_slices
        self.lora_slots_used: set[int] = set()

    def s2ft_projections(self) -> tuple[str, ...]:
        """The projection in each slice, from the layer's module name (e.g. ``model.layers.0.mlp.gate_up_proj``)."""
        name = getattr(self.base_layer, "prefix", "").rpartition(".")[2]
        return PACKED.get(name, (name,))

    def _create_s2ft_slice(self, slice_index, projection, max_k, max_loras, dtype) -> S2FTSlice | None:
        if max_k == 0 or SIDES.get(projection) != self.s2ft_side:
            return None
        if self.s2ft_side == "input":
            axis, dense, offset = self.input_size, self.output_size, 0
        else:
            axis, dense = self.output_slices[slice_index], self.input_size
            offset = sum(self.output_slices[:slice_index])
        k = -(-min(max_k, axis) // K_ALIGNMENT) * K_ALIGNMENT
        grouped = current_platform.is_cpu() and grouped_fits(dtype, k, dense)
        shape = (dense, k) if self.s2ft_side == "input" else (k, dense)
        shape = (max_loras, *shape) if grouped else (max_loras, 1, *shape)
        return S2FTSlice(
            projection=projection,
            side=self.s2ft_side,
            index=torch.zeros(max_loras, k, dtype=torch.long, device=self.device),
            delta=torch.zeros(shape, dtype=dtype, device=self.device),
            offset=offset,
            grouped=grouped,
        )

    def s2ft_shard(self, slice_index: int) -> tuple[int, int]:
        """[start, start + size) of the indexed axis that this tensor-parallel rank holds."""
        raise NotImplementedError

    def reset_lora(self, index: int) -> None:
        self._reset_lora_buffers(index)
        for s2ft_slice in filter(None, self.s2ft_slices):
            s2ft_slice.reset(index)

    def _reset_lora_buffers(self, index: int) -> None:
        if index in self.lora_slots_used:  # vLLM's LoRA buffers start at zero and only its set_lora writes them
            super().reset_lora(index)
            self.lora_slots_used.discard(index)

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        pairs = list(zip(lora_a, lora_b)) if isinstance(lora_a, list) else [(lora_a, lora_b)]
        if not any(is_selector(a) or is_selector(b) for a, b in pairs):  # a LoRA adapter: vLLM's buffers and kernels
            self.reset_lora(index)
            super().set_lora(index, lora_a, lora_b)
            self.lora_slots_used.add(index)
            return
        self._reset_lora_buffers(index)
        for slice_index, s2ft_slice in enumerate(self.s2ft_slices):
            a, b = pairs[slice_index] if slice_index < len(pairs) else (None, None)
            if s2ft_slice is None:
                continue
            if a is None:
                s2ft_slice.reset(index)
            else:  # input side: lora_a = S, lora_b = D; output side: lora_a = D, lora_b = S (see s2ft_module)
                indices, delta = (a, b) if is_selector(a) else (b, a)
                s2ft_slice.set(index, indices, delta)

    def s2ft_module(self, slice_index: int, indices: torch.Tensor, delta: torch.Tensor):
        """An adapter's module for this layer's ``slice_index`` as its slots hold it: the indices and the columns
        (input side) or rows (output side) of the delta that fall in this tensor-parallel rank's shard, the indices
        local, the delta in the slot layout and dtype (:meth:`S2FTSlice.layout`). The loader calls this once per
        adapter, so that bringing a cached adapter into a slot copies each module's bytes once, nothing else."""
        s2ft_slice = self.s2ft_slices[slice_index]
        indices = indices.long()
        if self.tp_size > 1:  # cut to this rank's shard (a single rank holds every row and column)
            start, size = self.s2ft_shard(slice_index)
            indices, delta = shard_s2ft(indices, delta, 1 if s2ft_slice.side == "input" else 0, start, size)
        if indices.numel() > s2ft_slice.k:  # the checks compare with the setting; this is what the buffers hold
            raise ValueError(f"{s2ft_slice.projection}: {indices.numel()} positions on this rank but its S2FT buffers "
                             f"hold {s2ft_slice.k}; restart the engine with a larger {SETTING}.")
        return indices, s2ft_slice.layout(delta)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        groups = getattr(self.punica_wrapper, "s2ft_groups", None)
        if groups is not None and not self.lora_slots_used & groups.active:
            return output  # CPU: no slot in this batch holds LoRA weights for this layer
        return super()._apply_lora_to_output(x, output)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        output = super().apply(x, bias)
        flat_x, flat_output = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
        for s2ft_slice in filter(None, self.s2ft_slices):
            flat_output = s2ft_slice.add(flat_output, flat_x, self.punica_wrapper)
        return flat_output.view(output.shape)


class _RowParallel(S2FTLayerMixin):
    """o_proj, down_proj: input-side S²FT; each rank holds ``input_size`` consecutive input columns."""

    s2ft_side = "input"

    def s2ft_shard(self, slice_index: int) -> tuple[int, int]:
        return self.tp_rank * self.input_size, self.input_size


class _ColumnParallel(S2FTLayerMixin):
    """gate_up_proj, qkv_proj: output-side S²FT per slice; each rank holds one block of rows of every slice (q rows
    split by query heads, k/v rows by (possibly replicated) kv heads)."""

    s2ft_side = "output"

    def s2ft_shard(self, slice_index: int) -> tuple[int, int]:
        size = self.output_slices[slice_index]
        return self.output_ids[slice_index] * size, size


class S2FTRowParallelLinearWithLoRA(_RowParallel, RowParallelLinearWithLoRA):
    pass


class S2FTRowParallelLinearWithShardedLoRA(_RowParallel, RowParallelLinearWithShardedLoRA):
    pass


class S2FTMergedColumnParallelLinearWithLoRA(_ColumnParallel, MergedColumnParallelLinearWithLoRA):
    pass


class S2FTMergedColumnParallelLinearWithShardedLoRA(_ColumnParallel, MergedColumnParallelLinearWithShardedLoRA):
    pass


class S2FTMergedQKVParallelLinearWithLoRA(_ColumnParallel, MergedQKVParallelLinearWithLoRA):
    pass


class S2FTMergedQKVParallelLinearWithShardedLoRA(_ColumnParallel, MergedQKVParallelLinearWithShardedLoRA):
    pass


# vLLM's layer class -> its S²FT subclass
S2FT_LAYERS = {cls.__bases__[1]: cls for cls in (
    S2FTRowParallelLinearWithLoRA, S2FTRowParallelLinearWithShardedLoRA, S2FTMergedColumnParallelLinearWithLoRA,
    S2FTMergedColumnParallelLinearWithShardedLoRA, S2FTMergedQKVParallelLinearWithLoRA,
    S2FTMergedQKVParallelLinearWithShardedLoRA,
)}
