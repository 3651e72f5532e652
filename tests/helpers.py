"""Independent references for S²FT tests: deltas written straight into a dense copy of the base weights."""

import torch
from safetensors.torch import load_file

from s2ft_plugin.tiny import build_model

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_SIDE = ("o_proj", "down_proj")


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
            weight = model.get_submodule(path).weight
            dim = 1 if path.endswith(INPUT_SIDE) else 0
            weight.index_add_(dim, indices, delta.to(weight.dtype))
    if requires_grad:
        for path in adapters:
            model.get_submodule(path).weight.requires_grad_(True)
    return model


def reference_model(architecture, adapter_dirs, **kwargs):
    model = build_model(architecture, **kwargs)
    for adapter_dir in adapter_dirs:
        dense_merge(model, saved_adapter(adapter_dir))
    return model
