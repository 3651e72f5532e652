"""S²FT deltas on fused MoE experts as an adapter folder holds them, and whether they fit the served model's config.

``s2ft_plugin.moe.Experts`` saves, per experts module (``model.layers.<i>.mlp.experts`` in transformers), each
expert's channels ``s2ft_indices`` (E, k) and the deltas of the parts it adapts: ``s2ft_down_delta`` (E, H, k) on the
channels' down_proj columns, ``s2ft_gate_delta`` and ``s2ft_up_delta`` (E, k, H) on their gate and up rows. Nothing
here imports vLLM: the converter and the front end read folders with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# part -> its tensor (s2ft_plugin.moe.DELTAS)
EXPERT_DELTAS = {"down_proj": "s2ft_down_delta", "gate_proj": "s2ft_gate_delta", "up_proj": "s2ft_up_delta"}
EXPERTS_PATH = re.compile(r"model\.layers\.(\d+)\.mlp\.experts")


@dataclass(frozen=True)
class S2FTExperts:
    """One experts module: expert e adds ``down[e]`` to the down_proj columns ``channels[e]`` and ``gate[e]``/``up[e]``
    to those channels' gate/up rows (None: that part is not adapted)."""

    channels: torch.Tensor  # (E, k) int64
    down: torch.Tensor | None  # (E, H, k)
    gate: torch.Tensor | None  # (E, k, H)
    up: torch.Tensor | None  # (E, k, H)

    @property
    def k(self) -> int:
        return self.channels.shape[1]

    @property
    def num_experts(self) -> int:
        return self.channels.shape[0]

    @property
    def hidden(self) -> int:
        return next(delta.shape[1] if part == "down_proj" else delta.shape[2] for part, delta in self.parts().items())

    def parts(self) -> dict[str, torch.Tensor]:
        """The adapted parts' deltas, by part name."""
        deltas = {"down_proj": self.down, "gate_proj": self.gate, "up_proj": self.up}
        return {part: delta for part, delta in deltas.items() if delta is not None}


def is_experts_module(parts: dict) -> bool:
    """Whether a module's tensors (kind -> tensor) are those of fused experts."""
    return any(kind in EXPERT_DELTAS.values() for kind in parts)


def check_experts_module(where: str, parts: dict) -> S2FTExperts:
    """The experts module made of ``parts`` (kind -> tensor), or :class:`MalformedS2FTAdapter` naming the problem."""
    from .adapter import MalformedS2FTAdapter

    stray = sorted(set(parts) - {"s2ft_indices", *EXPERT_DELTAS.values()})
    if stray:
        raise MalformedS2FTAdapter(f"{where}: unexpected tensor(s) {stray} on fused experts; they hold s2ft_indices and "
                                   f"{', '.join(EXPERT_DELTAS.values())}.")
    channels = parts.get("s2ft_indices")
    if channels is None:
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices is missing.")
    if channels.dim() != 2 or channels.dtype.is_floating_point or channels.dtype in (torch.bool, torch.uint8):
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices of fused experts must be a 2-D integer tensor (experts, k), "
                                   f"got {channels.dtype} {tuple(channels.shape)}.")
    if channels.numel() == 0:
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices is empty.")
    if int(channels.min()) < 0:
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices holds negative values.")
    if bool((torch.sort(channels, dim=1).values.diff(dim=1) == 0).any()):
        raise MalformedS2FTAdapter(f"{where}: s2ft_indices repeat a channel within an expert.")
    (experts, k), hidden = channels.shape, None
    deltas = {}
    for part, kind in EXPERT_DELTAS.items():
        delta = parts.get(kind)
        if delta is None:
            continue
        h = (delta.shape[1] if part == "down_proj" else delta.shape[2]) if delta.dim() == 3 else -1
        expected = (experts, h, k) if part == "down_proj" else (experts, k, h)
        if h < 0 or not delta.dtype.is_floating_point or tuple(delta.shape) != expected \
                or (hidden is not None and h != hidden):
            shape = "(experts, hidden, k)" if part == "down_proj" else "(experts, k, hidden)"
            raise MalformedS2FTAdapter(f"{where}: {kind} must be a float tensor of shape {shape} with experts={experts} "
                                       f"and k={k} from s2ft_indices, got {delta.dtype} {tuple(delta.shape)}.")
        if not torch.isfinite(delta).all():
            raise MalformedS2FTAdapter(f"{where}: {kind} holds NaN or infinite values.")
        hidden, deltas[part] = h, delta
    return S2FTExperts(channels.long(), deltas.get("down_proj"), deltas.get("gate_proj"), deltas.get("up_proj"))


def experts_dims(config) -> tuple[int, int, int] | None:
    """(experts, channels per expert, hidden size) of a transformers MoE config (Mixtral, Qwen3-MoE); None if the
    config names no routed experts."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts:
        return None
    channels = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return experts, channels, config.hidden_size


def sparse_layer(config, index: int) -> bool:
    """Whether decoder layer ``index`` of a transformers MoE config has routed experts (Qwen3-MoE can keep some dense:
    ``mlp_only_layers``, ``decoder_sparse_step``)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return index not in (getattr(config, "mlp_only_layers", None) or []) and (index + 1) % step == 0


def check_experts_fit(adapter, config) -> None:
    """Refuse expert modules that do not fit a model of ``config`` (a transformers text config), on an engine that
    serves them (vLLM's CPU platform, :mod:`vllm_ext.moe`)."""
    from vllm.platforms import current_platform

    from .adapter import MalformedS2FTAdapter

    if not adapter.experts:
        return
    path = next(iter(adapter.experts))
    if not current_platform.is_cpu():
        raise ValueError(
            f"S2FT adapter at {adapter.path!r}, module {path!r}: S2FT deltas on fused MoE experts are served on vLLM's "
            "CPU platform only (vllm_ext.moe adds them beside vLLM's CPU experts kernel); on this platform serve the "
            "merged model (PeftModel.merge_and_unload) instead."
        )
    dims = experts_dims(config)
    for path, module in adapter.experts.items():
        where = f"S2FT adapter at {adapter.path!r}, module {path!r}"
        match = EXPERTS_PATH.fullmatch(path)
        if dims is None or match is None or int(match[1]) >= config.num_hidden_layers \
                or not sparse_layer(config, int(match[1])):
            raise MalformedS2FTAdapter(f"{where}: the served model has no such experts module; the adapter was trained "
                                       "on another model.")
        experts, channels, hidden = dims
        if module.num_experts != experts or module.hidden != hidden:
            raise MalformedS2FTAdapter(
                f"{where}: the adapter holds {module.num_experts} experts of hidden size {module.hidden} but the served "
                f"model has {experts} of hidden size {hidden}; the adapter was trained on another model."
            )
        if int(module.channels.max()) >= channels:
            raise MalformedS2FTAdapter(
                f"{where}: s2ft_indices reach {int(module.channels.max())} but the served model's experts have "
                f"{channels} channels; the adapter was trained on another model."
            )
