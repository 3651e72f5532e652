"""Partial backpropagation for S²FT deltas.

Autograd on ``base(x) + x[..., S] @ D.T`` would be correct but could keep more than it needs; these functions save
exactly what the delta's gradient needs (the selected activations for input-side deltas). Two ways in:

- ``base_out`` given: the base layer ran on its own (any layer, quantized ones included) and autograd handles it; the
  delta's input gradient is a separate full-size tensor that autograd adds to the base's.
- ``base_out`` None: the frozen ``weight`` (and ``bias``) of a plain linear layer is applied here too ("compute
  densely"), so backward computes ``grad @ W`` once and adds the delta's part into it in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _gather(x2d: torch.Tensor, positions: torch.Tensor, start: Optional[int]) -> torch.Tensor:
    if start is not None:
        return x2d.narrow(1, start, positions.numel())
    return x2d.index_select(1, positions)


def _add_product(target2d: torch.Tensor, positions: torch.Tensor, start: Optional[int], left: torch.Tensor,
                 right: torch.Tensor) -> None:
    """``target2d[:, S] += left @ right``, in place, in the target's dtype; one kernel when ``S`` is contiguous."""
    left, right = _as(left, target2d), _as(right, target2d)
    if start is not None:
        target2d.narrow(1, start, positions.numel()).addmm_(left, right)
    else:  # autocast may compute the product in a lower precision
        target2d.index_add_(1, positions, _as(left @ right, target2d))


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D (tokens, features) view of a contiguous activation."""
    return tensor.view(-1, tensor.shape[-1])


def _base_input_grad(ctx, grad2d, weight) -> Optional[torch.Tensor]:
    """``grad @ W`` when the base ran here (None otherwise: autograd computes the base's part)."""
    return grad2d @ weight.to(grad2d.dtype) if ctx.fused else None


def _as(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``like``'s dtype; the comparison is cheaper than a no-op ``.to`` on the decode path."""
    return tensor if tensor.dtype == like.dtype else tensor.to(like.dtype)


def _own_linear(x, weight, bias) -> torch.Tensor:
    """``F.linear`` as a tensor of its own: the delta is added into it in place, and an autograd Function's output must
    not be a view (downstream in-place ops would be refused). F.linear returns one for a 3-D input with a bias."""
    out = F.linear(x, weight, bias)
    return out.clone() if out._is_view() else out


def _input_side_sum(x, delta, positions, start, weight, bias, base_out) -> tuple[torch.Tensor, torch.Tensor]:
    """``base(x) + x[..., S] @ D.T`` as a tensor of its own (see _own_linear), and ``x[..., S]`` in its dtype."""
    x2d = x.reshape(-1, x.shape[-1])
    if base_out is None:  # the delta is added into the frozen product in place
        out = _own_linear(x, weight, bias)
        selected = _as(_gather(x2d, positions, start), out)
        _rows(out).addmm_(selected, _as(delta, out).t())
    else:  # the base's output is left as it was, and the sum written into a tensor of the output's shape
        out = torch.empty(base_out.shape, dtype=base_out.dtype, device=base_out.device)
        selected = _as(_gather(x2d, positions, start), out)
        torch.addmm(base_out.reshape(-1, out.shape[-1]), selected, _as(delta, out).t(), out=_rows(out))
    return out, selected


def input_side(x, delta, positions, start, weight=None, bias=None, base_out=None) -> torch.Tensor:
    """``base(x) + x[..., S] @ D.T`` without autograd (inference): nothing is saved."""
    return _input_side_sum(x, delta, positions, start, weight, bias, base_out)[0]


def output_side(x, delta, positions, start, weight=None, bias=None, base_out=None) -> torch.Tensor:
    """``base(x)`` plus ``x @ D.T`` on the output rows ``S``, without autograd (inference)."""
    out = _own_linear(x, weight, bias) if base_out is None else base_out.clone(memory_format=torch.contiguous_format)
    _add_product(_rows(out), positions, start, x.reshape(-1, x.shape[-1]), delta.t())
    return out


class InputSideDelta(torch.autograd.Function):
    """``base(x) + x[..., S] @ D.T`` for a delta ``D`` of shape (out, k) over the input columns ``S``.

    Saves only ``x[..., S]`` (T x k); ``start`` is the offset of ``S`` when it is contiguous (co-permuted).
    """

    @staticmethod
    def forward(ctx, x, delta, positions, start, weight=None, bias=None, base_out=None):
        ctx.fused = base_out is None
        out, selected = _input_side_sum(x, delta, positions, start, weight, bias, base_out)
        selected = selected.contiguous() if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(selected, delta, positions, weight if ctx.fused else None)
        ctx.start, ctx.x_shape, ctx.x_dtype = start, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        selected, delta, positions, weight = ctx.saved_tensors
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = _base_input_grad(ctx, grad2d, weight)
            if grad_x is None:
                grad_x = grad2d.new_zeros(grad2d.shape[0], ctx.x_shape[-1])
            _add_product(grad_x, positions, ctx.start, grad2d, delta)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_delta = (grad2d.t() @ selected.to(grad2d.dtype)).to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None, (None if ctx.fused else grad_out)


class OutputSideDelta(torch.autograd.Function):
    """``base(x)`` plus ``x @ D.T`` added to the output rows ``S``, for a delta ``D`` of shape (k, in).

    D's gradient needs the whole input, so ``x`` is saved; the frozen base weight itself gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, delta, positions, start, weight=None, bias=None, base_out=None):
        ctx.fused = base_out is None
        out = output_side(x, delta, positions, start, weight, bias, base_out)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, delta, positions, weight if ctx.fused else None)
        ctx.start, ctx.x_shape, ctx.x_dtype = start, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, delta, positions, weight = ctx.saved_tensors
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        selected_grad = _gather(grad2d, positions, ctx.start)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = _base_input_grad(ctx, grad2d, weight)
            delta_part = delta.to(grad2d.dtype)
            grad_x = selected_grad @ delta_part if grad_x is None else grad_x.addmm_(selected_grad, delta_part)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x2d = x.reshape(-1, x.shape[-1]).to(grad2d.dtype)
            grad_delta = (selected_grad.t() @ x2d).to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None, (None if ctx.fused else grad_out)
