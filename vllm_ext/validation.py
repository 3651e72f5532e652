"""The worker loader's checks, made in the front end from the model config before a request is queued.

A worker that fails to load an adapter in the middle of a batch takes the engine down with it, so every reason the
loader (``vllm_ext.loader``) can refuse a folder is checked here first: the folder itself, k against
``VLLM_S2FT_MAX_K``, module paths against the served model's layers, ``--lora-target-modules``, and index/delta shapes
against the model's projections.
"""

from __future__ import annotations

import re

from .adapter import PACKED, MalformedS2FTAdapter, S2FTAdapter, check_dims
from .capacity import check_capacity, max_k_per_projection
from .experts import check_experts_fit

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MODULE_PATH = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
PACKED_IN = {projection: packed for packed, projections in PACKED.items() for projection in projections}


def projection_dims(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection S²FT can adapt, from a transformers config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def check_servable(adapter: S2FTAdapter, config, target_modules=None) -> None:
    """Refuse an adapter the engine serving a model of ``config`` (a transformers config) with LoRA restricted to
    ``target_modules`` (``--lora-target-modules``, None: all) would refuse."""
    check_capacity(adapter, max_k_per_projection())
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = text_config.num_hidden_layers
    dims = projection_dims(text_config)
    check_experts_fit(adapter, text_config)
    for path, module in adapter.modules.items():
        where = f"S2FT adapter at {adapter.path!r}, module {path!r}"
        match = MODULE_PATH.fullmatch(path)
        projection = path.rpartition(".")[2]
        parent = "self_attn" if projection in ATTENTION else "mlp"
        if match is None or match[2] != parent or int(match[1]) >= num_layers:
            raise MalformedS2FTAdapter(
                f"{where}: the served model has no such module (it has model.layers.<i>.self_attn.<q/k/v/o>_proj "
                f"and model.layers.<i>.mlp.<gate/up/down>_proj for i < {num_layers}); the adapter was trained on "
                "another model."
            )
        if target_modules is not None and not {projection, *_packed_names(projection)} & set(target_modules):
            raise ValueError(f"{where}: the engine serves LoRA only on --lora-target-modules {sorted(target_modules)}.")
        out_features, in_features = dims[projection]
        if module.side == "input":
            check_dims(where, module, in_features, out_features)
        else:
            check_dims(where, module, out_features, in_features)


def _packed_names(projection: str) -> tuple[str, ...]:
    """vLLM wraps a packed layer when any of its names is a target: the packed name and its slices' projections."""
    packed = PACKED_IN.get(projection)
    return (packed, *PACKED[packed]) if packed else ()
