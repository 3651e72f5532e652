"""Pieces the training benchmarks share: equal-parameter LoRA sizing, one optimizer step, saved-activation bytes."""

from __future__ import annotations

import torch

LORA_TARGETS = {
    "lora": ["o_proj", "down_proj"],
    "lora_all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def s2ft_trainable(model, config) -> int:
    """Trainable parameters S2FT's default targets (o_proj, down_proj) get on ``model`` under ``config``."""
    layer = model.model.layers[0]
    heads = config.unit_count("heads", model.config.num_attention_heads)
    channels = config.unit_count("channels", layer.mlp.down_proj.in_features)
    head_dim = layer.self_attn.o_proj.in_features // model.config.num_attention_heads
    per_layer = layer.self_attn.o_proj.out_features * heads * head_dim + layer.mlp.down_proj.out_features * channels
    return per_layer * len(model.model.layers)


def equal_parameter_rank(model, s2ft_config, targets) -> int:
    """The LoRA rank on ``targets`` whose trainable parameter count is closest to S2FT's."""
    modules = [m for name, m in model.model.layers[0].named_modules() if name.rsplit(".", 1)[-1] in targets]
    per_rank = sum(m.in_features + m.out_features for m in modules) * len(model.model.layers)
    return max(1, round(s2ft_trainable(model, s2ft_config) / per_rank))


def step(model, optimizer, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward over one forward (storages deduplicated, parameters excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())
