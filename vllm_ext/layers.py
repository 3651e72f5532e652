"""vLLM's linear LoRA layers, extended so that each slot holds either a LoRA adapter or an S²FT one.

Each layer gets S²FT buffers of its own when the engine starts, per projection it packs (``qkv_proj``: q, k, v;
``gate_up_proj``: gate, up; ``o_proj``; ``down_proj``): a per-slot index table (slots x k, padded with position 0) and
the deltas (zero where padded), with k from ``VLLM_S2FT_MAX_K`` (:mod:`vllm_ext.capacity`), independent of
``--max-lora-rank``. Buffers are written in place when an adapter enters a slot and never reallocated, so CUDA graphs
captured at start-up keep reading them.

The loader hands an S²FT module to ``set_lora`` as a LoRA pair whose one-hot factor is replaced by its 1-D integer
``indices`` (no LoRA factor is ever 1-D); ``apply`` adds the S²FT slots after vLLM's own base + LoRA computation
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
from .capacity import max_k_per_projection
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
    # input side: (slots, 1, out, k) punica, (slots, k, out) grouped; output side: (slots, 1, k, in), (slots, in, k)
    delta: torch.Tensor
    offset: int  # output side: first column of the slice in the layer's (local, packed) output
    grouped: bool  # CPU formulation (vllm_ext.sparse)
    used: set = field(default_factory=set)  # slots that hold S²FT for this projection (host side)

    @property
    def k(self) -> int:
        return self.index.shape[1]

    def reset(self, slot: int) -> None:
        self.index[slot] = 0
        self.delta[slot] = 0
        self.used.discard(slot)

    def set(self, slot: int, indices: torch.Tensor, delta: torch.Tensor) -> None:
        """Write local ``indices`` (k_r,) and ``delta`` ((out, k_r) or (k_r, in)) into ``slot``; the rest stays zero."""
        self.reset(slot)
        k = indices.numel()
        if k == 0:
            return
        self.index[slot, :k].copy_(indices)
        slot_delta = self.delta[slot].t() if self.grouped else self.delta[slot, 0]  # (out, K) or (K, in)
        (slot_delta[:, :k] if self.side == "input" else slot_delta[:k]).copy_(delta)
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


class S2FTLayerMixin:
    """Per slot: nothing, a LoRA adapter (vLLM's buffers and kernels) or an S²FT adapter (``s2ft_slices``)."""

    s2ft_side: str  # the side of every projection this layer can hold

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        limits = max_k_per_projection()
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
        if self.s2ft_side == "input":
            shape = (max_loras, k, dense) if grouped else (max_loras, 1, dense, k)
        else:
            shape = (max_loras, dense, k) if grouped else (max_loras, 1, k, dense)
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
        super().reset_lora(index)
        for s2ft_slice in filter(None, self.s2ft_slices):
            s2ft_slice.reset(index)
        self.lora_slots_used.discard(index)

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        self.reset_lora(index)
        pairs = list(zip(lora_a, lora_b)) if isinstance(lora_a, list) else [(lora_a, lora_b)]
        if not any(is_selector(a) or is_selector(b) for a, b in pairs):  # a LoRA adapter: vLLM's buffers and kernels
            super().set_lora(index, lora_a, lora_b)
            self.lora_slots_used.add(index)
            return
        for slice_index, (a, b) in enumerate(pairs):
            if a is not None:
                self._set_s2ft(index, slice_index, a, b)

    def _set_s2ft(self, index: int, slice_index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        s2ft_slice = self.s2ft_slices[slice_index]
        start, size = self.s2ft_shard(slice_index)
        if is_selector(lora_a):  # input side: lora_a = S, lora_b = D (out, k)
            indices, delta = shard_s2ft(lora_a, lora_b, 1, start, size)
        else:  # output side: lora_a = D (k, in), lora_b = S
            indices, delta = shard_s2ft(lora_b, lora_a, 0, start, size)
        s2ft_slice.set(index, indices.to(self.device), delta.to(device=self.device, dtype=s2ft_slice.delta.dtype))

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
