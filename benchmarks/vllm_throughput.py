"""vLLM serving throughput with 1, 4, 16 and 64 distinct adapters: S2FT vs LoRA of equal parameter count vs the base
model, each beside the limit worked out from the shapes, in one process.

Three engines (vLLM's default engine-core processes) serve side by side: the base model with LoRA disabled, an S2FT
engine and a LoRA engine, each of the last two with ``max_loras`` = the largest count (no count evicts an adapter).
The S2FT engine's S2FT buffers hold exactly the adapters' k (``VLLM_S2FT_MAX_K``) and its LoRA buffers vLLM's
smallest rank; the LoRA engine has the smallest ``max_lora_rank`` its adapters allow and no S2FT buffers. Every configuration generates the same batch: ``--requests``
prompts of ``--prompt-tokens`` tokens, ``--max-tokens`` greedy tokens each (``ignore_eos``), all decoding together,
assigned round-robin to the adapters; each adapter engine also serves it as base-model requests (what enabling LoRA
costs by itself). A short warm-up batch per configuration loads its adapters; then ``--repeats`` rounds run one batch
of every configuration each, in a rotated order, so that a busy spell of the machine hits every configuration alike;
the median batch counts.

The limit from the shapes. Per generated token, a decode step costs at least the base model's own work, plus the
token's adapter multiply-adds, plus reading the weights of every distinct adapter in the batch once per step:

    t_limit = t_base * (1 + P_adapter / P_base) + N * B_adapter / (BW * R)

with t_base the measured seconds per generated token of the base model (LoRA disabled); P_adapter and P_base the
weights of the adapter's and the base model's matrix multiplications (every projection and the LM head); N the distinct
adapters in the batch, B_adapter the bytes of one as served (floats in the serving dtype, indices as stored); BW the
memory read bandwidth measured in this process; R the tokens of a decode step (the requests). Limit tokens/s is
1 / t_limit: what an implementation reaches that reads each adapter once per step, adds no other work, and does not
overlap those reads with the base model's work.

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
    worker_read_bandwidth,
    S2FT_ENGINE_RANK,
    s2ft_max_k,
    save_adapters,
    save_base,
    start_engine,
    stop_engine,
    synchronize,
)

COUNTS = (1, 4, 16, 64)
METHODS = ("s2ft", "lora")
TARGET_VS_BASE, TARGET_VS_LORA, TARGET_OF_LIMIT, TARGET_COUNT = 0.75, 2.5, 0.85, 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per batch, all decoding together")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=40, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per configuration (median reported)")
    add_model_args(parser)
    args = parse(parser)
    if args.requests < max(COUNTS):
        parser.error(f"--requests must be at least {max(COUNTS)} so that every adapter gets a request")
    return args


def prompts(args):
    from vllm import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[3 + (7 * r + 11 * t) % 370 for t in range(args.prompt_tokens)])
            for r in range(args.requests)]


def timed_batch(llm, requests, args, max_tokens: int) -> float:
    """Seconds of one batch with ``requests`` (one LoRARequest or None per prompt), every request ``max_tokens``
    tokens long."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts(args), params, lora_request=requests, use_tqdm=False)
    synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    if generated != max_tokens * len(requests):
        raise RuntimeError(f"the engine generated {generated} tokens, not {max_tokens} x {len(requests)}")
    return seconds


def engine_shape(args) -> dict:
    return dict(max_model_len=args.prompt_tokens + args.max_tokens + 8, max_num_seqs=args.requests,
                max_num_batched_tokens=max(2048, args.requests * args.prompt_tokens))


def main():
    args = parse_args()
    # lets collective_rpc send the bandwidth measurement to an engine's worker process (local processes only)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm.lora.request import LoRARequest

    from vllm_ext.convert import lora_rank

    with tempfile.TemporaryDirectory() as root:
        base_dir = save_base(args, root)
        folders, parameters = save_adapters(base_dir, args, root, max(COUNTS))
        base_parameters = base_linear_parameters(base_dir)
        served_bytes = {method: adapter_read_bytes(folders[method][0], args.dtype) for method in METHODS}
        disk_bytes = {method: folder_bytes(folders[method][0]) for method in METHODS}
        ranks = {"s2ft": S2FT_ENGINE_RANK, "lora": lora_rank(parameters["lora_rank"])}
        max_k = {"s2ft": s2ft_max_k(folders["s2ft"][0]), "lora": "0"}
        engines = {"base": start_engine(base_dir, args, **engine_shape(args))}
        for method in ("lora", "s2ft"):  # the S2FT engine last: its setting stays for the front end's checks
            engines[method] = start_engine(base_dir, args, max_loras=max(COUNTS), max_lora_rank=ranks[method],
                                           s2ft_max_k=max_k[method], **engine_shape(args))
        bandwidth = engines["base"].collective_rpc(worker_read_bandwidth, args=(args.platform,))[0]
        # (engine, adapters) -> the batch's requests; 0 adapters: base-model requests
        batches = {("base", 0): [None] * args.requests}
        for method in METHODS:
            adapters = [LoRARequest(os.path.basename(path), i + 1, path) for i, path in enumerate(folders[method])]
            batches[(method, 0)] = [None] * args.requests
            batches.update({(method, count): [adapters[r % count] for r in range(args.requests)] for count in COUNTS})
        for (engine, _), requests in batches.items():  # warm-up; loads every adapter into its slot
            timed_batch(engines[engine], requests, args, max_tokens=2)
        seconds = {config: [] for config in batches}
        order = list(batches)
        for repeat in range(args.repeats):  # one batch of each configuration per round, the order rotated
            shift = repeat * len(order) // args.repeats
            for config in order[shift:] + order[:shift]:
                seconds[config].append(timed_batch(engines[config[0]], batches[config], args, args.max_tokens))
        for llm in engines.values():
            stop_engine(llm)
    rate = {config: args.requests * args.max_tokens / statistics.median(values) for config, values in seconds.items()}
    base_rate = rate[("base", 0)]

    def limit(method, count):
        per_token = (1 + parameters[method] / base_parameters) / base_rate
        per_token += count * served_bytes[method] / (bandwidth * args.requests)
        return 1 / per_token

    mib = 2**20
    print(f"\n{date.today()}, {describe(args)}")
    print(f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.max_tokens} generated) tokens, greedy, "
          f"median of {args.repeats} batches; memory read bandwidth measured here {bandwidth / 1e9:.1f} GB/s")
    width = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    print(f"base model: {base_parameters:,} matrix weights, {base_parameters * width / mib:.0f} MiB read per step")
    for method, label in (("s2ft", "S2FT"), ("lora", f"LoRA r={parameters['lora_rank']}")):
        print(f"{label} adapter: {parameters[method]:,} parameters ({parameters[method] / base_parameters:.1%} of the "
              f"base), {served_bytes[method] / mib:.2f} MiB as served, {disk_bytes[method] / mib:.2f} MiB on disk; "
              f"engine max_lora_rank {ranks[method]}, VLLM_S2FT_MAX_K={max_k[method]}")
    print("\n| adapters | configuration | tokens/s | vs base | vs LoRA | limit (tokens/s) | of limit |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| 0 | base model, LoRA disabled | {base_rate:.1f} | 1.00x | | | |")
    for method, label in (("s2ft", "S2FT engine"), ("lora", "LoRA engine")):
        print(f"| 0 | base requests on the {label} | {rate[(method, 0)]:.1f} | {rate[(method, 0)] / base_rate:.2f}x "
              "| | | |")
    for count in COUNTS:
        for method, label in (("s2ft", "S2FT"), ("lora", f"LoRA r={parameters['lora_rank']}, equal parameters")):
            value = rate[(method, count)]
            print(f"| {count} | {label} | {value:.1f} | {value / base_rate:.2f}x | "
                  f"{value / rate[('lora', count)]:.2f}x | {limit(method, count):.1f} | "
                  f"{value / limit(method, count):.0%} |")

    s2ft = {count: rate[("s2ft", count)] for count in COUNTS}
    lora = {count: rate[("lora", count)] for count in COUNTS}
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
