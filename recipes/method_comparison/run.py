"""Train one experiment folder on MetaMathQA, score GSM8K, and write a result JSON shaped like the published suite's.

    python -m recipes.method_comparison.run -v \
        recipes/method_comparison/experiments/s2ft/llama-3.2-3B-down_proj-ch107-lr_0.001

An experiment is ``experiments/<method>/<name>/`` holding a PEFT ``adapter_config.json`` (none: full fine-tuning) and
optionally ``training_params.json``, whose keys replace those of ``default_training_params.json``. ``--model`` and
``--set KEY=JSON`` override the merged settings; ``--metamath``, ``--gsm8k-train``, ``--gsm8k-test`` and
``--forgetting-texts`` read local JSON/JSONL files instead of the Hub datasets. The result goes to
``results/<method>--<name>.json`` and the trained adapter beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import datasets
import numpy as np
import peft
import torch
import transformers
from peft import PeftConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from s2ft_plugin import initialize_s2ft_selection  # importing s2ft_plugin registers the PEFT type "S2FT"

from ..generation import generate
from . import answers, data

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PARAMS = os.path.join(HERE, "default_training_params.json")
WARMUP_RATIO = 0.1
CALIBRATION_BATCHES = 8  # for S2FT's score-based selections


@dataclass
class TrainConfig:
    model_id: str
    dtype: str
    max_seq_length: int
    batch_size: int
    batch_size_eval: int
    max_steps: int
    eval_steps: int
    seed: int
    grad_norm_clip: float
    optimizer_type: str
    optimizer_kwargs: dict
    lr_scheduler: Optional[str]
    use_gc: bool
    autocast_adapter_dtype: bool
    generation_kwargs: dict
    query_template: str

    def __post_init__(self):
        checks = {
            "dtype": self.dtype in ("float32", "bfloat16", "float16"),
            "batch_size": self.batch_size > 0, "batch_size_eval": self.batch_size_eval > 0,
            "max_steps": self.max_steps > 0, "eval_steps": 0 < self.eval_steps <= self.max_steps,
            "grad_norm_clip": self.grad_norm_clip >= 0, "optimizer_type": hasattr(torch.optim, self.optimizer_type),
            "lr_scheduler": self.lr_scheduler in (None, "cosine"), "query_template": "{query}" in self.query_template,
            "generation_kwargs": {"max_length", "max_new_tokens"} >= set(self.generation_kwargs),
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            raise ValueError(f"Invalid training parameters {', '.join(f'{n}={getattr(self, n)!r}' for n in wrong)}.")


@dataclass
class Experiment:
    name: str  # "<method>/<variant>"
    path: str
    peft_config: Optional[PeftConfig]  # None: full fine-tuning
    train_config: TrainConfig

    @classmethod
    def load(cls, path: str, overrides: dict[str, Any]) -> "Experiment":
        parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
        if len(parts) < 3 or parts[-3] != "experiments":
            raise ValueError(f"{path!r} is not an experiment folder: expected experiments/<method>/<name>.")
        settings = _read_json(DEFAULT_PARAMS)
        experiment_params = os.path.join(path, "training_params.json")
        if os.path.exists(experiment_params):
            settings.update(_read_json(experiment_params))
        settings.update(overrides)
        unknown = set(settings) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise ValueError(f"Unknown training parameters {sorted(unknown)}; TrainConfig in {__file__} lists them.")
        has_adapter = os.path.exists(os.path.join(path, "adapter_config.json"))
        return cls(name=f"{parts[-2]}/{parts[-1]}", path=path,
                   peft_config=PeftConfig.from_pretrained(path) if has_adapter else None,
                   train_config=TrainConfig(**settings))


def _read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--set expects KEY=JSON, got {item!r}.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string such as a model id
    return overrides


class AcceleratorMemory:
    """Reserved accelerator memory above the level before the model was loaded (None on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reserved: list[int] = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.initial = torch.cuda.max_memory_reserved()

    def record(self) -> None:
        if self.cuda:
            self.reserved.append(torch.cuda.memory_reserved() - self.initial)

    def summary(self) -> dict[str, Optional[int]]:
        if not self.cuda:
            return {"accelerator_memory_reserved_avg": None, "accelerator_memory_max": None,
                    "accelerator_memory_reserved_99th": None}
        return {"accelerator_memory_reserved_avg": int(np.mean(self.reserved)),
                "accelerator_memory_max": torch.cuda.max_memory_reserved() - self.initial,
                "accelerator_memory_reserved_99th": int(np.percentile(self.reserved, 99))}


def load_model(experiment: Experiment, device: torch.device):
    config = experiment.train_config
    tokenizer = AutoTokenizer.from_pretrained(config.model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=getattr(torch, config.dtype)).to(device)
    if config.use_gc:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if experiment.peft_config is not None:
        model = get_peft_model(model, experiment.peft_config, autocast_adapter_dtype=config.autocast_adapter_dtype)
    return tokenizer, model


def generate_answers(model, tokenizer, prompts: list[list[int]], config: TrainConfig) -> list[str]:
    """Greedy completions within ``generation_kwargs``: ``max_new_tokens`` and ``max_length`` (prompt included)."""
    limits = config.generation_kwargs
    return generate(model, tokenizer, prompts, config.batch_size_eval, limits.get("max_new_tokens", 2 ** 31),
                    limits.get("max_length"))


@torch.inference_mode()
def mean_token_loss(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> float:
    """Cross-entropy per token over all of ``texts`` (every token weighs the same, whatever its text's length)."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = [row[:max_length] for row in tokenizer(texts[start:start + batch_size])["input_ids"]]
        batch = {k: v.to(model.device) for k, v in data.collate(ids, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   reduction="sum", ignore_index=-100)
        total += losses.item()
        count += (batch["labels"][:, 1:] != -100).sum().item()
    return total / count


def select_s2ft_units(model, train_ids: list[list[int]], config: TrainConfig, pad_token_id: int) -> None:
    """S2FT's score-based selections read the first training batches (random selection needs nothing)."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    if getattr(peft_config, "peft_type", None) != "S2FT" or peft_config.selection == "random":
        return
    batches = [data.collate(train_ids[i:i + config.batch_size], pad_token_id)
               for i in range(0, min(CALIBRATION_BATCHES * config.batch_size, len(train_ids)), config.batch_size)]
    initialize_s2ft_selection(model, [{k: v.to(model.device) for k, v in batch.items()} for batch in batches],
                              show_progress_bar=False)


def train(model, tokenizer, config: TrainConfig, train_ids, valid_prompts, valid_references, memory, log):
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = getattr(torch.optim, config.optimizer_type)(trainable, **config.optimizer_kwargs)
    scheduler = (get_cosine_schedule_with_warmup(optimizer, int(WARMUP_RATIO * config.max_steps), config.max_steps)
                 if config.lr_scheduler == "cosine" else None)
    device = model.device
    losses, durations, tokens, metrics = [], [], [], []
    samples, started = 0, time.perf_counter()
    batches = data.length_grouped_batches([len(ids) for ids in train_ids], config.batch_size)
    model.train()
    for step in range(1, config.max_steps + 1):
        tic = time.perf_counter()
        indices = next(batches)
        batch = data.collate([train_ids[i] for i in indices], tokenizer.pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        if config.grad_norm_clip:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_norm_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        memory.record()
        samples += len(indices)
        tokens.append(int(batch["attention_mask"].sum()))
        durations.append(time.perf_counter() - tic)
        if step % config.eval_steps == 0:
            tic_eval = time.perf_counter()
            model.eval()
            predictions = generate_answers(model, tokenizer, valid_prompts, config)
            model.train()
            window = slice(-config.eval_steps, None)
            metrics.append({
                "step": step, "valid accuracy": answers.accuracy(predictions, valid_references),
                "train loss": float(np.mean(losses[window])), "train samples": samples,
                "train time": sum(durations[window]), "eval time": time.perf_counter() - tic_eval,
                "tokens / sec": sum(tokens[window]) / sum(durations[window]),
                "elapsed time": time.perf_counter() - started,
            })
            log(json.dumps(metrics[-1]))
    return losses, metrics, {"train_time": sum(durations), "train_samples": samples, "train_tokens": sum(tokens)}


def package_info() -> dict[str, str]:
    return {f"{module.__name__}-version": module.__version__ for module in (torch, transformers, peft, datasets)}


def run(experiment: Experiment, sources: data.Sources, results_dir: str, log=lambda *_: None):
    """Train and evaluate ``experiment``; returns the result (also written as JSON) and the trained model."""
    started, created_at = time.perf_counter(), dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    config = experiment.train_config
    transformers.set_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = AcceleratorMemory(device)
    tokenizer, model = load_model(experiment, device)
    train_set, valid_set, test_set = data.load_splits(sources, seed=config.seed)
    log(f"train {len(train_set)}, valid {len(valid_set)}, test {len(test_set)} examples")
    train_ids = data.tokenize_for_training(train_set, tokenizer, config.query_template, config.max_seq_length)
    prompts = {name: data.tokenize_prompts(split, tokenizer, config.query_template, config.max_seq_length)
               for name, split in (("valid", valid_set), ("test", test_set))}
    wiki = data.load_forgetting_texts(sources.forgetting_texts)
    model.eval()
    with model.disable_adapter() if experiment.peft_config is not None else contextlib.nullcontext():
        loss_before = mean_token_loss(model, tokenizer, wiki, config.batch_size, config.max_seq_length)

    select_s2ft_units(model, train_ids, config, tokenizer.pad_token_id)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    losses, metrics, totals = train(model, tokenizer, config, train_ids, prompts["valid"], valid_set["response"],
                                    memory, log)
    model.eval()
    predictions = generate_answers(model, tokenizer, prompts["test"], config)
    test_accuracy = answers.accuracy(predictions, test_set["response"])
    forgetting = mean_token_loss(model, tokenizer, wiki, config.batch_size, config.max_seq_length) - loss_before
    metrics.append({"step": config.max_steps, "test accuracy": test_accuracy,
                    "train loss": float(np.mean(losses[-config.eval_steps:])), "train samples": totals["train_samples"],
                    "train total tokens": totals["train_tokens"], "forgetting": forgetting})
    log(f"test accuracy {test_accuracy:.4f}, forgetting {forgetting:+.4f}")

    stem = os.path.join(results_dir, experiment.name.replace("/", "--"))
    os.makedirs(stem, exist_ok=True)
    with open(f"{stem}.predictions.jsonl", "w") as handle:
        for query, prediction in zip(test_set["query"], predictions):
            handle.write(json.dumps({"query": query, "prediction": prediction}) + "\n")
    if experiment.peft_config is not None:
        model.save_pretrained(stem)
        file_size = os.path.getsize(os.path.join(stem, "adapter_model.safetensors"))
    else:  # a full checkpoint is not worth writing for a comparison; its size is known
        file_size = sum(p.numel() * p.element_size() for p in model.parameters())
    peft_config = experiment.peft_config.to_dict() if experiment.peft_config is not None else None
    result = {
        "run_info": {"created_at": created_at, "total_time": time.perf_counter() - started,
                     "experiment_name": experiment.name, "train_config": asdict(config),
                     "peft_config": json.loads(json.dumps(peft_config, default=sorted))},
        "train_info": {**memory.summary(), "train_time": totals["train_time"], "file_size": file_size,
                       "num_trainable_params": trainable_params, "num_total_params": total_params,
                       "status": "success", "metrics": metrics},
        "meta_info": {"package_info": package_info(),
                      "system_info": {"system": platform.system(), "machine": platform.machine(),
                                      "accelerator": torch.cuda.get_device_name(0) if device.type == "cuda"
                                      else "cpu"}},
    }
    with open(f"{stem}.json", "w") as handle:
        json.dump(result, handle, indent=2)
    log(f"result written to {stem}.json")
    return result, model


def parse_args(argv=None) -> tuple[Experiment, data.Sources, str, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiments/<method>/<name> folder")
    parser.add_argument("--model", help="model id or path (replaces model_id)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a training parameter")
    parser.add_argument("--metamath", help="local MetaMathQA file (query, response)")
    parser.add_argument("--gsm8k-train", help="local GSM8K training file (question, answer), for the validation sample")
    parser.add_argument("--gsm8k-test", help="local GSM8K test file (question, answer)")
    parser.add_argument("--forgetting-texts", help="local file of general text (text), for the forgetting metric")
    parser.add_argument("--valid-size", type=int, default=data.VALID_SIZE,
                        help="GSM8K questions scored during training")
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    if args.model:
        overrides["model_id"] = args.model
    sources = data.Sources(args.metamath, args.gsm8k_train, args.gsm8k_test, args.forgetting_texts, args.valid_size)
    return Experiment.load(args.experiment, overrides), sources, args.results_dir, args.verbose


def main(argv=None) -> dict:
    experiment, sources, results_dir, verbose = parse_args(argv)
    log = (lambda message: print(message, file=sys.stderr)) if verbose else (lambda *_: None)
    result, _ = run(experiment, sources, results_dir, log)
    info = result["train_info"]
    print(f"{experiment.name}: test accuracy {info['metrics'][-1]['test accuracy']:.4f}, train time "
          f"{info['train_time']:.0f} s, trainable params {info['num_trainable_params']:,}")
    return result


if __name__ == "__main__":
    main()
