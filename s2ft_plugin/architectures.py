"""How model families name their attention and FFN projections, lay out fused ones, and count their heads.

Every projection has a role (``structure.ROLES``): q/k/v/o, qkv when fused, gate/up/down, gate_up when fused. Families
not listed use Llama's names, which most decoders share (Mistral, Qwen, Gemma, OLMo, Granite, SmolLM, Phi-3, ...).
Names are matched on the module's last one or two path components ("attn.c_proj" tells GPT-2's attention output from
its MLP's "mlp.c_proj"). Projections are ``nn.Linear`` or GPT-2's ``Conv1D``, whose weight is stored transposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

LLAMA_NAMES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "qkv_proj": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
}
NEOX_NAMES = {"query_key_value": "qkv", "dense": "o", "dense_h_to_4h": "up", "dense_4h_to_h": "down"}


@dataclass(frozen=True)
class Architecture:
    """A family's projection names and the facts about its heads that are not in every config."""

    names: dict = field(default_factory=lambda: dict(LLAMA_NAMES))  # module name or "parent.name" -> role
    qkv_layout: str = "sections"  # fused qkv rows: "sections" [q|k|v], "per_head" [q k v per head],
    #                               "per_group" [q... k v per key/value group]
    head_order_fixed: Optional[str] = None  # why heads cannot be reordered, if they cannot
    key_value_heads: Optional[int] = None  # when the config does not say it the usual way

    def role(self, module_path: str) -> Optional[str]:
        parts = module_path.split(".")
        return self.names.get(".".join(parts[-2:])) or self.names.get(parts[-1])

    def names_for(self, *roles: str) -> list[str]:
        """The module names (last component) that hold ``roles``."""
        return sorted({name.rsplit(".", 1)[-1] for name, role in self.names.items() if role in roles})


ARCHITECTURES = {
    "gpt2": Architecture({"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}),
    "gpt_neox": Architecture(NEOX_NAMES, qkv_layout="per_head"),
    "bloom": Architecture(NEOX_NAMES, qkv_layout="per_head",
                          head_order_fixed="its ALiBi position biases follow the head order"),
    "gptj": Architecture({"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o", "fc_in": "up",
                          "fc_out": "down"}),
    "opt": Architecture({"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o", "fc1": "up", "fc2": "down"}),
    "phi": Architecture({"q_proj": "q", "k_proj": "k", "v_proj": "v", "dense": "o", "fc1": "up", "fc2": "down"}),
    "starcoder2": Architecture({"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "c_fc": "up",
                                "c_proj": "down"}),
}


def architecture(config) -> Architecture:
    """The architecture of a transformers (text) config."""
    if config.model_type == "falcon":  # one family, three qkv layouts
        if config.new_decoder_architecture:
            layout, kv_heads = "per_group", config.num_kv_heads
        elif config.multi_query:
            layout, kv_heads = "sections", 1
        else:
            layout, kv_heads = "per_head", config.num_attention_heads
        fixed = "its ALiBi position biases follow the head order" if config.alibi else None
        return Architecture(NEOX_NAMES, qkv_layout=layout, head_order_fixed=fixed, key_value_heads=kv_heads)
    return ARCHITECTURES.get(config.model_type, Architecture())


def default_target_modules(config) -> list[str]:
    """The input side of every block (the attention output and the FFN down projection): partial backprop keeps only
    the selected activations there."""
    return architecture(config).names_for("o", "down")


def head_geometry(config, arch: Architecture) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim)."""
    heads = config.num_attention_heads
    kv_heads = arch.key_value_heads or getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"{heads} attention heads do not split into {kv_heads} key/value groups.")
    return heads, kv_heads, head_dim


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear projection, Conv1D included."""
    base = base_layer(module)
    if is_conv1d(base):
        return base.nf, base.weight.shape[0]
    out_features, in_features = getattr(base, "out_features", None), getattr(base, "in_features", None)
    if out_features is None or in_features is None:
        raise ValueError(f"S2FT supports linear projections only, got {type(base).__name__}.")
    return out_features, in_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view of Conv1D's transposed storage."""
    weight = module.weight
    return weight.t() if is_conv1d(module) else weight


def weight_dim(module: nn.Module, dim: int) -> int:
    """The dim of ``module.weight`` that holds dim ``dim`` (0 rows, 1 columns) of the (out, in) view."""
    return 1 - dim if is_conv1d(module) else dim
