"""Quality: does S2FT learn a new task like LoRA and forget less? A controlled pretrain-then-fine-tune experiment.

A small Llama built offline is pretrained on task family A (key -> value facts, and copy/reverse/increment rules; see
quality_tasks.py) until it masters it, and cached. It is then fine-tuned on task B only (a new task token asking for
reverse-and-increment, which composes two skills of A) by each method at equal trainable parameters: S2FT with every
selection strategy and order, PEFT LoRA on S2FT's projections and on all linear layers, PEFT SHiRA on S2FT's
projections, and full fine-tuning. Each method gets its learning rate from a sweep of 3 on B's validation split
(seed 0, as a practitioner tunes), then runs with more seeds at that rate.

Reported per method: B exact match on held-out inputs of the trained lengths (test) and on longer inputs B never shows
(held-out variation), A exact match after fine-tuning (retention: A is never replayed), the training loop's wall time,
and peak training memory counted from its parts (weights + gradients + AdamW state + the activations autograd saves
for backward, captured with saved-tensor hooks; common.peak_bytes). Runs go two at a time, one thread each.

    python benchmarks/quality.py            # ~12 min on 2 CPU cores the first time (pretraining is then cached)
    python benchmarks/quality.py --quick    # ~1 min smoke run of a micro configuration
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from peft import LoraConfig, ShiraConfig, get_peft_model

import quality_tasks as tasks
from common import LORA_TARGETS, equal_parameter_rank, peak_bytes, trainable
from s2ft_plugin import S2FTConfig, initialize_s2ft_selection
from s2ft_plugin.tiny import build_model

SCORED = ("weight", "activation", "weight_activation", "gradient")
S2FT_METHODS = ["s2ft_random"] + [f"s2ft_{selection}_{order}" for selection in SCORED for order in ("large", "small")]
METHODS = S2FT_METHODS + ["lora", "lora_all_linear", "shira", "full"]
LEARNING_RATES = {"s2ft": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2), "shira": (1e-3, 3e-3, 1e-2),
                  "full": (1e-4, 3e-4, 1e-3)}


@dataclass(frozen=True)
class Setup:
    """Everything that defines the experiment; the pretrained base is cached under a hash of its part of it."""

    hidden: int = 128
    intermediate: int = 512
    heads: int = 8
    layers: int = 4
    facts: int = 256
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    b_train: int = 2048
    b_validation: int = 256
    b_test: int = 512
    b_held_out: int = 512
    a_eval: int = 256
    steps: int = 150
    batch: int = 32
    calibration_batches: int = 8
    head_ratio: float = 0.125
    channel_ratio: float = 0.05
    seeds: int = 3
    methods: tuple = tuple(METHODS)

    def base_key(self) -> str:
        fields = ("hidden", "intermediate", "heads", "layers", "facts", "pretrain_steps", "pretrain_batch",
                  "pretrain_lr", "a_eval")
        key = json.dumps([getattr(self, name) for name in fields]) + inspect.getsource(tasks)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


QUICK = Setup(hidden=64, intermediate=256, heads=4, layers=2, facts=64, pretrain_steps=400, b_train=512,
              b_validation=64, b_test=128, b_held_out=128, a_eval=64, steps=60, calibration_batches=2, seeds=1,
              methods=("s2ft_random", "s2ft_activation_small", "lora", "full"))


def new_model(setup: Setup):
    return build_model("llama", hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                       num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                       num_key_value_heads=setup.heads, vocab_size=tasks.vocab_size(setup.facts), seed=0)


def linear_schedule(optimizer, steps: int, warmup: int, cosine: bool = False):
    def factor(step):
        progress = min(1.0, step / steps)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1 - progress
        return min(1.0, (step + 1) / warmup) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrained_base(setup: Setup, cache: str):
    """The model pretrained on A: loaded from ``cache`` or trained (2 threads) and saved there."""
    path = os.path.join(cache, f"base-{setup.base_key()}")
    model = new_model(setup)
    weights = os.path.join(path, "model.pt")
    if os.path.exists(weights):
        model.load_state_dict(torch.load(weights))
        return model, path
    print(f"pretraining on A ({setup.pretrain_steps} steps), cached under {path}", flush=True)
    values = tasks.fact_values(setup.facts, seed=0)
    stream = tasks.a_training_stream(values, seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), setup.pretrain_lr, weight_decay=0.0)
    schedule = linear_schedule(optimizer, setup.pretrain_steps, warmup=100, cosine=True)
    start = time.perf_counter()
    for _ in range(setup.pretrain_steps):
        model(**tasks.collate([next(stream) for _ in range(setup.pretrain_batch)])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    model.eval()
    print(f"pretrained in {time.perf_counter() - start:.0f} s", flush=True)
    os.makedirs(path, exist_ok=True)
    torch.save(model.state_dict(), weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    return model, path


def datasets(setup: Setup):
    values = tasks.fact_values(setup.facts, seed=0)
    return (tasks.a_evaluation_sets(values, setup.a_eval, seed=1),
            tasks.b_splits(setup.b_train, setup.b_validation, setup.b_test, setup.b_held_out, seed=2))


def adapt(base, method: str, setup: Setup, seed: int, calibration):
    """``base`` (a copy) prepared for ``method``: every method gets about S2FT's trainable-parameter count."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if method == "full":
        return model.requires_grad_(True)
    s2ft_config = S2FTConfig(task_type="CAUSAL_LM", head_ratio=setup.head_ratio, channel_ratio=setup.channel_ratio,
                             seed=seed)
    if method.startswith("s2ft_"):
        selection, order = ("random", "large") if method == "s2ft_random" else method[5:].rsplit("_", 1)
        model = get_peft_model(model, replace(s2ft_config, selection=selection, selection_order=order))
        if selection != "random":
            initialize_s2ft_selection(model, calibration, show_progress_bar=False)
        return model
    targets = LORA_TARGETS["lora_all_linear" if method == "lora_all_linear" else "lora"]
    rank = equal_parameter_rank(model, s2ft_config, targets)
    if method == "shira":  # r(m + n) entries per projection: the same count as LoRA of rank r
        return get_peft_model(model, ShiraConfig(task_type="CAUSAL_LM", r=rank, target_modules=targets,
                                                 random_seed=seed))
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, lora_dropout=0.0,
                                            target_modules=targets))


def evaluate(model, a_sets, b_sets) -> dict:
    model.eval()
    scores = {}
    for prefix, sets in (("b", {name: b_sets[name] for name in ("validation", "test", "held_out")}), ("a", a_sets)):
        for name, examples in sets.items():
            scores[f"{prefix}_{name}"], scores[f"{prefix}_{name}_loss"] = tasks.score(model, examples)
    scores["a_mean"] = statistics.mean(scores[f"a_{name}"] for name in a_sets)
    return scores


_WORKER = {}


def _init_worker(setup: Setup, base_path: str):
    torch.set_num_threads(1)
    model = new_model(setup)
    model.load_state_dict(torch.load(os.path.join(base_path, "model.pt")))
    _WORKER.update(setup=setup, base=model, data=datasets(setup))


def finetune(job) -> dict:
    """One fine-tuning run on B: ``job`` is (method, learning rate, seed)."""
    method, lr, seed = job
    setup, base = _WORKER["setup"], _WORKER["base"]
    a_sets, b_sets = _WORKER["data"]
    train = list(b_sets["train"])
    random.Random(seed).shuffle(train)
    calibration = list(tasks.batches(train[: setup.calibration_batches * setup.batch], setup.batch))
    start = time.perf_counter()
    model = adapt(base, method, setup, seed, calibration)
    selection_seconds = time.perf_counter() - start
    model.train()
    parameters = trainable(model)
    optimizer = torch.optim.AdamW(parameters, lr, weight_decay=0.0)
    schedule = linear_schedule(optimizer, setup.steps, warmup=max(1, setup.steps // 10))
    epoch = len(train) // setup.batch
    start = time.perf_counter()
    for step in range(setup.steps):
        if step % epoch == 0 and step:
            random.Random(seed * 1000 + step).shuffle(train)
        index = step % epoch
        model(**tasks.collate(train[index * setup.batch: (index + 1) * setup.batch])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    train_seconds = time.perf_counter() - start
    memory = peak_bytes(model, optimizer, tasks.collate(train[: setup.batch])["input_ids"], "cpu")
    return dict(method=method, lr=lr, seed=seed, trainable=sum(p.numel() for p in parameters),
                selection_seconds=selection_seconds, train_seconds=train_seconds, peak_bytes=memory,
                **evaluate(model, a_sets, b_sets))


def family(method: str) -> str:
    return "lora" if method.startswith("lora") else method.split("_")[0]


def summarize(runs: list[dict], method: str) -> dict:
    mine = [run for run in runs if run["method"] == method]
    summary = {"lr": mine[0]["lr"], "trainable": mine[0]["trainable"], "seeds": len(mine)}
    for key in ("b_test", "b_held_out", "a_mean", "a_facts", "train_seconds", "selection_seconds", "peak_bytes"):
        values = [run[key] for run in mine]
        summary[key] = statistics.mean(values)
        summary[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def table(summaries: dict, base_scores: dict) -> str:
    rows = ["| method | trainable params | lr | B test | B longer (held-out variation) | A retained (facts) "
            "| train s | peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows.append(f"| base (no fine-tuning) | 0 | - | {base_scores['b_test']:.1%} | {base_scores['b_held_out']:.1%} | "
                f"{base_scores['a_mean']:.1%} ({base_scores['a_facts']:.1%}) | - | - |")
    for method, s in summaries.items():
        rows.append(
            f"| {method} | {s['trainable']:,} | {s['lr']:g} | {s['b_test']:.1%} ± {s['b_test_std']:.1%} | "
            f"{s['b_held_out']:.1%} ± {s['b_held_out_std']:.1%} | {s['a_mean']:.1%} ± {s['a_mean_std']:.1%} "
            f"({s['a_facts']:.1%}) | {s['train_seconds']:.1f} | {s['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(rows)


def plot(summaries: dict, base_scores: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 6))
    for method, s in summaries.items():
        style = "o" if method.startswith("s2ft") else "s"
        axis.errorbar(s["a_mean"], s["b_test"], xerr=s["a_mean_std"], yerr=s["b_test_std"], fmt=style, capsize=3,
                      label=method)
    axis.axvline(base_scores["a_mean"], color="grey", linestyle=":", label="base model's A accuracy")
    axis.set_xlabel("A accuracy after fine-tuning on B (retention)")
    axis.set_ylabel("B accuracy (test)")
    axis.set_title("Fine-tuning on B at equal trainable parameters (mean ± std over seeds)")
    axis.legend(fontsize=7, loc="best")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="micro configuration, a smoke run of about a minute")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/s2ft-quality"),
                        help="where the pretrained base is kept")
    parser.add_argument("--output", default=None,
                        help="prefix of the JSON and PNG written (default benchmarks/quality; --quick: in the cache)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    return parser.parse_args()


def main():
    args = parse_args()
    setup = QUICK if args.quick else Setup()
    output = args.output or (os.path.join(args.cache, "quick") if args.quick
                             else os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality"))
    torch.set_num_threads(2)
    base, base_path = pretrained_base(setup, args.cache)
    a_sets, b_sets = datasets(setup)
    base_scores = evaluate(base, a_sets, b_sets)
    print("base model:", {k: round(v, 3) for k, v in base_scores.items()}, flush=True)

    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_init_worker, initargs=(setup, base_path)) as pool:
        sweep = pool.map(finetune, [(m, lr, 0) for m in setup.methods for lr in LEARNING_RATES[family(m)]])
        chosen = {}
        for method in setup.methods:  # the best validation accuracy; ties go to the lower validation loss
            mine = [run for run in sweep if run["method"] == method]
            chosen[method] = max(mine, key=lambda run: (run["b_validation"], -run["b_validation_loss"]))["lr"]
        more = pool.map(finetune, [(m, chosen[m], seed) for m in setup.methods for seed in range(1, setup.seeds)])
    runs = [run for run in sweep if run["lr"] == chosen[run["method"]]] + more
    summaries = {method: summarize(runs, method) for method in setup.methods}
    elapsed = time.perf_counter() - start

    print(f"\n{len(sweep) + len(more)} fine-tuning runs in {elapsed:.0f} s; "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(table(summaries, base_scores))
    with open(output + ".json", "w") as handle:
        json.dump(dict(setup=asdict(setup), base=base_scores, chosen_lr=chosen, summaries=summaries,
                       sweep=sweep, runs=runs, seconds=elapsed), handle, indent=1)
    plot(summaries, base_scores, output + ".png")
    print(f"wrote {output}.json and {output}.png")


if __name__ == "__main__":
    main()
