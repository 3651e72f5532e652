"""Independent references for S²FT tests: deltas written straight into a dense copy of the base weights."""

import torch
from safetensors.torch import load_file

from s2ft_plugin.tiny import build_model

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# projections whose input columns S2FT adapts (attention outputs and FFN down projections), in every family tested
INPUT_SIDE = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "fc_out", "dense_4h_to_h", "c_proj")


def is_input_side(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in INPUT_SIDE


def dense_weight(module) -> torch.Tensor:
    """The weight as (out_features, in_features): GPT-2's Conv1D stores it transposed."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def dense_grad(module) -> torch.Tensor:
    return module.weight.grad.t() if type(module).__name__ == "Conv1D" else module.weight.grad


def saved_adapter(adapter_dir):
    """{module path inside the base model: (indices, delta)} read from a saved adapter folder."""
    tensors = load_file(f"{adapter_dir}/adapter_model.safetensors")
    modules = {}
    for key, value in tensors.items():
        path, name = key.removeprefix("base_model.model.").rsplit(".", 1)
        modules.setdefault(path, {})[name] = value
    return {path: (entry["s2ft_indices"], entry["s2ft_delta"]) for path, entry in modules.items()}


def dense_merge(model, adapters, requires_grad=False):
    """Add each (indices, delta) into the base weight in original coordinates: W[:, S] += D or W[S, :] += D."""
    with torch.no_grad():
        for path, (indices, delta) in adapters.items():
            weight = dense_weight(model.get_submodule(path))
            weight.index_add_(1 if is_input_side(path) else 0, indices, delta.to(weight.dtype))
    if requires_grad:
        for path in adapters:
            model.get_submodule(path).weight.requires_grad_(True)
    return model


def selected_grad(model, path, indices) -> torch.Tensor:
    """The dense weight's gradient restricted to the rows or columns S2FT adapts."""
    grad = dense_grad(model.get_submodule(path))
    return grad[:, indices] if is_input_side(path) else grad[indices, :]


def reference_model(architecture, adapter_dirs, **kwargs):
    model = build_model(architecture, **kwargs)
    for adapter_dir in adapter_dirs:
        dense_merge(model, saved_adapter(adapter_dir))
    return model
