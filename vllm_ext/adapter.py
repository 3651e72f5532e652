"""Reading and checking an S²FT adapter folder without building a model.

vLLM loads adapters in its workers, where a malformed folder must fail with a message that names the problem instead
of a shape error deep in a kernel; every check that needs only the folder lives here, the checks against the served
model's layers live where those layers are known.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .experts import EXPERT_DELTAS, check_experts_module, is_experts_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# projection -> adapted side, as in s2ft_plugin.structure.PROJECTIONS (kept here so vLLM processes need not import PEFT)
SIDES = {
    "q_proj": "output",
    "k_proj": "output",
    "v_proj": "output",
    "gate_proj": "output",
    "up_proj": "output",
    "o_proj": "input",
    "down_proj": "input",
}
# vLLM's packed modules -> the projections in their slices, in slice order
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class MalformedS2FTAdapter(ValueError):
    """The folder cannot be served as an S²FT adapter; the message says why."""


@dataclass(frozen=True)
class S2FTModule:
    """One adapted projection: ``W[:, indices] += delta`` (input side) or ``W[indices, :] += delta`` (output side)."""

    side: str
    indices: torch.Tensor  # (k,) int64, original (unpermuted) coordinates
    delta: torch.Tensor  # (out_features, k) on the input side, (k, in_features) on the output side

    @property
    def k(self) -> int:
        return self.indices.numel()

    @property
    def projection_dim(self) -> int:
        """The dense dimension of the delta: out_features (input side) or in_features (output side)."""
        return self.delta.shape[0] if self.side == "input" else self.delta.shape[1]


@dataclass(frozen=True)
class S2FTAdapter:
    path: str
    config: dict
    modules: dict  # module path inside the base model (e.g. "model.layers.0.mlp.down_proj") -> S2FTModule
    experts: dict = field(default_factory=dict)  # path of fused MoE experts -> vllm_ext.experts.S2FTExperts

    @property
    def max_k(self) -> int:
        return max(module.k for module in [*self.modules.values(), *self.experts.values()])


def is_s2ft_folder(path: str) -> bool:
    """True when ``path`` holds an adapter config whose ``peft_type`` is S2FT (anything else is left to vLLM)."""
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            return json.load(f).get("peft_type") == "S2FT"
    except (OSError, ValueError, AttributeError):
        return False


def read_s2ft_adapter(path: str) -> S2FTAdapter:
    """Load and check an S²FT folder; raise :class:`MalformedS2FTAdapter` naming the first problem found."""
    where = f"S2FT adapter at {path!r}"
    config = _read_config(path, where)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise MalformedS2FTAdapter(f"{where}: {WEIGHTS_NAME} is missing.")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise MalformedS2FTAdapter(f"{where}: {WEIGHTS_NAME} is not a readable safetensors file ({error}).") from None

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".")
        if kind not in ("s2ft_indices", "s2ft_delta", *EXPERT_DELTAS.values()):
            raise MalformedS2FTAdapter(
                f"{where}: unexpected tensor {key!r}; an S2FT adapter holds only <module>.s2ft_indices and "
                "<module>.s2ft_delta, or on fused MoE experts their deltas (modules_to_save cannot be served through "
                "vLLM's LoRA API)."
            )
        grouped.setdefault(module, {})[kind] = tensor
    if not grouped:
        raise MalformedS2FTAdapter(f"{where}: {WEIGHTS_NAME} holds no tensors.")
    modules = {module: _check_module(f"{where}, module {module!r}", module, parts) for module, parts in grouped.items()
               if not is_experts_module(parts)}
    experts = {module: check_experts_module(f"{where}, module {module!r}", parts) for module, parts in grouped.items()
               if is_experts_module(parts)}
    return S2FTAdapter(path=path, config=config, modules=modules, experts=experts)


def _read_config(path: str, where: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = json.load(f)
    except OSError:
        raise MalformedS2FTAdapter(f"{where}: {CONFIG_NAME} is missing or unreadable.") from None
    except ValueError as error:
        raise MalformedS2FTAdapter(f"{where}: {CONFIG_NAME} is not valid JSON ({error}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "S2FT":
        raise MalformedS2FTAdapter(f"{where}: {CONFIG_NAME} does not declare peft_type 'S2FT'.")
    return config


def _check_module(where: str, module: str, parts: dict) -> S2FTModule:
    projection = module.rpartition(".")[2]
    if projection not in SIDES:
        raise MalformedS2FTAdapter(f"{where}: S2FT adapts only {sorted(SIDES)}, not {projection!r}.")
    for kind in ("s2ft_indices", "s2ft_delta"):
        if kind not in parts:
            raise MalformedS2FTAdapter(f"{where}: {kind} is missing.")
    indices, delta = parts["s2ft_indices"], parts["s2ft_delta"]
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype in (torch.bool, torch.uint8):
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices must be a 1-D integer tensor, got {indices.dtype} "
                                   f"{tuple(indices.shape)}.")
    if indices.numel() == 0:
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices is empty.")
    if int(indices.min()) < 0:
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices holds negative values.")
    if torch.unique(indices).numel() != indices.numel():
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices holds duplicates.")
    side = SIDES[projection]
    k_axis = 1 if side == "input" else 0
    if delta.dim() != 2 or not delta.dtype.is_floating_point or delta.shape[k_axis] != indices.numel():
        expected = "(out_features, k)" if side == "input" else "(k, in_features)"
        raise MalformedS2FTAdapter(
            f"{where}: s2ft_delta must be a float tensor of shape {expected} with k={indices.numel()} "
            f"({side}-side projection), got {delta.dtype} {tuple(delta.shape)}."
        )
    if not torch.isfinite(delta).all():
        raise MalformedS2FTAdapter(f"{where}: s2ft_delta holds NaN or infinite values.")
    return S2FTModule(side=side, indices=indices.long(), delta=delta)


def check_dims(where: str, module: S2FTModule, axis_size: int, projection_dim: int) -> None:
    """Refuse a module whose indices or delta do not fit a projection of the served model."""
    if int(module.indices.max()) >= axis_size:
        kind = "columns" if module.side == "input" else "rows"
        raise MalformedS2FTAdapter(
            f"{where}: s2ft_indices reach {int(module.indices.max())} but the base model's projection has "
            f"{axis_size} {kind}; the adapter was trained on another model."
        )
    if module.projection_dim != projection_dim:
        kind = "out_features" if module.side == "input" else "in_features"
        raise MalformedS2FTAdapter(
            f"{where}: s2ft_delta has {kind}={module.projection_dim} but the base model's projection has "
            f"{projection_dim}; the adapter was trained on another model."
        )
