"""Commonsense-170k and the eight benchmarks in LLM-Adapters' layout, the Alpaca-style prompt the paper trains and
evaluates with, and scoring by exact match of the first answer label a generation names.

Layout of an LLM-Adapters checkout (github.com/AGI-Edgerunners/LLM-Adapters): ``ft-training_set/commonsense_170k.json``
and ``dataset/<task>/test.json``, JSON lists of ``instruction``, ``input``, ``output`` and ``answer`` (the label).
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from ..generation import generate

TRAIN_FILE = os.path.join("ft-training_set", "commonsense_170k.json")
# each benchmark's answer labels, as the instructions ask for them
TASK_LABELS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def prompt(example: dict) -> str:
    if example.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT.format(instruction=example["instruction"])


def read_examples(path: str, required: tuple[str, ...], limit: Optional[int] = None) -> list[dict]:
    with open(path) as handle:
        examples = json.load(handle)[:limit]
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    missing = [key for key in required if any(key not in example for example in examples)]
    if missing:
        raise ValueError(f"Examples in {path} lack {missing}: expected LLM-Adapters' format.")
    return examples


def training_rows(path: str) -> dict[str, list[str]]:
    """Prompt/completion columns: TRL then computes the loss on the completion only, as the paper's training does."""
    examples = read_examples(path, ("instruction", "output"))
    return {"prompt": [prompt(example) for example in examples], "completion": [ex["output"] for ex in examples]}


def extract_label(task: str, generation: str) -> Optional[str]:
    """The first of the task's labels the generation names (case-insensitive), or None."""
    match = re.search("|".join(TASK_LABELS[task]), generation.lower())
    return match.group() if match else None


def evaluate(model, tokenizer, task: str, examples: list[dict], batch_size: int, max_new_tokens: int,
             num_beams: int) -> tuple[float, list[Optional[str]]]:
    """Accuracy on ``examples`` (their labels in ``answer``) and the label each generation named."""
    if task not in TASK_LABELS:
        raise ValueError(f"Unknown commonsense task {task!r}; choose from {sorted(TASK_LABELS)}.")
    prompts = tokenizer([prompt(example) for example in examples])["input_ids"]
    generations = generate(model, tokenizer, prompts, batch_size, max_new_tokens, num_beams=num_beams)
    predicted = [extract_label(task, text) for text in generations]
    correct = sum(label == example["answer"].lower() for label, example in zip(predicted, examples))
    return correct / len(examples), predicted
