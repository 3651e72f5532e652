"""The two formulations of a batch of S²FT slots: each token adds its own slot's delta, base tokens add nothing.

For one projection, slot ``s`` holds ``index[s]`` (k positions, padded with position 0) and the delta ``D_s`` (zero
where padded), and a token of slot ``s`` adds

- input side (o_proj, down_proj): ``y += x[:, index[s]] @ D_sᵀ``, ``D_s`` of shape (out, k);
- output side (q/k/v/gate/up_proj slices): ``y[:, offset + index[s]] += x @ D_sᵀ``, ``D_s`` of shape (k, in).

Padding adds exactly zero, and tokens with no slot (-1, base-model requests) add nothing, so they get exactly the
base output on every platform.

- **punica** (every platform but CPU): the matmuls are vLLM's punica ``add_expand`` (input side, on the gathered
  columns) and ``add_shrink`` (output side, then a scatter-add into the selected columns) with the deltas as LoRA
  weights; slot-less rows are masked. Fixed shapes, no host synchronisation, nothing that depends on the batch's
  contents: CUDA graphs capture it. Deltas live in punica's layout, ``(slots, 1, out, k)`` and ``(slots, 1, k, in)``.
- **grouped** (CPU): vLLM's CPU punica ops copy each token's weights, so the CPU sorts the batch's tokens by slot
  once (:func:`group_tokens`, on the host, shared by all layers) and multiplies each slot's rows by its delta, read
  once: one ``torch.bmm`` over blocks padded to the fullest slot while that at most doubles the rows, else one grouped
  GEMM (``torch._grouped_mm``). Deltas live in the adapter's own layout, ``(slots, out, k)`` and ``(slots, k, in)``
  (punica's without its singleton axis), which the GEMMs read transposed: an adapter then enters a slot with one plain
  copy per module, never a transposed one (``vllm_ext.layers``). Decode batch of 64 tokens over 16 adapters, down_proj
  columns (in 2816, out 1024, k 128), fp32, 2-core CPU: per-token punica ops about 21 ms, grouped GEMM 0.8-1.2 ms,
  padded bmm 0.36 ms (the dense base matmul 2.8 ms); a skewed prefill (1000 tokens of one adapter, 16 of each of 15
  others): grouped GEMM 3.3 ms, padded bmm 50 ms. Reading the deltas transposed costs the padded bmm 5-15% on decode
  batches (0.39 -> 0.44 ms at 16 adapters, o_proj) and the grouped GEMM 13% (input side) to 60% (output side, 2.1 ->
  3.5 ms for that prefill at k 128), against keeping the transposed layout, which costs every switch a transposed copy
  (about 1 ms per 4 MiB adapter on that CPU, more than the rest of the switch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# torch._grouped_mm reads rows of 16-byte multiples
GROUPED_ALIGNMENT_BYTES = 16
# CPU: pad every slot's tokens to the fullest slot's count (one bmm) while that at most doubles the rows multiplied
PADDING_LIMIT = 2


def slot_mask(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot or 0, has a slot) per token. Rows past the batch (CUDA-graph padding) may hold stale values: they count as
    slot-less, so no value they hold can index out of range."""
    valid = (slots >= 0) & (slots < num_slots)
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


def add_input_side_punica(punica_wrapper, output: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                          index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``output[t] += x[t, index[s]] @ D_sᵀ`` for each token t of slot s; ``delta`` is (slots, 1, out, k)."""
    safe, valid = slot_mask(slots, index.shape[0])
    gathered = x.gather(1, index[safe]).masked_fill_(~valid.unsqueeze(1), 0)
    result = punica_wrapper.add_expand(output, gathered.unsqueeze(0), (delta,), (delta.shape[2],), offset_start=0,
                                       add_inputs=True)
    return output if result is None else result


def add_output_side_punica(punica_wrapper, output: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                           index: torch.Tensor, delta: torch.Tensor, offset: int) -> torch.Tensor:
    """``output[t, offset + index[s]] += x[t] @ D_sᵀ`` for each token t of slot s; ``delta`` is (slots, 1, k, in)."""
    safe, valid = slot_mask(slots, index.shape[0])
    buffer = torch.zeros((1, x.shape[0], delta.shape[2]), dtype=torch.float32, device=x.device)
    result = punica_wrapper.add_shrink(buffer, x, (delta,), 1.0)
    buffer = buffer if result is None else result
    update = buffer[0].masked_fill_(~valid.unsqueeze(1), 0).to(output.dtype)
    return output.scatter_add_(1, index[safe] + offset, update)


@dataclass(frozen=True)
class TokenGroups:
    """A batch's tokens with a slot, sorted by slot; computed once per batch on the host and shared by every layer."""

    order: torch.Tensor  # (n,) token rows that have a slot, sorted by slot (base rows are left out)
    slots: torch.Tensor  # (n,) slot of each sorted row
    offsets: torch.Tensor  # (num_slots,) int32: end of each slot's run in ``order``
    rows: int  # tokens of the fullest slot
    padded: torch.Tensor | None  # (n,) row of each sorted row when every slot is padded to ``rows``; None: not worth it
    active: frozenset  # slots with tokens in the batch (LoRA or S²FT)


def group_tokens(slots: torch.Tensor, num_slots: int, active: frozenset) -> TokenGroups:
    key = torch.where(slots >= 0, slots, num_slots)
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    n = int(counts.sum())
    rows = int(counts.max()) if n else 0
    order = torch.argsort(key, stable=True)[:n]
    sorted_slots = slots.index_select(0, order)
    ends = counts.cumsum(0)
    padded = None
    if num_slots * rows <= PADDING_LIMIT * n:  # one batched GEMM over equal blocks beats a GEMM per slot
        padded = sorted_slots * rows + torch.arange(n) - (ends - counts).index_select(0, sorted_slots)
    return TokenGroups(order=order, slots=sorted_slots, offsets=ends.to(torch.int32), rows=rows, padded=padded,
                       active=active)


def _slot_matmul(a: torch.Tensor, weights: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """Row i of ``a`` (rows in ``groups.order``) times the (K, N) weights of its slot; ``weights`` is (slots, K, N),
    any strides (the deltas are transposed views)."""
    if groups.padded is None:
        return torch._grouped_mm(a, weights, offs=groups.offsets)
    num_slots, k, n = weights.shape
    blocks = a.new_zeros(num_slots * groups.rows, k).index_copy_(0, groups.padded, a)
    return torch.bmm(blocks.view(num_slots, groups.rows, k), weights).view(-1, n).index_select(0, groups.padded)


def grouped_fits(dtype: torch.dtype, *sizes: int) -> bool:
    """Whether rows of these sizes meet the grouped GEMM's alignment."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return all(size * itemsize % GROUPED_ALIGNMENT_BYTES == 0 for size in sizes)


def add_input_side_grouped(output: torch.Tensor, x: torch.Tensor, groups: TokenGroups, index: torch.Tensor,
                           delta: torch.Tensor) -> torch.Tensor:
    """As :func:`add_input_side_punica`, with ``delta`` of shape (slots, out, k)."""
    gathered = x[groups.order.unsqueeze(1), index[groups.slots]]
    return output.index_add_(0, groups.order, _slot_matmul(gathered, delta.mT, groups).to(output.dtype))


def add_output_side_grouped(output: torch.Tensor, x: torch.Tensor, groups: TokenGroups, index: torch.Tensor,
                            delta: torch.Tensor, offset: int) -> torch.Tensor:
    """As :func:`add_output_side_punica`, with ``delta`` of shape (slots, k, in)."""
    update = _slot_matmul(x.index_select(0, groups.order), delta.mT, groups)
    columns = index[groups.slots] + offset
    rows = groups.order.unsqueeze(1).expand_as(columns)
    return output.index_put_((rows, columns), update.to(output.dtype), accumulate=True)
