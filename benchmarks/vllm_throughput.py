"""vLLM serving throughput with 1, 4, 16 and 64 distinct adapters: S2FT vs LoRA of equal parameter count vs the base
model, each beside the limit worked out from the shapes, in one process.

Three engines run one after another in this process: the base model with LoRA disabled, then an S2FT engine and a LoRA
engine, each with ``max_loras`` = the largest count (no count evicts an adapter) and the smallest ``max_lora_rank`` its
adapters allow. Every configuration generates the same batch: ``--requests`` prompts of ``--prompt-tokens`` tokens,
``--max-tokens`` greedy tokens each (``ignore_eos``), all decoding together, assigned round-robin to the adapters. A
short warm-up batch loads the adapters first; the median of ``--repeats`` timed batches counts. Each LoRA engine also
serves the batch as base-model requests: what enabling LoRA costs by itself.

The limit from the shapes. Per generated token, a decode step costs at least the base model's own work, plus the
token's adapter multiply-adds, plus reading the weights of every distinct adapter in the batch once per step:

    t_limit = t_base * (1 + P_adapter / P_base) + N * B_adapter / (BW * R)

with t_base the measured seconds per generated token of the base model (LoRA disabled); P_adapter and P_base the
weights of the adapter's and the base model's matrix multiplications (every projection and the LM head); N the distinct
adapters in the batch, B_adapter the bytes of one as served (floats in the serving dtype, indices as stored); BW the
memory read bandwidth measured in this process; R the tokens of a decode step (the requests). Limit tokens/s is
1 / t_limit: an implementation that reads each adapter once per step and adds no other work reaches it. Adapter bytes
are counted on top of the base work, not hidden behind it (the base step is itself mostly bound by its weight reads).

Targets (issue 7): with 16 adapters, S2FT >= 0.75x the base model and >= 2.5x LoRA; at every count, S2FT within 85%
of its limit. The run prints whether each is met.

    python benchmarks/vllm_throughput.py [--requests 64] [--max-tokens 64] [--repeats 3] [--hidden 1024] ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import date

import torch
from vllm_common import (
    add_model_args,
    adapter_read_bytes,
    base_linear_parameters,
    describe,
    folder_bytes,
    parse,
    read_bandwidth,
    s2ft_engine_rank,
    save_adapters,
    save_base,
    start_engine,
    stop_engine,
    synchronize,
)

COUNTS = (1, 4, 16, 64)
TARGET_VS_BASE, TARGET_VS_LORA, TARGET_OF_LIMIT, TARGET_COUNT = 0.75, 2.5, 0.85, 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per batch, all decoding together")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per configuration (median reported)")
    add_model_args(parser)
    args = parse(parser)
    if args.requests < max(COUNTS):
        parser.error(f"--requests must be at least {max(COUNTS)} so that every adapter gets a request")
    return args


def measure(llm, requests, args) -> float:
    """Generated tokens per second for the batch with ``requests`` (one LoRARequest or None per prompt)."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[3 + (7 * r + 11 * t) % 370 for t in range(args.prompt_tokens)])
               for r in range(args.requests)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), lora_request=requests,
                 use_tqdm=False)  # loads the adapters into their slots
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    times = []
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        synchronize()
        times.append(time.perf_counter() - start)
    return sum(len(output.outputs[0].token_ids) for output in outputs) / statistics.median(times)


def serve(base_dir, folders, max_lora_rank, args) -> dict:
    """{"base": tokens/s of base requests, N: tokens/s with N adapters} on one engine holding every adapter."""
    from vllm.lora.request import LoRARequest

    llm = start_engine(base_dir, args, max_loras=max(COUNTS), max_lora_rank=max_lora_rank, **engine_shape(args))
    adapters = [LoRARequest(os.path.basename(path), i + 1, path) for i, path in enumerate(folders)]
    rates = {"base": measure(llm, [None] * args.requests, args)}
    for count in COUNTS:
        rates[count] = measure(llm, [adapters[r % count] for r in range(args.requests)], args)
    stop_engine(llm)
    return rates


def engine_shape(args) -> dict:
    return dict(max_model_len=args.prompt_tokens + args.max_tokens + 8, max_num_seqs=args.requests,
                max_num_batched_tokens=max(2048, args.requests * args.prompt_tokens))


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines one after another in this process
    from vllm_ext.convert import lora_rank

    with tempfile.TemporaryDirectory() as root:
        base_dir = save_base(args, root)
        folders, parameters = save_adapters(base_dir, args, root, max(COUNTS))
        base_parameters = base_linear_parameters(base_dir)
        served_bytes = {method: adapter_read_bytes(folders[method][0], args.dtype) for method in ("s2ft", "lora")}
        disk_bytes = {method: folder_bytes(folders[method][0]) for method in ("s2ft", "lora")}

        llm = start_engine(base_dir, args, **engine_shape(args))
        base_rate = measure(llm, [None] * args.requests, args)
        bandwidth = read_bandwidth(args.platform)  # after the engine pinned this process's threads
        stop_engine(llm)
        ranks = {"s2ft": s2ft_engine_rank(folders["s2ft"][0]), "lora": lora_rank(parameters["lora_rank"])}
        rates = {method: serve(base_dir, folders[method], ranks[method], args) for method in ("s2ft", "lora")}

    def limit(method, count):
        seconds = (1 + parameters[method] / base_parameters) / base_rate
        seconds += count * served_bytes[method] / (bandwidth * args.requests)
        return 1 / seconds

    mib = 2**20
    print(f"\n{date.today()}, {describe(args)}")
    print(f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.max_tokens} generated) tokens, greedy, "
          f"median of {args.repeats} batches; memory read bandwidth measured here {bandwidth / 1e9:.1f} GB/s")
    width = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    print(f"base model: {base_parameters:,} matrix weights, {base_parameters * width / mib:.0f} MiB read per step")
    for method, label in (("s2ft", "S2FT"), ("lora", f"LoRA r={parameters['lora_rank']}")):
        print(f"{label} adapter: {parameters[method]:,} parameters ({parameters[method] / base_parameters:.1%} of the "
              f"base), {served_bytes[method] / mib:.2f} MiB as served, {disk_bytes[method] / mib:.2f} MiB on disk; "
              f"engine max_lora_rank {ranks[method]}")
    print("\n| adapters | configuration | tokens/s | vs base | vs LoRA | limit (tokens/s) | of limit |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| 0 | base model, LoRA disabled | {base_rate:.1f} | 1.00x | | | |")
    for method, label in (("s2ft", "S2FT engine"), ("lora", "LoRA engine")):
        print(f"| 0 | base requests on the {label} | {rates[method]['base']:.1f} | "
              f"{rates[method]['base'] / base_rate:.2f}x | | | |")
    for count in COUNTS:
        for method, label in (("s2ft", "S2FT"), ("lora", f"LoRA r={parameters['lora_rank']}, equal parameters")):
            rate = rates[method][count]
            print(f"| {count} | {label} | {rate:.1f} | {rate / base_rate:.2f}x | {rate / rates['lora'][count]:.2f}x | "
                  f"{limit(method, count):.1f} | {rate / limit(method, count):.0%} |")

    s2ft, lora = rates["s2ft"], rates["lora"]
    checks = [
        (f"{TARGET_COUNT} adapters: S2FT >= {TARGET_VS_BASE}x the base model", s2ft[TARGET_COUNT] / base_rate,
         TARGET_VS_BASE, "x"),
        (f"{TARGET_COUNT} adapters: S2FT >= {TARGET_VS_LORA}x equal-parameter LoRA",
         s2ft[TARGET_COUNT] / lora[TARGET_COUNT], TARGET_VS_LORA, "x"),
        *((f"{count} adapters: S2FT >= {TARGET_OF_LIMIT:.0%} of its limit", s2ft[count] / limit("s2ft", count),
           TARGET_OF_LIMIT, "%") for count in COUNTS),
    ]
    print()
    for text, value, target, unit in checks:
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
        print(f"target {text}: {shown}, {'met' if value >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
