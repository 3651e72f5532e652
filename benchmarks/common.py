"""Pieces the training benchmarks share: methods at equal trainable parameters, one optimizer step, round-robin
timing, saved-activation bytes and peak memory."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace

import torch
from peft import LoraConfig, ShiraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from s2ft_plugin import initialize_s2ft_selection
from s2ft_plugin.tiny import build_model

LORA_TARGETS = {
    "lora": ["o_proj", "down_proj"],
    "lora_all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def add_model_arguments(parser) -> None:
    """``--model`` (a transformers folder: real shapes) or the sizes of a synthetic Llama."""
    parser.add_argument("--model", help="a transformers folder for real shapes, e.g. models/SmolLM2-135M-Instruct "
                                        "(make real-model); default: a synthetic Llama of the sizes below")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)


def benchmark_model(args, max_positions: int, dtype: torch.dtype = torch.float32):
    """The model ``add_model_arguments`` describes, on CPU in ``dtype``."""
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return build_model(
        "llama", hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max_positions,
    ).to(dtype)


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


def adapt(base, method: str, s2ft_config, seed: int, s2ft_fields: dict | None = None, calibration=None):
    """A copy of ``base`` prepared for ``method``, every adapter at about the trainable-parameter count of S2FT's
    default targets under ``s2ft_config``. ``full`` trains every weight; ``lora``, ``lora_all_linear`` and ``shira``
    take the rank of equal parameters on LORA_TARGETS (SHiRA: r(m + n) entries per projection, LoRA's count); any
    other name is S2FT with ``s2ft_fields`` replacing fields of ``s2ft_config``. FFN-only ``target_modules`` get the
    channel count of equal parameters; score-based selections are scored on ``calibration`` (batches of the new task,
    as a user would)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if method == "full":
        return model.requires_grad_(True)
    if method in LORA_TARGETS or method == "shira":
        targets = LORA_TARGETS["lora" if method == "shira" else method]
        rank = equal_parameter_rank(model, s2ft_config, targets)
        if method == "shira":
            return get_peft_model(model, ShiraConfig(task_type="CAUSAL_LM", r=rank, target_modules=targets,
                                                     random_seed=seed))
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                target_modules=targets))
    fields = dict(s2ft_fields or {}, seed=seed)
    targets = fields.get("target_modules")
    if targets is not None:
        if set(targets) - FFN_PROJECTIONS:
            raise ValueError(f"Equal-parameter S2FT sizes FFN channels only; {sorted(targets)} names other projections.")
        per_channel = model.config.hidden_size * len(targets) * model.config.num_hidden_layers
        fields["num_channels"] = round(s2ft_trainable(model, s2ft_config) / per_channel)
    model = get_peft_model(model, replace(s2ft_config, **fields))
    if model.peft_config["default"].selection != "random":
        initialize_s2ft_selection(model, calibration, show_progress_bar=False)
    return model


FFN_PROJECTIONS = {"gate_proj", "up_proj", "down_proj"}  # each trains hidden_size weights per channel


def adamw(parameters):
    """The optimizer TRL's and transformers' trainers build by default on torch >= 2.8 (``optim="adamw_torch_fused"``),
    so step times are what a user's training loop pays."""
    return torch.optim.AdamW(parameters, lr=1e-4, fused=True)


def step(model, optimizer, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward over one forward (storages deduplicated, parameters excluded; a sparse tensor
    counts its indices and values)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        for part in (tensor._indices(), tensor._values()) if tensor.is_sparse else (tensor,):
            storage = part.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_step_times(models: dict, optimizers: dict, batch, device: str, warmup: int, steps: int) -> dict:
    """Step times per method, one step of each method per round, each round in a rotated order, so drift of the
    machine hits every method alike."""
    methods = list(models)
    times = {method: [] for method in methods}
    for round_index in range(warmup + steps):
        for method in methods[round_index % len(methods):] + methods[:round_index % len(methods)]:
            synchronize(device)
            start = time.perf_counter()
            step(models[method], optimizers[method], batch)
            synchronize(device)
            if round_index >= warmup:
                times[method].append(time.perf_counter() - start)
    return times


def per_round_ratios(times: dict, reference: str) -> dict:
    """Each method's time over ``reference``'s in the same round, sorted: the machine's drift between rounds cancels,
    and the spread is the run's own noise band (one run's median ratio can sit several percent from another's here)."""
    return {method: sorted(t / r for t, r in zip(values, times[reference])) for method, values in times.items()}


def peak_bytes(model, optimizer, batch, device: str) -> int:
    """CUDA: torch.cuda.max_memory_allocated over a step. CPU: weights + gradients + AdamW state + the activations
    autograd saves for backward."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batch)
        synchronize(device)
        return torch.cuda.max_memory_allocated()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable(model))
    optimizer_state = 2 * sum(p.numel() * 4 for p in trainable(model)) if optimizer is not None else 0
    return weights + grads + optimizer_state + saved_activation_bytes(model, batch)
