"""Unmerged generation with transformers: an S2FT adapter vs PEFT LoRA of equal parameters vs the base model, side by
side in one process (greedy decoding with the KV cache; rounds in rotated order, medians). Then the other way to serve
several adapters from one model, switching by merging: ``unmerge_adapter``, ``set_adapter``, ``merge_adapter``.

The limit from the shapes: an unmerged adapter adds its delta's multiply-adds to every token, so a generated token
costs at least ``1 + P_adapter / P_base`` of the base's (P: the parameters each token multiplies, the output
embedding included); everything above that is overhead. A merge switch rewrites what the adapters cover: S2FT's
selected columns (twice, out and in), LoRA's whole adapted weights (after the product B @ A).

    python benchmarks/hf_generate.py                        # a synthetic Llama
    python benchmarks/hf_generate.py --model models/SmolLM2-135M-Instruct   # make real-model
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from datetime import date

import torch

from common import adapt, add_model_arguments, benchmark_model, per_round_ratios, s2ft_trainable
from s2ft_plugin import S2FTConfig

METHODS = ("base", "s2ft", "lora")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--switches", type=int, default=20)
    return parser.parse_args()


def build(method: str, args):
    model = benchmark_model(args, args.prompt + args.new_tokens)
    if method != "base":  # zero-initialised deltas cost what trained ones do: nothing skips them
        model = adapt(model, method, S2FTConfig(task_type="CAUSAL_LM"), seed=0)
    return model.eval()


def per_token_parameters(model) -> int:
    """Parameters a token multiplies: every linear weight, the output embedding included (the input one is a lookup)."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def merge_switch_seconds(model, switches: int) -> float:
    """Median time to move the merged adapter from one of two to the other (the second one added here, as different
    as a new adapter of the same kind: S2FT selects other units)."""
    config = model.peft_config["default"]
    model.add_adapter("second", dataclasses.replace(config, seed=1) if hasattr(config, "seed") else config)
    model.merge_adapter()
    times = []
    for switch in range(switches + 1):  # the first one warms up
        start = time.perf_counter()
        model.unmerge_adapter()
        model.set_adapter("second" if switch % 2 == 0 else "default")
        model.merge_adapter()
        if switch:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    args = parse_args()
    torch.manual_seed(0)
    models = {method: build(method, args) for method in METHODS}
    vocab = models["base"].config.vocab_size
    prompt = torch.randint(3, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=0, attention_mask=torch.ones_like(prompt))
    times = {method: [] for method in METHODS}
    with torch.no_grad():
        for round_index in range(args.rounds + 1):  # round 0 warms up
            order = METHODS[round_index % len(METHODS):] + METHODS[:round_index % len(METHODS)]
            for method in order:
                start = time.perf_counter()
                models[method].generate(prompt, **settings)
                if round_index:
                    times[method].append(time.perf_counter() - start)
    median = {method: statistics.median(values) for method, values in times.items()}
    vs_base = per_round_ratios(times, "base")
    base_parameters = per_token_parameters(models["base"])
    adapter_parameters = s2ft_trainable(models["base"], S2FTConfig())
    name = args.model or (f"synthetic llama hidden={args.hidden} intermediate={args.intermediate} heads={args.heads} "
                          f"layers={args.layers} vocab={args.vocab}")
    print(f"date {date.today()} | {platform.machine()}, {torch.get_num_threads()} threads | torch {torch.__version__}")
    print(f"{name} | batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, median of {args.rounds}")
    print(f"limit for S2FT from the shapes: 1 + {adapter_parameters:,} / {base_parameters:,} = "
          f"{1 + adapter_parameters / base_parameters:.3f}x the base")
    print("| method | trainable params | generate (s) | tokens/s | vs base | vs base per round: median (min-max) "
          "| vs LoRA |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        count = sum(p.numel() for n, p in models[method].named_parameters() if "lora_" in n or "s2ft_" in n)
        tokens = args.batch * args.new_tokens / median[method]
        ratios = vs_base[method]
        print(f"| {method} | {count:,} | {median[method]:.3f} | {tokens:.1f} | {median[method] / median['base']:.3f}x "
              f"| {statistics.median(ratios):.3f}x ({ratios[0]:.3f}-{ratios[-1]:.3f}) "
              f"| {median[method] / median['lora']:.3f}x |")
    with torch.no_grad():
        switch = {method: merge_switch_seconds(models[method], args.switches) for method in ("s2ft", "lora")}
    print(f"switching adapters by merging (unmerge_adapter, set_adapter, merge_adapter), median of {args.switches}:")
    print("| method | switch (ms) | vs LoRA |")
    print("|---|---|---|")
    for method, seconds in switch.items():
        print(f"| {method} | {seconds * 1e3:.2f} | {seconds / switch['lora']:.3f}x |")


if __name__ == "__main__":
    main()
