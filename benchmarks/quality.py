"""Quality: does S2FT learn a new task like LoRA and forget less? A controlled pretrain-then-fine-tune experiment.

A small Llama built offline is pretrained on task family A (key -> value facts, and copy/reverse/increment rules; see
quality_tasks.py) until it masters it, and cached. It is then fine-tuned on task B only (a new task token asking for
reverse-and-increment, which composes two skills of A) by each method at equal trainable parameters: S2FT with every
selection strategy and order, S2FT on other projections (down_proj only; gate/up/down), PEFT LoRA on S2FT's
projections and on all linear layers, PEFT SHiRA on S2FT's projections, and full fine-tuning. Each method takes the
best of 3 learning rates on B's validation split (seed 0, as a practitioner tunes), then runs more seeds at that rate.
Each seed has its own base (pretrained from its own initialisation and data order), so the spread over seeds includes
how much the outcome depends on the pretrained model.

Reported per method: B exact match on unseen inputs like the training ones (test) and on two held-out variations
(inputs with symbols B never shows; longer inputs), A exact match after fine-tuning (A is never replayed), the training
loop's wall time, and peak training memory counted from its parts (weights + gradients + AdamW state + the activations
autograd saves for backward, captured with saved-tensor hooks; common.peak_bytes). A diagnostic says where each
update acts: how much it changes the outputs of the model's projections on A's inputs and on B's.

Runs go two at a time, one thread each; every run is deterministic given its seed.

    python benchmarks/quality.py            # ~17 min on 2 CPU cores the first time, ~9 min once the bases are cached
    python benchmarks/quality.py --quick    # ~1 min smoke run of a micro configuration
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel

import common
import quality_report as report
import quality_tasks as tasks
from common import peak_bytes, trainable
from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import build_model

# name -> S2FTConfig fields. "targets": projections other than the default o_proj + down_proj, trained as FFN channels
# only, as many as give S2FT's default trainable-parameter count.
S2FT_METHODS = {"s2ft_random": dict(selection="random")}
S2FT_METHODS.update({
    f"s2ft_{selection}_{order}": dict(selection=selection, selection_order=order)
    for selection in ("weight", "activation", "weight_activation", "gradient") for order in ("large", "small")
})
S2FT_TARGETS = {"down": ["down_proj"], "ffn": ["gate_proj", "up_proj", "down_proj"]}
S2FT_METHODS.update({
    f"s2ft_{name}_activation_large": dict(selection="activation", selection_order="large", targets=name)
    for name in S2FT_TARGETS
})
METHODS = list(S2FT_METHODS) + ["lora", "lora_all_linear", "shira", "full"]
PEFT_LEARNING_RATES = (3e-3, 1e-2, 3e-2)  # one grid for every adapter method
FULL_LEARNING_RATES = (1e-4, 3e-4, 1e-3)
B_EVALUATIONS = ("validation", "test", "unseen_symbols", "longer")


@dataclass(frozen=True)
class Setup:
    """Everything that defines the experiment; the pretrained base is cached under a hash of its part of it."""

    hidden: int = 128
    intermediate: int = 512
    heads: int = 8
    layers: int = 4
    facts: int = 256
    pretrain_steps: int = 1200
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
                  "pretrain_lr")
        key = json.dumps([getattr(self, name) for name in fields]) + inspect.getsource(tasks)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


QUICK = Setup(hidden=64, intermediate=256, heads=4, layers=2, facts=64, pretrain_steps=400, b_train=512,
              b_validation=64, b_test=128, b_held_out=128, a_eval=64, steps=60, calibration_batches=2, seeds=1,
              methods=("s2ft_random", "s2ft_activation_small", "lora", "full"))


def new_model(setup: Setup, seed: int = 0):
    return build_model("llama", hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                       num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                       num_key_value_heads=setup.heads, vocab_size=tasks.vocab_size(setup.facts), seed=seed)


def schedule(optimizer, steps: int, warmup: int, cosine: bool = False):
    """Linear warm-up, then linear (or cosine) decay to zero."""
    def factor(step):
        progress = min(1.0, step / steps)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1 - progress
        return min(1.0, (step + 1) / warmup) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrained_base(setup: Setup, cache: str, seed: int):
    """The model pretrained on A from initialisation and data order ``seed`` (the facts are the same for every seed):
    loaded from ``cache`` or trained and saved there."""
    path = os.path.join(cache, f"base-{setup.base_key()}", f"seed{seed}.pt")
    model = new_model(setup, seed)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model, path
    print(f"pretraining base {seed} on A ({setup.pretrain_steps} steps), cached as {path}", flush=True)
    stream = tasks.a_training_stream(tasks.fact_values(setup.facts, seed=0), seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), setup.pretrain_lr, weight_decay=0.0)
    lr_schedule = schedule(optimizer, setup.pretrain_steps, warmup=100, cosine=True)
    start = time.perf_counter()
    for _ in range(setup.pretrain_steps):
        model(**tasks.collate([next(stream) for _ in range(setup.pretrain_batch)])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
    model.eval()
    print(f"pretrained in {time.perf_counter() - start:.0f} s", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return model, path


def datasets(setup: Setup):
    values = tasks.fact_values(setup.facts, seed=0)
    return (tasks.a_evaluation_sets(values, setup.a_eval, seed=1),
            tasks.b_splits(setup.b_train, setup.b_validation, setup.b_test, setup.b_held_out, seed=2))


def adapt(base, method: str, setup: Setup, seed: int, calibration):
    """A copy of ``base`` prepared for ``method``: every adapter gets about S2FT's default trainable-parameter count."""
    fields = dict(S2FT_METHODS.get(method, {}))
    if "targets" in fields:
        fields["target_modules"] = S2FT_TARGETS[fields.pop("targets")]
    s2ft_config = S2FTConfig(task_type="CAUSAL_LM", head_ratio=setup.head_ratio, channel_ratio=setup.channel_ratio)
    return common.adapt(base, method, s2ft_config, seed, fields, calibration)


def evaluate(model, a_sets, b_sets) -> dict:
    """Exact match and answer loss on every set; ``a_mean`` averages A's four sets."""
    model.eval()
    scores = {}
    for prefix, sets in (("b", {name: b_sets[name] for name in B_EVALUATIONS}), ("a", a_sets)):
        for name, examples in sets.items():
            scores[f"{prefix}_{name}"], scores[f"{prefix}_{name}_loss"] = tasks.score(model, examples)
    scores["a_mean"] = statistics.mean(scores[f"a_{name}"] for name in a_sets)
    return scores


@torch.no_grad()
def output_change(base, tuned, examples: dict) -> dict:
    """Where the update acts: for each set of examples, sqrt(sum ||dW x||^2 / sum ||W x||^2) over every projection of
    every block and every token, x being the base model's input to the projection and dW the merged weight minus the
    base weight (for S2FT in the original, unpermuted coordinates)."""
    merged = tuned.merge_and_unload() if isinstance(tuned, PeftModel) else tuned
    projections = {name: module for name, module in base.model.layers.named_modules()
                   if isinstance(module, torch.nn.Linear)}
    deltas = {name: merged.model.layers.get_submodule(name).weight - module.weight
              for name, module in projections.items()}
    state = {}

    def recorder(name):
        def record(module, inputs, _output):
            x = inputs[0][state["mask"]]
            state["sums"] += torch.tensor([(x @ deltas[name].T).square().sum(), (x @ module.weight.T).square().sum()],
                                          dtype=torch.float64)
        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in projections.items()]
    change = {}
    try:
        for set_name, chosen in examples.items():
            state["sums"] = torch.zeros(2, dtype=torch.float64)
            for batch in tasks.batches(chosen, 256):
                state["mask"] = batch["attention_mask"].bool()
                base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            change[set_name] = math.sqrt(state["sums"][0] / state["sums"][1])
    finally:
        for handle in handles:
            handle.remove()
    return change


_WORKER = {}


def _init_worker(setup: Setup, base_paths: list):
    torch.set_num_threads(1)
    bases = [new_model(setup) for _ in base_paths]
    for base, path in zip(bases, base_paths):
        base.load_state_dict(torch.load(path))
    _WORKER.update(setup=setup, bases=bases, data=datasets(setup))


def finetune(job) -> dict:
    """One fine-tuning run on B: ``job`` is (method, learning rate, seed); the seed also picks the base."""
    method, lr, seed = job
    setup, base = _WORKER["setup"], _WORKER["bases"][seed]
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
    lr_schedule = schedule(optimizer, setup.steps, warmup=max(1, setup.steps // 10))
    per_epoch = len(train) // setup.batch
    start = time.perf_counter()
    for step in range(setup.steps):
        if step and step % per_epoch == 0:
            random.Random(seed * 1000 + step).shuffle(train)
        index = step % per_epoch
        model(**tasks.collate(train[index * setup.batch: (index + 1) * setup.batch])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
    train_seconds = time.perf_counter() - start
    memory = peak_bytes(model, optimizer, tasks.collate(train[: setup.batch])["input_ids"], "cpu")
    scores = evaluate(model, a_sets, b_sets)
    a_inputs = [example for examples in a_sets.values() for example in examples[: setup.a_eval // 4]]
    change = output_change(base, model, {"a": a_inputs, "b": b_sets["test"][: len(a_inputs)]})
    return dict(method=method, lr=lr, seed=seed, trainable=sum(p.numel() for p in parameters),
                selection_seconds=selection_seconds, train_seconds=train_seconds, peak_bytes=memory,
                output_change_a=change["a"], output_change_b=change["b"], **scores)


def learning_rates(method: str) -> tuple:
    return FULL_LEARNING_RATES if method == "full" else PEFT_LEARNING_RATES


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="micro configuration, a smoke run of about a minute")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/s2ft-quality"),
                        help="where the pretrained base is kept")
    parser.add_argument("--output", default=None,
                        help="prefix of the JSON and PNG written (default benchmarks/quality; --quick: in the cache)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    return parser.parse_args()


def run(setup: Setup, cache: str, workers: int) -> dict:
    """Pretrain (or load) a base per seed, sweep the learning rates on seed 0, run the other seeds at each method's
    choice."""
    torch.set_num_threads(2)
    bases = [pretrained_base(setup, cache, seed) for seed in range(setup.seeds)]
    base_scores = [evaluate(base, *datasets(setup)) for base, _ in bases]
    for seed, scores in enumerate(base_scores):
        print(f"base {seed}:", {k: round(v, 3) for k, v in scores.items() if not k.endswith("_loss")}, flush=True)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (setup, [p for _, p in bases])) as pool:
        sweep = pool.map(finetune, [(m, lr, 0) for m in setup.methods for lr in learning_rates(m)])
        chosen = {}
        for method in setup.methods:  # the best validation accuracy; ties go to the lower validation loss
            mine = [run for run in sweep if run["method"] == method]
            chosen[method] = max(mine, key=lambda run: (run["b_validation"], -run["b_validation_loss"]))["lr"]
        more = pool.map(finetune, [(m, chosen[m], seed) for m in setup.methods for seed in range(1, setup.seeds)])
    runs = [run for run in sweep if run["lr"] == chosen[run["method"]]] + more
    return dict(setup=asdict(setup), bases=base_scores, chosen_lr=chosen,
                summaries={method: report.summarize(runs, method) for method in setup.methods},
                sweep=sweep, runs=runs, seconds=time.perf_counter() - start,
                machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")


def main():
    args = parse_args()
    setup = QUICK if args.quick else Setup()
    output = args.output or (os.path.join(args.cache, "quick") if args.quick
                             else os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality"))
    results = run(setup, args.cache, args.workers)
    print(f"\n{len(results['sweep']) + len(results['runs']) - len(setup.methods)} fine-tuning runs in "
          f"{results['seconds']:.0f} s; {results['machine']}")
    print(report.table(results["summaries"], results["bases"]))
    print()
    print(report.diagnostics(results["summaries"]))
    with open(output + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    report.plot(results, output + ".png")
    print(f"wrote {output}.json and {output}.png")


if __name__ == "__main__":
    main()
