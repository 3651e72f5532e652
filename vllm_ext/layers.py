"""vLLM LoRA layers that also hold S²FT adapters and apply them by gathering, not by one-hot matmuls.

The loader hands an S²FT module to ``set_lora`` as a LoRA pair whose one-hot factor is replaced by its 1-D integer
``indices`` (no LoRA factor is ever 1-D). The delta is stored in the layer's existing stacked LoRA buffers (``lora_b``
on the input side, ``lora_a`` on the output side), so a slot costs no extra memory, and each forward adds, per active
slot, ``x[rows][:, S] @ D^T`` (input side) or ``x[rows] @ D^T`` into columns ``S`` (output side). Rows of base-model
requests (slot -1) are never touched. Slots holding plain LoRA adapters still go through vLLM's punica kernels.

Tensor parallelism: indices are split exactly like the dense weights they address (see :func:`shard_s2ft`).
"""

from __future__ import annotations

import torch

from vllm.lora.layers import (
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)


def is_selector(tensor) -> bool:
    """True for the 1-D integer tensor that stands in for a one-hot LoRA factor."""
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and not tensor.is_floating_point()


def shard_s2ft(indices: torch.Tensor, delta: torch.Tensor, dim: int, start: int, size: int):
    """The part of an S²FT module that a tensor-parallel shard owning ``[start, start + size)`` of the indexed axis
    applies: local indices and the matching slices of ``delta`` along ``dim`` (its k axis). Empty when none fall in.
    """
    keep = (indices >= start) & (indices < start + size)
    return indices[keep] - start, delta.index_select(dim, keep.nonzero().squeeze(1))


def token_groups(punica_wrapper) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, token rows or None for all rows) of each adapter slot in the batch; base tokens (slot -1) are left out.

    Computed once per batch and shared by all layers: the punica index buffer is rewritten in place for each batch,
    which bumps its version counter.
    """
    indices = punica_wrapper.token_lora_indices
    key = (indices.numel(), punica_wrapper._token_lora_indices._version)
    cached = getattr(punica_wrapper, "_s2ft_token_groups", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    slots = torch.unique(indices).tolist()
    groups = [
        (slot, None if len(slots) == 1 else (indices == slot).nonzero().squeeze(1)) for slot in slots if slot >= 0
    ]
    punica_wrapper._s2ft_token_groups = (key, groups)
    return groups


class S2FTLayerMixin:
    """Per slot and output slice: either nothing, a LoRA pair (stock path) or an S²FT module (gather path)."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.s2ft_slots: list[list] = [[None] * self.n_slices for _ in range(max_loras)]
        self.lora_slot_used = [False] * max_loras

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self.s2ft_slots[index] = [None] * self.n_slices
        self.lora_slot_used[index] = False

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        packed = isinstance(lora_a, list)
        pairs = list(zip(lora_a, lora_b)) if packed else [(lora_a, lora_b)]
        s2ft = [is_selector(a) or is_selector(b) for a, b in pairs]
        lora = [not flag and a is not None for flag, (a, _) in zip(s2ft, pairs)]
        if any(lora):  # the stock path resets the slot first, then copies the LoRA slices
            rest = [(None, None) if flag else pair for flag, pair in zip(s2ft, pairs)]
            rest_a, rest_b = [a for a, _ in rest], [b for _, b in rest]
            super().set_lora(index, rest_a if packed else rest_a[0], rest_b if packed else rest_b[0])
        else:
            self.reset_lora(index)
        self.lora_slot_used[index] = any(lora)
        for slice_index, ((a, b), flag) in enumerate(zip(pairs, s2ft)):
            if flag:
                self._set_s2ft(index, slice_index, a, b)

    def _set_s2ft(self, index: int, slice_index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        if is_selector(lora_a):  # input side: lora_a = S, lora_b = D (out, k)
            start, size = self.s2ft_shard(slice_index)
            indices, delta = shard_s2ft(lora_a, lora_b, 1, start, size)
            self.lora_b_stacked[slice_index][index, 0, : delta.shape[0], : delta.shape[1]].copy_(delta)
            side = "input"
        else:  # output side: lora_a = D (k, in), lora_b = S
            start, size = self.s2ft_shard(slice_index)
            indices, delta = shard_s2ft(lora_b, lora_a, 0, start, size)
            self.lora_a_stacked[slice_index][index, 0, : delta.shape[0], : delta.shape[1]].copy_(delta)
            indices = indices + sum(self.output_slices[:slice_index])  # column of the packed local output
            side = "output"
        if indices.numel():
            self.s2ft_slots[index][slice_index] = (side, indices.to(self.device), indices.numel())

    def s2ft_shard(self, slice_index: int) -> tuple[int, int]:
        """[start, start + size) of the indexed axis that this tensor-parallel rank holds."""
        raise NotImplementedError

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: (1, tokens, features)
            return self._apply_lora_to_output(x.flatten(0, 1), output.flatten(0, 1)).reshape(output.shape)
        groups = token_groups(self.punica_wrapper)
        if any(self.lora_slot_used[slot] for slot, _ in groups):
            output = super()._apply_lora_to_output(x, output)
        for slot, rows in groups:
            for slice_index, entry in enumerate(self.s2ft_slots[slot]):
                if entry is not None:
                    self._apply_s2ft(output, x, slot, slice_index, entry, rows)
        return output

    def _apply_s2ft(self, output, x, slot, slice_index, entry, rows) -> None:
        side, indices, k = entry
        x_rows = x if rows is None else x.index_select(0, rows)
        if side == "input":
            delta = self.lora_b_stacked[slice_index][slot, 0, :, :k]  # (out, k)
            update = x_rows.index_select(1, indices) @ delta.t().to(x.dtype)
            if rows is None:
                output.add_(update)
            else:
                output.index_add_(0, rows, update)
        else:
            delta = self.lora_a_stacked[slice_index][slot, 0, :k, :]  # (k, in)
            update = (x_rows @ delta.t().to(x.dtype)).to(output.dtype)
            if rows is None:
                output.index_add_(1, indices, update)
            else:
                output.index_put_((rows[:, None], indices[None, :]), update, accumulate=True)


class S2FTRowParallelLinearWithLoRA(S2FTLayerMixin, RowParallelLinearWithLoRA):
    """o_proj, down_proj: input-side S²FT; each rank holds ``input_size`` consecutive input columns."""

    def s2ft_shard(self, slice_index: int) -> tuple[int, int]:
        return self.tp_rank * self.input_size, self.input_size


class S2FTMergedColumnParallelLinearWithLoRA(S2FTLayerMixin, MergedColumnParallelLinearWithLoRA):
    """gate_up_proj: output-side S²FT per slice; each rank holds one block of rows of every slice."""

    def s2ft_shard(self, slice_index: int) -> tuple[int, int]:
        size = self.output_slices[slice_index]
        return self.output_ids[slice_index] * size, size


class S2FTMergedQKVParallelLinearWithLoRA(S2FTLayerMixin, MergedQKVParallelLinearWithLoRA):
    """qkv_proj: output-side S²FT per slice; q rows split by query heads, k/v rows by (replicated) kv heads."""

    def s2ft_shard(self, slice_index: int) -> tuple[int, int]:
        size = self.output_slices[slice_index]
        return self.output_ids[slice_index] * size, size


GATHER_LAYERS = (S2FTRowParallelLinearWithLoRA, S2FTMergedColumnParallelLinearWithLoRA,
                 S2FTMergedQKVParallelLinearWithLoRA)
