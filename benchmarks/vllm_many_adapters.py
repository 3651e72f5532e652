"""A thousand adapters on one engine: a stream of requests whose adapters follow a Zipf and a uniform distribution,
with far fewer slots (``max_loras``) and CPU-cached adapters (``max_cpu_loras``) than adapters; S2FT vs LoRA of equal
parameter count vs the base model, in one process.

``--adapters`` S2FT adapters and as many LoRA adapters of the rank whose parameter count is closest are written to disk
(one of each is trained-format output of PEFT, the others copies of it with random deltas and, for S2FT, random
indices of whole heads and channels in the counts its config gives). Each engine runs in this process, one after
another: the base model (LoRA disabled), an S2FT engine (S2FT buffers of exactly the adapters' k, vLLM's smallest LoRA
rank) and a LoRA engine (the smallest ``max_lora_rank`` its adapters allow, no S2FT buffers), both with ``--max-loras``
slots and a CPU cache of ``--max-cpu-loras`` adapters. Every engine serves the same streams: ``--requests`` requests of
``--prompt-tokens`` prompt and ``--max-tokens`` generated tokens (greedy, ``ignore_eos``), submitted in a closed loop
that keeps ``--concurrency`` requests in flight, the i-th request naming adapter ``a_i`` drawn (seeded) from

- ``zipf``: P(the adapter of popularity rank r) proportional to r^-s (``--zipf-s``), ranks given to the adapters in a
  random order;
- ``uniform``: every adapter alike.

Before each stream a short warm-up stream (other seed) loads adapters, so the timed one starts from a warm engine (and
a page cache that holds the adapters' files, as on a server whose disk cache is warm). Reported per engine and
distribution: generated tokens per second (and against the base model and LoRA), p50/p99 latency from submission to
the last token, and where the adapters came from: slot loads (an adapter entering a slot: vLLM's
``activate_adapter`` of an adapter not in a slot), the share of them served from vLLM's CPU cache rather than disk
(CPU-cache hit rate), and requests per slot load (each request whose adapter was already in a slot needs none).

Slots bound how many distinct adapters one batch can hold (vLLM schedules a request only when its adapter has or can
get a slot), so with fewer slots than requests in flight both adapter engines batch fewer requests than the base
model whatever their adapters cost; the default gives as many slots as requests in flight (32, an S2FT slot costing
one adapter's bytes) and a CPU cache of 128 of the 1,000 adapters.

Targets (issue 18): S2FT >= 0.6x the base model and >= 2x LoRA, with each distribution. The run prints whether each is
met. The default sizes finish in about 10 minutes on a 2-core CPU; ``--adapters 100 --requests 48`` is a quick check.

    python benchmarks/vllm_many_adapters.py [--adapters 1000] [--requests 256] [--concurrency 32] [--max-loras 16] ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import date

import numpy as np
import torch
from vllm_common import (
    add_model_args,
    describe,
    folder_bytes,
    parse,
    S2FT_ENGINE_RANK,
    s2ft_max_k,
    save_adapters,
    save_base,
    start_engine,
    stop_engine,
)

METHODS = ("s2ft", "lora")
DISTRIBUTIONS = ("zipf", "uniform")
TARGET_VS_BASE, TARGET_VS_LORA = 0.6, 2.0
WARMUP_REQUESTS = 32


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters per method on disk")
    parser.add_argument("--requests", type=int, default=256, help="requests per timed stream")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (closed loop)")
    parser.add_argument("--max-loras", type=int, default=32, help="adapter slots of the adapter engines")
    parser.add_argument("--max-cpu-loras", type=int, default=128, help="adapters vLLM's CPU cache holds")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent")
    parser.add_argument("--seed", type=int, default=0)
    add_model_args(parser)
    parser.set_defaults(s2ft_heads=1, s2ft_channels=64)  # about 1% of the base's matrix weights per adapter
    args = parse(parser)
    if args.max_cpu_loras < args.max_loras:
        parser.error("--max-cpu-loras must be at least --max-loras (vLLM's rule)")
    return args


def clone_adapters(template: str, method: str, count: int, root: str, base_config) -> list[str]:
    """``count`` folders with ``template``'s config and tensors of its names and shapes, random: deltas (LoRA
    factors) and, for S2FT, indices of random whole units (heads of the attention projections, channels of the FFN
    ones) in the counts the config selects, so every copy passes the checks PEFT's loader makes."""
    from safetensors.torch import load_file, save_file

    from vllm_ext.adapter import PREFIX
    from vllm_ext.validation import adapted_projections

    with open(os.path.join(template, "adapter_config.json")) as f:
        config = json.load(f)
    shapes = {key: (tensor.shape, tensor.dtype) for key, tensor in load_file(
        os.path.join(template, "adapter_model.safetensors")).items()}
    projections = adapted_projections(config, base_config) if method == "s2ft" else {}
    generator = torch.Generator().manual_seed(len(template))
    folders = []
    for i in range(count):
        folder = os.path.join(root, f"{method}-{i:04d}")
        os.makedirs(folder)
        shutil.copy(os.path.join(template, "adapter_config.json"), folder)
        tensors = {}
        for key, (shape, dtype) in shapes.items():
            module, _, kind = key.removeprefix(PREFIX).rpartition(".")
            if kind == "s2ft_indices":
                projection = projections[module]
                units = torch.randperm(projection.axis_size // projection.unit_size, generator=generator)
                units = units[: projection.count // projection.unit_size].sort().values
                tensors[key] = (units[:, None] * projection.unit_size + torch.arange(projection.unit_size)).flatten()
            else:
                scale = 0.02 if "lora_A" not in key else shape[-1] ** -0.5
                tensors[key] = (torch.randn(shape, generator=generator) * scale).to(dtype)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        folders.append(folder)
    return folders


def stream(distribution: str, count: int, requests: int, args, seed: int) -> list[int]:
    """The adapter index of each request."""
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        return rng.integers(0, count, size=requests).tolist()
    weights = np.arange(1, count + 1, dtype=np.float64) ** -args.zipf_s
    ranks = rng.choice(count, size=requests, p=weights / weights.sum())
    return rng.permutation(count)[ranks].tolist()


class SlotLoads:
    """Counts adapters entering a slot in the engine (in this process), and how many of them were read from disk."""

    def __init__(self):
        from vllm.lora.model_manager import LRUCacheLoRAModelManager
        from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

        self.slot = self.disk = 0
        activate, load = LRUCacheLoRAModelManager.activate_adapter, LRUCacheWorkerLoRAManager._load_adapter

        def counted_activate(manager, lora_id):
            self.slot += lora_id not in manager._active_adapters
            return activate(manager, lora_id)

        def counted_load(worker_manager, request):
            self.disk += 1
            return load(worker_manager, request)

        LRUCacheLoRAModelManager.activate_adapter = counted_activate
        LRUCacheWorkerLoRAManager._load_adapter = counted_load

    def reset(self) -> tuple[int, int]:
        counts, (self.slot, self.disk) = (self.slot, self.disk), (0, 0)
        return counts


def run_stream(llm, adapters: list, args, name: str) -> dict:
    """Serve ``adapters`` (a LoRARequest or None per request) in a closed loop of ``--concurrency`` requests, whose
    ids start with ``name``."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    submitted, latencies, generated = {}, [], 0
    queue = list(enumerate(adapters))[::-1]
    start = time.perf_counter()
    while queue or submitted:
        while queue and len(submitted) < args.concurrency:
            i, request = queue.pop()
            prompt = [3 + (7 * i + 11 * t) % 370 for t in range(args.prompt_tokens)]
            engine.add_request(f"{name}-{i}", TokensPrompt(prompt_token_ids=prompt), params, lora_request=request)
            submitted[f"{name}-{i}"] = time.perf_counter()
        for output in engine.step():
            if output.finished:
                latencies.append(time.perf_counter() - submitted.pop(output.request_id))
                generated += len(output.outputs[0].token_ids)
    seconds = time.perf_counter() - start
    if generated != args.max_tokens * len(adapters):
        raise RuntimeError(f"the engine generated {generated} tokens, not {args.max_tokens} x {len(adapters)}")
    latencies.sort()
    return dict(rate=generated / seconds, p50=statistics.median(latencies),
                p99=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])


def serve(engine: str, base_dir: str, folders: dict, ranks: dict, max_k: dict, loads: SlotLoads, args) -> dict:
    """{distribution: stream results (and slot loads)} of one engine, started and stopped here."""
    from vllm.lora.request import LoRARequest

    shape = dict(max_model_len=args.prompt_tokens + args.max_tokens + 8, max_num_seqs=args.concurrency,
                 max_num_batched_tokens=max(2048, args.concurrency * args.prompt_tokens))
    if engine == "base":
        llm = start_engine(base_dir, args, **shape)
    else:
        llm = start_engine(base_dir, args, max_loras=args.max_loras, max_lora_rank=ranks[engine],
                           s2ft_max_k=max_k[engine], max_cpu_loras=args.max_cpu_loras, **shape)
    requests = [LoRARequest(f"{engine}-{i}", i + 1, path) for i, path in enumerate(folders.get(engine, []))]
    results = {}
    for number, distribution in enumerate(DISTRIBUTIONS):
        def named(indices):
            return [requests[i] if requests else None for i in indices]

        warmup = stream(distribution, args.adapters, WARMUP_REQUESTS, args, seed=args.seed + 1000 + number)
        run_stream(llm, named(warmup), args, f"{distribution}-warmup")
        loads.reset()
        results[distribution] = run_stream(llm, named(stream(distribution, args.adapters, args.requests, args,
                                                             seed=args.seed + number)), args, distribution)
        results[distribution]["slot"], results[distribution]["disk"] = loads.reset()
    stop_engine(llm)
    return results


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines one after another, in this process
    from transformers import AutoConfig

    from vllm_ext.convert import lora_rank
    from vllm_ext.plugin import register

    register()  # the plugin's loader first: SlotLoads counts around it
    loads = SlotLoads()
    with tempfile.TemporaryDirectory() as root:
        base_dir = save_base(args, root)
        templates, parameters = save_adapters(base_dir, args, os.path.join(root, "templates"), 1)
        started = time.perf_counter()
        folders = {method: clone_adapters(templates[method][0], method, args.adapters, root,
                                          AutoConfig.from_pretrained(base_dir)) for method in METHODS}
        written = time.perf_counter() - started
        ranks = {"s2ft": S2FT_ENGINE_RANK, "lora": lora_rank(parameters["lora_rank"])}
        max_k = {"s2ft": s2ft_max_k(folders["s2ft"][0]), "lora": "0"}
        disk = {method: folder_bytes(folders[method][0]) for method in METHODS}
        results = {engine: serve(engine, base_dir, folders, ranks, max_k, loads, args)
                   for engine in ("base", "lora", "s2ft")}  # the S2FT engine last: its setting stays set

    mib = 2**20
    labels = {"base": "base model, LoRA disabled", "s2ft": "S2FT",
              "lora": f"LoRA r={parameters['lora_rank']}, equal parameters"}
    print(f"\n{date.today()}, {describe(args)}")
    print(f"{args.adapters} adapters per method ({args.adapters * disk['s2ft'] / mib:.0f} MiB S2FT, "
          f"{args.adapters * disk['lora'] / mib:.0f} MiB LoRA on disk, written in {written:.0f} s); S2FT adapter: "
          f"{parameters['s2ft']:,} parameters ({args.s2ft_heads} heads, {args.s2ft_channels} channels per block), "
          f"LoRA r={parameters['lora_rank']}: {parameters['lora']:,}")
    print(f"adapter engines: max_loras={args.max_loras}, max_cpu_loras={args.max_cpu_loras}; streams of "
          f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.max_tokens} generated) tokens, "
          f"{args.concurrency} in flight, Zipf s={args.zipf_s}")
    print("\n| adapters drawn | configuration | tokens/s | vs base | vs LoRA | p50 latency (s) | p99 latency (s) | "
          "slot loads | from CPU cache | requests per slot load |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for distribution in DISTRIBUTIONS:
        base_rate = results["base"][distribution]["rate"]
        lora_rate = results["lora"][distribution]["rate"]
        for engine in ("base", "s2ft", "lora"):
            result = results[engine][distribution]
            row = (f"| {distribution} | {labels[engine]} | {result['rate']:.1f} | {result['rate'] / base_rate:.2f}x | "
                   + (f"{result['rate'] / lora_rate:.2f}x" if engine != "base" else "")
                   + f" | {result['p50']:.2f} | {result['p99']:.2f} | ")
            if engine == "base":
                row += " | | |"
            else:
                slot, from_disk = result["slot"], result["disk"]
                hit = f"{(slot - from_disk) / slot:.0%}" if slot else "-"
                row += f"{slot} | {hit} | {args.requests / slot if slot else float('inf'):.1f} |"
            print(row)
    print()
    for distribution in DISTRIBUTIONS:
        s2ft = results["s2ft"][distribution]["rate"]
        for text, value, target in (
            (f"{distribution}: S2FT >= {TARGET_VS_BASE}x the base model", s2ft / results["base"][distribution]["rate"],
             TARGET_VS_BASE),
            (f"{distribution}: S2FT >= {TARGET_VS_LORA}x equal-parameter LoRA",
             s2ft / results["lora"][distribution]["rate"], TARGET_VS_LORA),
        ):
            print(f"target {text}: {value:.2f}x, {'met' if value >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
