"""Training step time and peak memory: S2FT vs PEFT LoRA (equal trainable parameters) vs full fine-tuning vs the
frozen-model floor (every weight frozen, backprop to the inputs only), side by side in one process.

LoRA runs twice at S2FT's trainable-parameter count: on the same projections as S2FT (o_proj, down_proj) and on all
linear projections (the usual LoRA recipe), both without dropout.

Peak memory on CPU is measured as weights + gradients + AdamW state + the activations autograd saves for backward
(captured with saved-tensor hooks, storages deduplicated, frozen weights excluded). On CUDA it is
torch.cuda.max_memory_allocated over a step.

    python benchmarks/train_step.py [--device cuda] [--hidden 1024] [--layers 4] ...
"""

from __future__ import annotations

import argparse
import platform
import statistics
from datetime import date

import torch

from common import (adamw, adapt, add_model_arguments, benchmark_model, peak_bytes, per_round_ratios,
                    round_step_times, trainable)
from s2ft_plugin import S2FTConfig

METHODS = ("floor", "s2ft", "lora", "lora_all_linear", "full")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--head-ratio", type=float, default=0.125)
    parser.add_argument("--channel-ratio", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def build(method: str, args):
    model = benchmark_model(args, args.seq, getattr(torch, args.dtype)).to(args.device)
    model.config.use_cache = False
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        s2ft_config = S2FTConfig(task_type="CAUSAL_LM", head_ratio=args.head_ratio, channel_ratio=args.channel_ratio)
        model = adapt(model, method, s2ft_config, seed=0)
        if method != "full":
            model.base_model.model.enable_input_require_grads()  # same autograd graph shape as the floor
    model.train()
    return model


def main():
    args = parse_args()
    torch.manual_seed(0)
    models = {method: build(method, args) for method in METHODS}
    config = models["floor"].config
    batch = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=args.device)
    optimizers = {m: (adamw(trainable(model)) if m != "floor" else None) for m, model in models.items()}
    times = round_step_times(models, optimizers, batch, args.device, args.warmup, args.steps)
    median = {method: statistics.median(values) for method, values in times.items()}
    vs_floor = per_round_ratios(times, "floor")
    memory = {method: peak_bytes(models[method], optimizers[method], batch, args.device) for method in METHODS}

    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"date {date.today()} | device {args.device} ({where}) | torch {torch.__version__} | dtype {args.dtype}")
    print(f"{args.model or 'synthetic llama'} hidden={config.hidden_size} intermediate={config.intermediate_size} "
          f"heads={config.num_attention_heads}/{config.num_key_value_heads} layers={config.num_hidden_layers} "
          f"vocab={config.vocab_size} tokens/step={args.batch}x{args.seq}")
    print("| method | trainable params | step time (s) | vs floor | vs floor per round: median (min-max) "
          "| vs LoRA (o,down) | vs LoRA (all-linear) | peak memory (MiB) | vs floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        count = sum(p.numel() for p in trainable(models[method]))
        ratios = vs_floor[method]
        print(f"| {method} | {count:,} | {median[method]:.3f} | {median[method] / median['floor']:.3f}x | "
              f"{statistics.median(ratios):.3f}x ({ratios[0]:.3f}-{ratios[-1]:.3f}) | "
              f"{median[method] / median['lora']:.3f}x | {median[method] / median['lora_all_linear']:.3f}x | "
              f"{memory[method] / 2**20:.1f} | {memory[method] / memory['floor']:.3f}x |")


if __name__ == "__main__":
    main()
