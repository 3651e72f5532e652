"""Quality on a real model: SmolLM2-135M-Instruct learns two new skills; what does each method keep of the base?

The base (models/SmolLM2-135M-Instruct, `make real-model`) is fine-tuned, chat template applied, on two skills it
cannot do yet (quality_real_tasks.py: a letter rule and a made-up code, mixed in every batch) by each method at
equal trainable parameters: S2FT (random, the defaults; weight_activation; activation with `small` order, the paper's
best; down_proj only, the paper's Llama-3 recipe), PEFT LoRA on S2FT's projections and on every linear layer, and
full fine-tuning. No method gets one learning rate: each runs a learning-rate grid and is evaluated at several step
counts of every run, so it traces a curve of new-task accuracy against retention (general questions the base answered
right that stay right; drift, the per-token NLL of the base's own greedy answers to generic instructions, minus the
base's). quality_real_report.py compares the curves at equal new-task accuracy, over seeds (selection, LoRA's
initialisation and the data order).

Cost: every prompt begins with the same system turn, which a causal model computes independently of what follows. It
runs once per batch and its keys/values are shared by every row, in training (its gradient sums over the rows) and in
batched greedy decoding (with a KV cache); the output head runs only where a token is scored. Both are exact.

    make real-model                              # the model folder, once
    python benchmarks/quality_real.py            # 63 runs, about 80 CPU-minutes (40 min on 2 idle cores); resumes
    python benchmarks/quality_real.py --quick    # a smoke run of 4 tiny runs, a few minutes
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import common
import quality_real_report as report
import quality_real_tasks as tasks
from common import trainable
from s2ft_plugin import S2FTConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from real_model import DEFAULT_FOLDER  # noqa: E402

# name -> S2FTConfig fields (None: not S2FT); every method trains about as many parameters as the first
METHODS = {
    "s2ft_random": dict(selection="random"),
    "s2ft_weight_activation": dict(selection="weight_activation"),
    "s2ft_activation_small": dict(selection="activation", selection_order="small"),
    "s2ft_down": dict(selection="random", target_modules=["down_proj"]),
    "lora": None,
    "lora_all_linear": None,
    "full": None,
}


@dataclass(frozen=True)
class Setup:
    """Everything that defines the experiment (runs are cached under a hash of it and of the tasks)."""

    model: str = DEFAULT_FOLDER
    train_per_skill: int = 160
    validation: int = 8
    test: int = 20
    out_of_distribution: int = 12
    batch: int = 8
    steps: int = 40
    checkpoints: tuple = (10, 20, 40)
    warmup: int = 4
    adapter_lrs: tuple = (5e-4, 2e-3, 8e-3)
    full_lrs: tuple = (3e-5, 1e-4, 3e-4)
    seeds: int = 3
    calibration_batches: int = 4
    answer_tokens: int = 12  # greedy tokens of a general question's answer
    drift_tokens: int = 24  # greedy tokens of the base's answer to a generic instruction
    head_ratio: float = 0.125  # S2FT's default budget, which every method matches
    channel_ratio: float = 0.05
    methods: tuple = tuple(METHODS)

    def key(self) -> str:
        text = json.dumps(asdict(self)) + inspect.getsource(tasks)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def learning_rates(self, method: str) -> tuple:
        return self.full_lrs if method == "full" else self.adapter_lrs


QUICK = Setup(train_per_skill=16, validation=4, test=8, out_of_distribution=8, batch=4, steps=4, checkpoints=(2, 4),
              adapter_lrs=(2e-3,), full_lrs=(8e-5,), seeds=1, calibration_batches=1, drift_tokens=12,
              methods=("s2ft_random", "s2ft_weight_activation", "lora", "full"))


class Chat:
    """Prompts and answers as the chat template tokenizes them: the prefix every prompt shares (the system turn),
    then each prompt's own tokens, then an answer's tokens up to and including the end-of-turn token."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        prompts = [self._template(text) for text in texts]
        length = min(len(ids) for ids in prompts)
        while any(ids[:length] != prompts[0][:length] for ids in prompts):
            length -= 1
        self.prefix = prompts[0][:length]

    def _template(self, text: str, answer: str | None = None) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=True,
                                                  return_dict=True)["input_ids"]

    def prompt(self, text: str) -> list[int]:
        ids = self._template(text)
        if ids[: len(self.prefix)] != self.prefix:
            raise ValueError(f"{text!r} does not begin with the shared prefix once templated.")
        return ids[len(self.prefix):]

    def answer(self, text: str, answer: str) -> list[int]:
        """The tokens the template puts after the generation prompt for ``answer``, through the end of turn."""
        prompt, whole = self._template(text), self._template(text, answer)
        rest = whole[len(prompt):]
        if whole[: len(prompt)] != prompt or self.eos not in rest:
            raise ValueError("The chat template does not write an answer as the generation prompt plus the answer "
                             "and an end-of-turn token.")
        return rest[: rest.index(self.eos) + 1]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def parts(model):
    """The decoder body and the output head of a causal LM, bare or wrapped by PEFT (adapters act inside both)."""
    causal = model.get_base_model() if isinstance(model, PeftModel) else model
    return causal.model, causal.lm_head


def hidden_states(model, prefix: list[int], ids: torch.Tensor, mask: torch.Tensor, cache=None, start=None):
    """Hidden states of ``ids`` (rows padded where ``mask`` is 0) after ``prefix``, the prefix computed once and
    shared by every row. Positions count the real tokens only, so padding may sit anywhere after the prefix.
    ``cache``/``start``: continue a decoding whose cache already holds the prefix and earlier tokens."""
    body, _ = parts(model)
    if cache is None:
        cache = DynamicCache(config=body.config)
        if prefix:
            body(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(ids.shape[0])
        start = torch.full((ids.shape[0], 1), len(prefix))
        full_mask = torch.cat([torch.ones(ids.shape[0], len(prefix), dtype=mask.dtype), mask], 1)
    else:
        full_mask = mask
    positions = start + (mask[:, -ids.shape[1]:].cumsum(1) - 1).clamp(min=0)
    out = body(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return out.last_hidden_state, cache, full_mask, positions


def pad(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), value)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[index, span], mask[index, span] = torch.tensor(row), 1
    return ids, mask


def answer_nll(model, chat: Chat, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Negative log-likelihood of each answer token given its prompt (teacher forcing), for (prompt ids, answer
    ids) pairs, concatenated row by row; the output head runs only at the scored positions."""
    ids, mask = pad([prompt + answer for prompt, answer in pairs], chat.pad, left=False)
    hidden = hidden_states(model, chat.prefix, ids, mask)[0]
    rows = torch.cat([torch.full((len(answer),), row) for row, (_, answer) in enumerate(pairs)])
    columns = torch.cat([torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1) for prompt, answer in pairs])
    targets = torch.cat([torch.tensor(answer) for _, answer in pairs])
    logits = parts(model)[1](hidden[rows, columns])
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def greedy(model, chat: Chat, prompts: list[list[int]], max_new_tokens, batch_size: int = 256) -> list[list[int]]:
    """Greedy answers (KV cache, left-padded batches, the shared prefix computed once per batch), each up to and
    without the end-of-turn token, and at most ``max_new_tokens`` long (one limit, or one per prompt). A row leaves
    the batch once it is done."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    answers = {index: [] for index in range(len(prompts))}
    _, head = parts(model)
    for first in range(0, len(prompts), batch_size):
        rows = torch.arange(first, min(first + batch_size, len(prompts)))
        ids, mask = pad([prompts[index] for index in rows], chat.pad, left=True)
        hidden, cache, mask, positions = hidden_states(model, chat.prefix, ids, mask)
        while True:
            tokens = head(hidden[:, -1]).argmax(-1)
            going = []
            for position, (index, token) in enumerate(zip(rows.tolist(), tokens.tolist())):
                if token != chat.eos:
                    answers[index].append(token)
                if token != chat.eos and len(answers[index]) < limits[index]:
                    going.append(position)
            if not going:
                break
            if len(going) < len(rows):
                keep = torch.tensor(going)
                cache.batch_select_indices(keep)
                rows, tokens, mask, positions = rows[keep], tokens[keep], mask[keep], positions[keep]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
            positions = positions[:, -1:] + 1
            hidden = hidden_states(model, chat.prefix, tokens[:, None], mask, cache, positions)[0]
    return [answers[index] for index in range(len(prompts))]


def exact_match(model, chat: Chat, examples: list[tasks.Example]) -> list[bool]:
    """Whether each example's greedy answer is the expected text (decoding stops two tokens past the expected
    length: a longer answer is wrong whatever follows)."""
    limits = [len(chat.answer(e.prompt, e.answer)) + 2 for e in examples]
    answers = greedy(model, chat, [chat.prompt(e.prompt) for e in examples], limits)
    return [tasks.exact_match(chat.text(answer), e) for answer, e in zip(answers, examples)]


def questions_right(model, chat: Chat, questions, max_new_tokens: int) -> list[bool]:
    answers = greedy(model, chat, [chat.prompt(question) for question, _ in questions], max_new_tokens)
    return [tasks.answers_right(chat.text(answer), words) for answer, (_, words) in zip(answers, questions)]


def references(model, chat: Chat, setup: Setup) -> dict:
    """What the base does, which retention is measured against: the general questions it answers right, and its
    greedy answers to the generic instructions with their NLL under the base (nats per token)."""
    right = questions_right(model, chat, tasks.GENERAL_QUESTIONS, setup.answer_tokens)
    if not any(right):
        raise ValueError("The base model answers none of the general questions right: nothing to retain.")
    prompts = [chat.prompt(text) for text in tasks.GENERIC_INSTRUCTIONS]
    answers = [answer + [chat.eos] if len(answer) < setup.drift_tokens else answer
               for answer in greedy(model, chat, prompts, setup.drift_tokens)]
    with torch.no_grad():
        nll = answer_nll(model, chat, list(zip(prompts, answers))).mean().item()
    return dict(questions=[q for q, ok in zip(tasks.GENERAL_QUESTIONS, right) if ok], questions_asked=len(right),
                drift_pairs=[(p, a) for p, a in zip(prompts, answers)], base_nll=nll)


def evaluation_sets(sets: dict) -> dict:
    return {name: examples for name, examples in sets.items() if not name.endswith("_train")}


def evaluate(model, chat: Chat, sets: dict, reference: dict, setup: Setup) -> dict:
    """Exact match on every set of ``sets`` (evaluation_sets), the general questions the base answered right that
    still are, and drift (NLL of the base's answers to the generic instructions, minus the base's own, in nats per
    token)."""
    was_training = model.training
    model.eval()
    right = iter(exact_match(model, chat, [e for chosen in sets.values() for e in chosen]))  # one decoding: full batches
    scores = {name: statistics.mean(next(right) for _ in chosen) for name, chosen in sets.items()}
    for split in ("validation", "test"):
        scores[f"new_{split}"] = statistics.mean(scores[f"{skill}_{split}"] for skill in tasks.SKILLS)
    scores["out_of_distribution"] = statistics.mean(scores[name] for name in tasks.OUT_OF_DISTRIBUTION.values())
    scores["questions_kept"] = statistics.mean(questions_right(model, chat, reference["questions"],
                                                               setup.answer_tokens))
    with torch.no_grad():
        scores["drift"] = answer_nll(model, chat, reference["drift_pairs"]).mean().item() - reference["base_nll"]
    model.train(was_training)
    return scores


def training_order(sets: dict, setup: Setup, seed: int) -> list[list[tasks.Example]]:
    """Batches of the run: the skills alternate within each batch, in an order drawn from ``seed``."""
    rng = random.Random(seed)
    pools = {skill: rng.sample(sets[f"{skill}_train"], len(sets[f"{skill}_train"])) for skill in tasks.SKILLS}
    mixed = [example for pair in zip(*pools.values()) for example in pair]
    if setup.steps * setup.batch > len(mixed):
        raise ValueError(f"{setup.steps} steps of {setup.batch} need more than {len(mixed)} training examples.")
    return [mixed[step * setup.batch: (step + 1) * setup.batch] for step in range(setup.steps)]


def calibration_batches(chat: Chat, batches) -> list[dict]:
    """Whole templated sequences (prefix included) with labels on the answers, for score-based selection."""
    out = []
    for batch in batches:
        rows = [(chat.prefix + chat.prompt(e.prompt), chat.answer(e.prompt, e.answer)) for e in batch]
        ids, mask = pad([prompt + answer for prompt, answer in rows], chat.pad, left=False)
        labels = torch.full_like(ids, -100)
        for index, (prompt, answer) in enumerate(rows):
            labels[index, len(prompt): len(prompt) + len(answer)] = torch.tensor(answer)
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return out


def finetune(model, chat: Chat, batches, lr: float, setup: Setup, on_checkpoint) -> tuple[float, float]:
    """AdamW (no weight decay, gradients clipped at 1) at ``lr`` after a short linear warm-up, constant after it, so
    a checkpoint of a run stands for a shorter run. Returns the training's wall and CPU seconds (evaluations
    excluded; on a shared machine the CPU seconds are the comparable ones)."""
    parameters = trainable(model)
    optimizer = torch.optim.AdamW(parameters, lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / setup.warmup))
    model.train()
    seconds = cpu_seconds = 0.0
    for step, batch in enumerate(batches, start=1):
        start, cpu_start = time.perf_counter(), time.process_time()
        pairs = [(chat.prompt(e.prompt), chat.answer(e.prompt, e.answer)) for e in batch]
        answer_nll(model, chat, pairs).mean().backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        warmup.step()
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        if step in setup.checkpoints:
            on_checkpoint(step)
    return seconds, cpu_seconds


def s2ft_config(setup: Setup) -> S2FTConfig:
    return S2FTConfig(task_type="CAUSAL_LM", head_ratio=setup.head_ratio, channel_ratio=setup.channel_ratio)


def adapt(base, method: str, chat: Chat, sets: dict, setup: Setup, seed: int):
    """``base`` prepared for ``method`` (common.adapt); score-based selections read the run's first batches."""
    calibration = calibration_batches(chat, training_order(sets, setup, seed)[: setup.calibration_batches])
    return common.adapt(base, method, s2ft_config(setup), seed, METHODS[method], calibration)


_WORKER = {}


def load(setup: Setup):
    tokenizer = AutoTokenizer.from_pretrained(setup.model)
    model = AutoModelForCausalLM.from_pretrained(setup.model, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, tokenizer


def all_texts(sets: dict) -> list[str]:
    return ([e.prompt for examples in sets.values() for e in examples] + [q for q, _ in tasks.GENERAL_QUESTIONS]
            + tasks.GENERIC_INSTRUCTIONS)


def _init_worker(setup: Setup, reference: dict):
    torch.set_num_threads(1)
    model, tokenizer = load(setup)
    sets = tasks.splits(setup.train_per_skill, setup.validation, setup.test, setup.out_of_distribution, seed=0)
    _WORKER.update(setup=setup, base=model, chat=Chat(tokenizer, all_texts(sets)), sets=sets, reference=reference)


def run_job(job) -> dict:
    """One run: ``job`` is (method, learning rate, seed); evaluated at every checkpoint."""
    method, lr, seed = job
    setup, chat, sets, reference = (_WORKER[key] for key in ("setup", "chat", "sets", "reference"))
    start, cpu_start = time.perf_counter(), time.process_time()
    model = adapt(_WORKER["base"], method, chat, sets, setup, seed)
    setup_seconds = time.perf_counter() - start
    points, eval_seconds = [], []

    def checkpoint(step):
        start = time.perf_counter()
        points.append(dict(step=step, **evaluate(model, chat, evaluation_sets(sets), reference, setup)))
        eval_seconds.append(time.perf_counter() - start)

    train_seconds, train_cpu_seconds = finetune(model, chat, training_order(sets, setup, seed), lr, setup, checkpoint)
    return dict(method=method, lr=lr, seed=seed, trainable=sum(p.numel() for p in trainable(model)),
                setup_seconds=setup_seconds, train_seconds=train_seconds, train_cpu_seconds=train_cpu_seconds,
                eval_seconds=sum(eval_seconds), cpu_seconds=time.process_time() - cpu_start, points=points)


def jobs(setup: Setup) -> list[tuple]:
    """Seed by seed, so that an interrupted run already holds whole sweeps."""
    return [(method, lr, seed) for seed in range(setup.seeds) for method in setup.methods
            for lr in setup.learning_rates(method)]


def run(setup: Setup, runs_path: str, workers: int) -> dict:
    """Measure the base, then every job not yet in ``runs_path`` (one JSON line per finished run)."""
    torch.set_num_threads(1)  # as the workers: on a shared machine, more threads per process cost more than they give
    model, tokenizer = load(setup)
    sets = tasks.splits(setup.train_per_skill, setup.validation, setup.test, setup.out_of_distribution, seed=0)
    chat = Chat(tokenizer, all_texts(sets))
    start = time.perf_counter()
    reference = references(model, chat, setup)
    base = evaluate(model, chat, evaluation_sets(sets), reference, setup)
    print(f"base ({time.perf_counter() - start:.0f} s): answers {len(reference['questions'])} of "
          f"{reference['questions_asked']} general questions right; NLL of its own answers "
          f"{reference['base_nll']:.3f} nats/token; new tasks "
          + ", ".join(f"{k} {v:.2f}" for k, v in base.items() if k not in ("questions_kept", "drift")), flush=True)
    done = []
    if os.path.exists(runs_path):
        with open(runs_path) as handle:
            done = [json.loads(line) for line in handle if line.strip()]
    finished = {(r["method"], r["lr"], r["seed"]) for r in done}
    todo = [job for job in jobs(setup) if job not in finished]
    print(f"{len(done)} runs found in {runs_path}, {len(todo)} to go", flush=True)
    start = time.perf_counter()
    if todo:
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (setup, reference)) as pool, \
                open(runs_path, "a") as handle:
            for index, result in enumerate(pool.imap_unordered(run_job, todo), start=1):
                handle.write(json.dumps(result) + "\n")
                handle.flush()
                done.append(result)
                last = result["points"][-1]
                print(f"[{index}/{len(todo)} {time.perf_counter() - start:.0f} s] {result['method']} lr "
                      f"{result['lr']:g} seed {result['seed']}: new {last['new_test']:.2f}, ood "
                      f"{last['out_of_distribution']:.2f}, kept {last['questions_kept']:.2f}, drift "
                      f"{last['drift']:+.2f} (train {result['train_seconds']:.0f} s, eval "
                      f"{result['eval_seconds']:.0f} s, {result['cpu_seconds']:.0f} CPU s)", flush=True)
    wanted = set(jobs(setup))
    return dict(setup=asdict(setup), base=base, questions_right=len(reference["questions"]),
                questions_asked=reference["questions_asked"], base_nll=reference["base_nll"],
                runs=[r for r in done if (r["method"], r["lr"], r["seed"]) in wanted],
                seconds=time.perf_counter() - start,
                machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny scale, a smoke run of a few minutes")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/s2ft-quality-real"),
                        help="where finished runs are kept (a run resumes from them)")
    parser.add_argument("--output", default=None,
                        help="prefix of the JSON and PNG written (default benchmarks/quality_real; --quick: the cache)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    return parser.parse_args()


def main():
    args = parse_args()
    setup = QUICK if args.quick else Setup()
    if not os.path.isfile(os.path.join(setup.model, "config.json")):
        raise SystemExit(f"{setup.model} holds no model: run `make real-model` first.")
    os.makedirs(args.cache, exist_ok=True)
    output = args.output or (os.path.join(args.cache, "quick") if args.quick
                             else os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_real"))
    results = run(setup, os.path.join(args.cache, f"runs-{setup.key()}.jsonl"), args.workers)
    with open(output + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    print(report.text(results))
    report.plot(results, output + ".png")
    print(f"wrote {output}.json and {output}.png")


if __name__ == "__main__":
    main()
