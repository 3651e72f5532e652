"""Partial backpropagation for S²FT deltas.

Autograd on ``base_out + x[..., S] @ D.T`` would be correct but could keep more than it needs; these functions save
exactly what the delta's gradient needs (the selected activations for input-side deltas) and leave the frozen base
layer to autograd, which saves nothing for a weight that needs no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch


def _gather(x2d: torch.Tensor, positions: torch.Tensor, start: Optional[int]) -> torch.Tensor:
    if start is not None:
        return x2d[:, start : start + positions.numel()]
    return x2d.index_select(1, positions)


def _scatter(grad2d: torch.Tensor, positions: torch.Tensor, start: Optional[int], values: torch.Tensor) -> None:
    values = values.to(grad2d.dtype)  # autocast may compute the update in a lower precision than the output
    if start is not None:
        grad2d[:, start : start + positions.numel()] += values
    else:
        grad2d.index_add_(1, positions, values)


class InputSideDelta(torch.autograd.Function):
    """``base_out + x[..., S] @ D.T`` for a delta ``D`` of shape (out, k) over the input columns ``S``.

    Saves only ``x[..., S]`` (T x k); ``start`` is the offset of ``S`` when it is contiguous (co-permuted).
    """

    @staticmethod
    def forward(ctx, base_out, x, delta, positions, start):
        x2d = x.reshape(-1, x.shape[-1])
        selected = _gather(x2d, positions, start).to(base_out.dtype)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), selected, delta.to(base_out.dtype).t())
        ctx.save_for_backward(selected.contiguous() if ctx.needs_input_grad[2] else None, delta, positions)
        ctx.start, ctx.x_shape, ctx.x_dtype = start, x.shape, x.dtype
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        selected, delta, positions = ctx.saved_tensors
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_x = grad2d.new_zeros(grad2d.shape[0], ctx.x_shape[-1])
            _scatter(grad_x, positions, ctx.start, grad2d @ delta.to(grad2d.dtype))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_delta = (grad2d.t() @ selected.to(grad2d.dtype)).to(delta.dtype)
        return grad_out, grad_x, grad_delta, None, None


class OutputSideDelta(torch.autograd.Function):
    """``base_out`` plus ``x @ D.T`` added to the output rows ``S``, for a delta ``D`` of shape (k, in).

    D's gradient needs the whole input, so ``x`` is saved; the base layer's own backward still saves nothing.
    """

    @staticmethod
    def forward(ctx, base_out, x, delta, positions, start):
        x2d = x.reshape(-1, x.shape[-1])
        update = x2d.to(base_out.dtype) @ delta.to(base_out.dtype).t()
        out = base_out.reshape(-1, base_out.shape[-1]).clone()
        _scatter(out, positions, start, update)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, delta, positions)
        ctx.start, ctx.x_shape, ctx.x_dtype = start, x.shape, x.dtype
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, delta, positions = ctx.saved_tensors
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        selected_grad = _gather(grad2d, positions, ctx.start)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_x = (selected_grad @ delta.to(grad2d.dtype)).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            x2d = x.reshape(-1, x.shape[-1]).to(grad2d.dtype)
            grad_delta = (selected_grad.t() @ x2d).to(delta.dtype)
        return grad_out, grad_x, grad_delta, None, None
