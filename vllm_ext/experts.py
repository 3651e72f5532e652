"""S²FT deltas on fused MoE experts: what an adapter folder holds for them, and the checks PEFT's loader makes on them
against the served model's config.

``s2ft_plugin.moe.Experts`` saves, per experts module (``model.layers.<i>.mlp.experts`` in transformers), each
expert's channels ``s2ft_indices`` (E, k) and the deltas of the parts it adapts: ``s2ft_down_delta`` (E, H, k) on the
channels' down_proj columns, ``s2ft_gate_delta`` and ``s2ft_up_delta`` (E, k, H) on their gate and up rows. Which
experts modules and parts a config adapts follows ``s2ft_plugin.moe`` (its parts are matched like module names,
``...experts.down_proj``); nothing here imports PEFT or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2ft_format.config import EXPERT_TARGETS, targets, unit_count
from s2ft_format.tensors import EXPERT_DELTAS, check_delta, check_expert_channels, missing_error, stray_error

# the MoE models (transformers model_type) vLLM serves S2FT expert deltas on: those tested (tests/test_vllm_moe.py)
SERVED_MOE = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class S2FTExperts:
    """One experts module's tensors as saved (kind -> tensor); :func:`check_experts` checks them against the model."""

    tensors: dict

    @property
    def channels(self) -> torch.Tensor | None:
        """(E, k): expert e adapts its channels ``channels[e]``."""
        return self.tensors.get("s2ft_indices")

    def delta(self, part: str) -> torch.Tensor | None:
        """(E, H, k) for down_proj, (E, k, H) for gate_proj/up_proj; None: not adapted."""
        return self.tensors.get(EXPERT_DELTAS[part])

    @property
    def k(self) -> int:
        return self.channels.shape[-1] if self.channels is not None and self.channels.dim() else 0


@dataclass(frozen=True)
class AdaptedExperts:
    """An experts module a config adapts, as the model's config gives it."""

    experts: int
    channels: int  # per expert
    hidden: int
    count: int  # k: the channels the config selects per expert
    parts: tuple  # adapted parts, in EXPERT_DELTAS order

    def delta_shape(self, part: str) -> tuple[int, int, int]:
        if part == "down_proj":
            return self.experts, self.hidden, self.count
        return self.experts, self.count, self.hidden


def moe_dims(config) -> tuple[int, int, int] | None:
    """(experts, channels per expert, hidden size) of a transformers text config with routed experts (Mixtral,
    Qwen3-MoE); None for a dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts:
        return None
    return experts, getattr(config, "moe_intermediate_size", None) or config.intermediate_size, config.hidden_size


def has_experts(config, layer: int) -> bool:
    """Whether decoder layer ``layer`` has routed experts (Qwen3-MoE keeps ``mlp_only_layers`` and, with
    ``decoder_sparse_step`` > 1, others dense)."""
    if moe_dims(config) is None:
        return False
    step = getattr(config, "decoder_sparse_step", None) or 1
    return layer not in (getattr(config, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


def adapted_experts(values: dict, config) -> dict[str, AdaptedExperts]:
    """Experts module path -> what ``values`` (an S2FT config's fields, ``target_modules`` resolved) adapts on it, for
    a model of ``config`` (a transformers text config); raises what ``s2ft_plugin.moe`` raises."""
    adapted = {}
    for layer in filter(lambda layer: has_experts(config, layer), range(config.num_hidden_layers)):
        key = f"model.layers.{layer}.mlp.experts"
        if not targets({**values, "target_modules": [key]}, key):  # excluded (exclude_modules, modules_to_save)
            continue
        named = {part for name, parts in EXPERT_TARGETS.items() if targets(values, f"{key}.{name}") for part in parts}
        if not named:
            if targets(values, key):
                raise ValueError(
                    f"S2FT adapts parts of the experts '{key}': name them in target_modules "
                    f"({', '.join(EXPERT_TARGETS)}), e.g. 'experts.down_proj'."
                )
            continue
        experts, channels, hidden = moe_dims(config)
        adapted[key] = AdaptedExperts(experts, channels, hidden, unit_count(values, "channels", channels),
                                      tuple(part for part in EXPERT_DELTAS if part in named))
    return adapted


def check_experts(adapter, adapted: dict[str, AdaptedExperts]) -> None:
    """PEFT's checks on the experts modules of ``adapter`` (a ``vllm_ext.adapter.S2FTAdapter``) against those its
    config ``adapted`` (:func:`adapted_experts`), in PEFT's order: every tensor present, each expert's channels, each
    delta's shape and values; then no experts tensor without a place."""
    for path, shape in adapted.items():
        where = f"S2FT adapter at {adapter.path!r}, module {path!r}"
        module = adapter.experts.get(path, S2FTExperts({}))
        for what, tensor in [("indices", module.channels), *((f"{part} delta", module.delta(part))
                                                             for part in shape.parts)]:
            if tensor is None:
                raise missing_error(where, what)
        check_expert_channels(f"{where} (channels of {shape.experts} experts with {shape.channels} channels each)",
                              module.channels, shape.experts, shape.channels, shape.count)
        for part in shape.parts:
            check_delta(where, module.delta(part), shape.delta_shape(part), f"{part} delta")
    for path, module in adapter.experts.items():
        expected = {"s2ft_indices", *(EXPERT_DELTAS[part] for part in adapted[path].parts)} if path in adapted else ()
        stray = next((kind for kind in module.tensors if kind not in expected), None)
        if stray is not None:
            raise stray_error(f"S2FT adapter at {adapter.path!r}", f"{path}.{stray}")
