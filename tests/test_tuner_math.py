"""The partial-backprop functions against a dense re-implementation of S²FT."""

import pytest
import torch

from s2ft_plugin.functional import InputSideDelta, OutputSideDelta, input_side, output_side


def dense_reference(x, weight, delta, positions, side):
    """y = x (W + D scattered into W's rows/columns)^T, differentiated by plain autograd."""
    full = torch.zeros_like(weight).index_copy(1 if side == "input" else 0, positions, delta)
    return x @ (weight + full).t()


CASES = [
    ("input", torch.tensor([2, 3, 4, 5]), 2),
    ("input", torch.tensor([7, 1, 4, 12]), None),
    ("output", torch.tensor([8, 9, 10]), 8),
    ("output", torch.tensor([0, 5, 17]), None),
]


@pytest.mark.parametrize("fused", [False, True], ids=["base-outside", "base-fused"])
@pytest.mark.parametrize("side,positions,start", CASES)
def test_forward_and_gradients_match_dense_reference(side, positions, start, fused):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 16, dtype=torch.float64)
    shape = (20, positions.numel()) if side == "input" else (positions.numel(), 16)
    delta = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    function = InputSideDelta if side == "input" else OutputSideDelta

    bias = torch.randn(20, dtype=torch.float64)
    if fused:
        out = function.apply(x, delta, positions, start, weight, bias)
    else:
        out = function.apply(x, delta, positions, start, None, None, x @ weight.t() + bias)
    ref = dense_reference(x, weight, delta, positions, side) + bias
    torch.testing.assert_close(out, ref)

    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, delta), upstream)
    ref_grads = torch.autograd.grad(ref, (x, delta), upstream)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["base-outside", "base-fused"])
@pytest.mark.parametrize("side,positions,start", CASES)
def test_inference_path_matches_dense_reference(side, positions, start, fused, dtype):
    """The no-grad functions (generation) against the dense reference; a bf16 base with a float32 delta, as under a
    half-precision model, is computed in the base's dtype."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64).to(dtype)
    weight, bias = torch.randn(20, 16, dtype=torch.float64).to(dtype), torch.randn(20, dtype=torch.float64).to(dtype)
    shape = (20, positions.numel()) if side == "input" else (positions.numel(), 16)
    delta = torch.randn(shape)  # float32, as trained
    function = input_side if side == "input" else output_side
    base_out = x @ weight.t() + bias
    out = function(x, delta, positions, start, weight, bias) if fused else function(
        x, delta, positions, start, base_out=base_out)
    ref = dense_reference(x.double(), weight.double(), delta.to(dtype).double(), positions, side) + bias.double()
    assert out.dtype == dtype and out.shape == ref.shape
    tolerance = dict(rtol=0, atol=0.25) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.double(), ref, **tolerance)
    if not fused:
        assert torch.equal(base_out, x @ weight.t() + bias)  # the base layer's output is left as it was


def test_gradcheck_both_sides():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    base_out = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    input_delta = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    output_delta = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([4, 1])
    weight = torch.randn(5, 6, dtype=torch.float64)
    for function, delta in ((InputSideDelta, input_delta), (OutputSideDelta, output_delta)):
        def outside(b, x, d, function=function):
            return function.apply(x, d, positions, None, None, None, b)

        def fused(x, d, function=function):
            return function.apply(x, d, positions, None, weight)

        assert torch.autograd.gradcheck(outside, (base_out, x, delta))
        assert torch.autograd.gradcheck(fused, (x, delta))


@pytest.mark.parametrize("fused", [False, True], ids=["base-outside", "base-fused"])
def test_input_side_saves_only_selected_activations(fused):
    """Partial backprop: the adapter path keeps T x k activations, the frozen base keeps none of its input."""
    tokens, features, k = 64, 32, 4
    x = torch.randn(tokens, features, requires_grad=True)
    weight = torch.randn(48, features)
    delta = torch.zeros(48, k, requires_grad=True)
    positions = torch.arange(8, 8 + k)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if fused:
            out = InputSideDelta.apply(x, delta, positions, 8, weight)
        else:
            out = InputSideDelta.apply(x, delta, positions, 8, None, None, torch.nn.functional.linear(x, weight))
    activation_like = [t for t in saved if t.shape[0] == tokens]
    assert [tuple(t.shape) for t in activation_like] == [(tokens, k)]
    # the saved slice is its own storage, not a view that would keep x alive
    assert activation_like[0].untyped_storage().nbytes() == tokens * k * 4
    out.sum().backward()
    assert weight.grad is None and delta.grad is not None


@pytest.mark.parametrize("fused", [False, True], ids=["base-outside", "base-fused"])
@pytest.mark.parametrize("side,positions,start", CASES)
def test_output_can_be_modified_in_place_downstream(side, positions, start, fused):
    """A model may update a projection's output in place (a residual ``+=``); autograd refuses that on a view a custom
    Function returns (F.linear returns one for a 3-D input with a bias), so the gradients must come out as for the
    dense reference updated the same way."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(20, 16, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    shape = (20, positions.numel()) if side == "input" else (positions.numel(), 16)
    delta = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    function = InputSideDelta if side == "input" else OutputSideDelta
    base_out = torch.nn.functional.linear(x, weight, bias)
    out = function.apply(x, delta, positions, start, weight, bias) if fused else function.apply(
        x, delta, positions, start, None, None, base_out)
    out *= 2
    ref = (dense_reference(x, weight, delta, positions, side) + bias) * 2
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out.sum(), (x, delta)), torch.autograd.grad(ref.sum(), (x, delta))):
        torch.testing.assert_close(got, want)
