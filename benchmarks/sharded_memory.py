"""Per-rank training memory of S2FT vs LoRA (equal trainable parameters) under DDP, FSDP2 and FSDP1, 2 processes.

The FSDP auto-wrap policy is the one transformers' Trainer (and so TRL's SFTTrainer) sets for PEFT models: each decoder
layer, plus each leaf module with a trainable ``weight`` (LoRA's A and B) as a unit of its own. Counted on each rank
after one AdamW step, storages deduplicated: the parameters the rank holds (FSDP keeps 1/N of
each wrapped unit, DDP a whole replica), the gradients it holds (FSDP1 keeps one gradient for each flat parameter,
frozen entries included, wherever a unit mixes frozen and trainable weights), and the AdamW state. Activations are the
same under every engine and are left out (see train_step.py). The limit worked out from the shapes is printed beside:
weights / N plus trainable x (grad + 2 AdamW moments) / N.

    python benchmarks/sharded_memory.py          # launches every (engine, method) pair and prints the table

Without GPUs, FSDP runs on CPU processes through tests/accelerate_cpu_launch.py (accelerate enables FSDP only on
accelerators); DDP uses trl_examples/accelerate_multi_cpu.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = {  # name -> (accelerate config, launch through the CPU wrapper)
    "DDP": ("accelerate_multi_cpu.yaml", False),
    "FSDP2": ("accelerate_fsdp2.yaml", True),
    "FSDP1": ("accelerate_fsdp1.yaml", True),
}
METHODS = ("s2ft", "lora")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "METHOD"), help="internal: one launched run")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    return parser.parse_args()


def model_args(args) -> list[str]:
    return [f"--{name}={getattr(args, name)}" for name in ("hidden", "intermediate", "heads", "layers", "vocab", "seq",
                                                           "batch")]


def build(method: str, args):
    from peft import LoraConfig, get_peft_model

    from common import LORA_TARGETS, equal_parameter_rank
    from s2ft_plugin import S2FTConfig
    from s2ft_plugin.tiny import build_model

    model = build_model("llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=args.seq)
    model.config.use_cache = False
    s2ft = S2FTConfig(task_type="CAUSAL_LM")
    if method == "s2ft":
        return get_peft_model(model, s2ft)
    rank = equal_parameter_rank(model, s2ft, LORA_TARGETS["lora"])
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS["lora"]))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat parameter count once)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None and tensor.numel():
            storage = _local(tensor).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def worker(engine: str, method: str, args) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers.integrations.fsdp import update_fsdp_plugin_peft

    accelerator = Accelerator()
    model = build(method, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if accelerator.distributed_type == DistributedType.FSDP:  # as transformers' Trainer does for PEFT models
        update_fsdp_plugin_peft(model, accelerator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(accelerator.process_index)
    batch = torch.randint(3, args.vocab, (args.batch, args.seq), generator=generator)
    model.train()
    accelerator.backward(model(input_ids=batch, labels=batch).loss)
    flat = [module._flat_param for module in model.modules() if getattr(module, "_flat_param", None) is not None]
    parameters = list(model.parameters()) + flat
    grads = _bytes(p.grad for p in parameters)
    optimizer.step()
    state = _bytes(value for per_param in optimizer.state.values() for value in per_param.values()
                   if torch.is_tensor(value) and value.dim() > 0)
    measured = torch.tensor([_bytes(parameters), grads, state], dtype=torch.float64)
    gathered = accelerator.gather(measured.view(1, -1))
    if accelerator.is_main_process:
        worst = gathered.max(0).values.tolist()
        print(json.dumps(dict(engine=engine, method=method, trainable=trainable, total=total,
                              params=worst[0], grads=worst[1], adam=worst[2])), flush=True)


def launch(engine: str, method: str, args) -> dict:
    config, through_wrapper = ENGINES[engine]
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "trl_examples", config), "--main_process_port", "29581"]
    if through_wrapper:
        command += ["--mixed_precision", "no", os.path.join(ROOT, "tests", "accelerate_cpu_launch.py")]
    command += [os.path.abspath(__file__), "--worker", engine, method, *model_args(args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.path.join(ROOT, "benchmarks"),
                                                                       os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"{engine}/{method} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    mib, world = 2**20, 2
    print(f"{date.today()}, {platform.machine()}, torch {torch.__version__}, fp32, {world} processes (gloo), "
          f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, {args.layers} layers, "
          f"vocab {args.vocab}, {args.batch} x {args.seq} tokens per rank, AdamW.")
    print("| engine | method | trainable params | params held (MiB) | grads (MiB) | AdamW state (MiB) | "
          "total (MiB) | vs DDP same method | limit from shapes (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    results = {(engine, method): launch(engine, method, args) for engine in ENGINES for method in METHODS}
    for (engine, method), row in results.items():
        total = row["params"] + row["grads"] + row["adam"]
        ddp = results[("DDP", method)]
        ddp_total = ddp["params"] + ddp["grads"] + ddp["adam"]
        shards = 1 if engine == "DDP" else world
        limit = (row["total"] * 4 + row["trainable"] * 4 * 3) / shards
        print(f"| {engine} | {method} | {row['trainable']:,} | {row['params'] / mib:.1f} | {row['grads'] / mib:.1f} | "
              f"{row['adam'] / mib:.1f} | {total / mib:.1f} | {total / ddp_total:.3f}x | {limit / mib:.1f} |")


if __name__ == "__main__":
    main()
