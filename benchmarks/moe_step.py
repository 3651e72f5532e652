"""MoE training step time and memory: S2FT on the experts vs PEFT LoRA on the same expert weights at equal trainable
parameters vs the frozen floor, side by side in one process.

Every method trains the same randomly initialised Mixtral. S2FT adapts only the experts: channel_ratio of every
expert's channels, on its down_proj columns (``target_modules=["down_proj"]``, the default part) or on its down_proj
columns and gate/up rows (``+ gate_up_proj``). LoRA adapts the same 3-D expert parameters through PEFT's
``target_parameters`` (a rank-r update per expert) at S2FT's trainable-parameter count, without dropout. The floor
freezes every weight and backpropagates to the embeddings' output only; every method backpropagates to the same place.

Peak memory on CPU is weights + gradients + AdamW state + the activations autograd saves for backward (saved-tensor
hooks, storages deduplicated, weights excluded); on CUDA torch.cuda.max_memory_allocated over a step.

    python benchmarks/moe_step.py [--device cuda] [--hidden 768] [--intermediate 1536] [--experts 8] ...
"""

from __future__ import annotations

import argparse
import platform
import statistics
from datetime import date

import torch
from peft import LoraConfig, get_peft_model

from common import adamw, round_step_times, peak_bytes, saved_activation_bytes, trainable
from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import build_model

METHODS = ("floor", "s2ft", "lora", "s2ft_gate_up", "lora_gate_up")
LABELS = {
    "floor": "frozen floor",
    "s2ft": "S2FT experts' down_proj",
    "lora": "LoRA experts.down_proj",
    "s2ft_gate_up": "S2FT experts' down_proj + gate_up_proj",
    "lora_gate_up": "LoRA experts.down_proj + gate_up_proj",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=1536, help="channels per expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--channel-ratio", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def lora_rank(args, channels: int, gate_up: bool) -> int:
    """The rank whose LoRA on the expert weights has S2FT's parameter count: S2FT trains H x k per expert and part;
    LoRA's rank-r update of an (out, in) expert weight trains r (out + in)."""
    hidden, width = args.hidden, args.intermediate
    s2ft = hidden * channels * (3 if gate_up else 1)
    per_rank = (hidden + width) + ((2 * width + hidden) if gate_up else 0)
    return max(1, round(s2ft / per_rank))


def build(method: str, args, channels: int):
    model = build_model(
        "mixtral", hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=args.seq, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
    ).to(args.device)
    model.config.use_cache = False
    gate_up = method.endswith("gate_up")
    if method.startswith("s2ft"):
        targets = ["down_proj", "gate_up_proj"] if gate_up else ["down_proj"]
        model = get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", target_modules=targets,
                                                 num_channels=channels))
    elif method.startswith("lora"):
        rank = lora_rank(args, channels, gate_up)
        parameters = ["experts.down_proj", "experts.gate_up_proj"] if gate_up else ["experts.down_proj"]
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                 target_modules=[], target_parameters=parameters))
    else:
        model.requires_grad_(False)
    model.enable_input_require_grads()  # every method backpropagates to the embeddings' output, like the floor
    return model.train()


def main():
    args = parse_args()
    channels = max(1, round(args.channel_ratio * args.intermediate))
    batch = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(args.device)
    models = {method: build(method, args, channels) for method in METHODS}
    optimizers = {m: (adamw(trainable(model)) if m != "floor" else None)
                  for m, model in models.items()}
    times = round_step_times(models, optimizers, batch, args.device, args.warmup, args.steps)
    median = {method: statistics.median(values) for method, values in times.items()}
    memory = {method: peak_bytes(models[method], optimizers[method], batch, args.device) for method in METHODS}
    saved = {method: saved_activation_bytes(models[method], batch) for method in METHODS}

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.machine()}, {torch.get_num_threads()} threads")
    pairs = args.batch * args.seq * args.top_k
    print(f"date {date.today()} | device {args.device} ({where}) | torch {torch.__version__} | fp32")
    print(f"mixtral hidden={args.hidden} experts={args.experts}x{args.intermediate} channels top-{args.top_k} "
          f"heads={args.heads} layers={args.layers} vocab={args.vocab} tokens/step={args.batch}x{args.seq}; "
          f"S2FT {channels} channels per expert; LoRA r={lora_rank(args, channels, False)} (down_proj), "
          f"r={lora_rank(args, channels, True)} (+ gate_up_proj)")
    print("| method | trainable params | step time (s) | vs floor | vs LoRA, same experts | saved activations over "
          "floor (MiB) | peak memory (MiB) | vs floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in METHODS:
        lora = "lora_gate_up" if method.endswith("gate_up") else "lora"
        count = sum(p.numel() for p in trainable(models[method]))
        print(f"| {LABELS[method]} | {count:,} | {median[method]:.3f} | {median[method] / median['floor']:.3f}x | "
              f"{median[method] / median[lora]:.3f}x | {(saved[method] - saved['floor']) / 2**20:.1f} | "
              f"{memory[method] / 2**20:.1f} | {memory[method] / memory['floor']:.3f}x |")
    # what partial backprop must keep: 2k gate/up pre-activations per routed token and layer (twice with gate/up
    # deltas), plus each pair's row, sort position and routing weight; the frozen experts keep what the floor keeps
    for method, copies in (("s2ft", 1), ("s2ft_gate_up", 2)):
        limit = args.layers * pairs * (copies * 2 * channels * 4 + 8 + 8 + 4)
        print(f"{LABELS[method]}: saved over the floor {(saved[method] - saved['floor']) / 2**20:.1f} MiB; from the "
              f"shapes {limit / 2**20:.1f} MiB (+ the experts' input, {args.layers * args.batch * args.seq * args.hidden * 4 / 2**20:.1f} MiB, when gate/up rows train)")


if __name__ == "__main__":
    main()
