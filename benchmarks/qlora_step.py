"""QLoRA-style training on a bitsandbytes 4-bit (nf4) base: step time and peak memory of S2FT vs PEFT LoRA at equal
trainable parameters, and the frozen 4-bit floor, side by side in one process.

Every method trains the same randomly initialised Llama, quantized to nf4 by transformers/bitsandbytes, on the same
batch with AdamW (no gradient checkpointing, no autocast). The floor freezes everything and backpropagates to the input
embeddings only: the activation-gradient work any adapter needs. LoRA runs at S2FT's trainable-parameter count on the
same projections (o_proj, down_proj) and on all linear projections (the usual QLoRA recipe), without dropout.

Memory, on CPU where no allocator statistics exist:
- saved activations: bytes of the tensors autograd saves for backward during one forward (saved-tensor hooks,
  storages deduplicated, weights excluded), exact and deterministic;
- peak RSS over a step: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs before
  the step) minus its resident size when the step starts. It covers activations, gradients, optimizer state and
  every temporary (bitsandbytes dequantizes each 4-bit weight for its matmuls), but moves with the allocator.

    python benchmarks/qlora_step.py [--hidden 768] [--layers 4] [--batch 4] [--seq 256] ...
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from datetime import date

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from common import LORA_TARGETS, adamw, equal_parameter_rank, saved_activation_bytes, step
from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import build_model

METHODS = ("floor", "s2ft", "lora", "lora_all_linear")
LABELS = {"floor": "frozen 4-bit floor", "s2ft": "S2FT (o_proj, down_proj)", "lora": "LoRA (o_proj, down_proj)",
          "lora_all_linear": "LoRA (all linear)"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=1, help="S2FT heads per block")
    parser.add_argument("--num-channels", type=int, default=27, help="S2FT channels per block")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parser.parse_args()


def build(method: str, path: str, args):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_type,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    model.config.use_cache = False
    s2ft_config = S2FTConfig(task_type="CAUSAL_LM", num_heads=args.num_heads, num_channels=args.num_channels,
                             permute=False)
    if method == "s2ft":
        model = get_peft_model(model, s2ft_config)
    elif method != "floor":
        targets = LORA_TARGETS[method]
        rank = equal_parameter_rank(model, s2ft_config, targets)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                 target_modules=targets))
    if method == "floor":
        model.requires_grad_(False)
    model.enable_input_require_grads()  # every method backpropagates to the embeddings' output, like the floor
    return model.train()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  glibc only
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _glibc()
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def peak_rss_bytes(model, optimizer, batch) -> int | None:
    if LIBC is not None:
        LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return None
    start = _status_kib("VmRSS")
    step(model, optimizer, batch)
    return (_status_kib("VmHWM") - start) * 1024


def measure(path: str, batch, args) -> list[dict]:
    runs = {}
    for method in METHODS:
        model = build(method, path, args)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[method] = (model, params, adamw(params) if params else None)
    results = {}
    # memory first: blocks of 64 KiB and more come from and go back to the OS at once, so the high-water mark sees
    # what is live (glibc's default dynamic threshold keeps freed activations resident, hiding them)
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 16)
    for method, (model, params, optimizer) in runs.items():
        step(model, optimizer, batch)  # creates the optimizer state
        results[method] = dict(
            method=method,
            trainable=sum(p.numel() for p in params),
            saved=saved_activation_bytes(model, batch),
            state=sum(p.numel() * p.element_size() * 4 for p in params),  # weights + grads + 2 AdamW moments
            rss=peak_rss_bytes(model, optimizer, batch),
            rank=model.peft_config["default"].r if method.startswith("lora") else None,
        )
    # then time round-robin (one step of each method per round, so a busy machine slows them alike), with large
    # blocks reused from the heap as glibc's dynamic threshold does once warm: page-faulting every one would add
    # system time in proportion to each method's allocations
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        LIBC.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    times = {method: [] for method in METHODS}
    for round_ in range(args.warmup + args.steps):
        for method, (model, _, optimizer) in runs.items():
            start = time.perf_counter()
            step(model, optimizer, batch)
            if round_ >= args.warmup:
                times[method].append(time.perf_counter() - start)
    for method, result in results.items():
        result.update(step_s=statistics.median(times[method]), spread=(min(times[method]), max(times[method])))
    return list(results.values())


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model")
        build_model(
            "llama", hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
            max_position_embeddings=args.seq,
        ).save_pretrained(path)
        batch = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        results = measure(path, batch, args)

    floor = results[0]
    print(f"date {date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.quant_type} base: Llama hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.heads} heads, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x "
          f"{args.seq} tokens; median of {args.steps} steps after {args.warmup} warm-up, methods round-robin\n")
    print("| method | trainable params | step time (s) | min-max (s) | vs floor | saved activations (MiB) "
          "| over floor (MiB) | adapter + grads + AdamW (MiB) | peak RSS over step (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        label = LABELS[r["method"]] + (f", r={r['rank']}" if r["rank"] else "")
        print(f"| {label} | {r['trainable']:,} | {r['step_s']:.3f} | {r['spread'][0]:.2f}-{r['spread'][1]:.2f} "
              f"| {r['step_s'] / floor['step_s']:.2f}x "
              f"| {mib(r['saved'])} | {mib(r['saved'] - floor['saved'])} | {mib(r['state'])} | {mib(r['rss'])} |")


if __name__ == "__main__":
    main()
