"""The synthetic tasks of the quality benchmark, as token ids (no tokenizer needed).

Task family A (pretraining): key -> value facts, and three rules over symbol sequences (copy, reverse, increment every
symbol mod the alphabet). Task B (fine-tuning): a new rule under a new task token, reverse-and-increment, which
composes two skills of A. B trains on short inputs over 12 of the 16 symbols; its held-out variations ask for inputs
with the other symbols, and for longer inputs (both of which A covers but B never shows): they reward updates that
reuse A's circuitry instead of fitting what B shows.

Every example is ``prompt + answer``; the loss and the accuracy cover the answer only. Accuracy is exact match of the
whole answer (EOS included) by teacher-forced argmax, which equals greedy decoding's exact match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PAD, BOS, EOS, SEP = 0, 1, 2, 3
FACT, COPY, REVERSE, INCREMENT, REVERSE_INCREMENT = 4, 5, 6, 7, 8  # REVERSE_INCREMENT is B's task token
SYMBOLS = 16
FIRST_SYMBOL = 16
FIRST_KEY = FIRST_SYMBOL + SYMBOLS
A_LENGTHS = range(2, 9)
B_TRAIN_LENGTHS = range(2, 7)
B_HELD_OUT_LENGTHS = range(7, 9)
B_TRAIN_SYMBOLS = 12  # B trains on symbols 0..11 only; A knows all 16

RULES = {
    COPY: lambda xs: list(xs),
    REVERSE: lambda xs: list(reversed(xs)),
    INCREMENT: lambda xs: [(x + 1) % SYMBOLS for x in xs],
    REVERSE_INCREMENT: lambda xs: [(x + 1) % SYMBOLS for x in reversed(xs)],
}


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]


def vocab_size(num_facts: int) -> int:
    return FIRST_KEY + num_facts


def fact_values(num_facts: int, seed: int) -> list[tuple[int, int]]:
    """The value (two symbols) of each key."""
    rng = random.Random(seed)
    return [(rng.randrange(SYMBOLS), rng.randrange(SYMBOLS)) for _ in range(num_facts)]


def fact_example(key: int, value: tuple[int, int]) -> Example:
    return Example([BOS, FACT, FIRST_KEY + key, SEP], [FIRST_SYMBOL + v for v in value] + [EOS])


def rule_example(task: int, symbols: list[int]) -> Example:
    return Example(
        [BOS, task] + [FIRST_SYMBOL + s for s in symbols] + [SEP],
        [FIRST_SYMBOL + s for s in RULES[task](symbols)] + [EOS],
    )


def random_symbols(rng: random.Random, lengths) -> list[int]:
    return [rng.randrange(SYMBOLS) for _ in range(rng.choice(list(lengths)))]


def a_training_stream(values, seed: int):
    """Endless pretraining examples: half facts, half rules (fresh random inputs every time)."""
    rng = random.Random(seed)
    while True:
        if rng.random() < 0.5:
            key = rng.randrange(len(values))
            yield fact_example(key, values[key])
        else:
            yield rule_example(rng.choice((COPY, REVERSE, INCREMENT)), random_symbols(rng, A_LENGTHS))


def a_evaluation_sets(values, size: int, seed: int) -> dict[str, list[Example]]:
    """Every fact, and ``size`` fixed random inputs per rule."""
    rng = random.Random(seed)
    sets = {"facts": [fact_example(key, value) for key, value in enumerate(values)]}
    for task, name in ((COPY, "copy"), (REVERSE, "reverse"), (INCREMENT, "increment")):
        sets[name] = [rule_example(task, random_symbols(rng, A_LENGTHS)) for _ in range(size)]
    return sets


def b_splits(train: int, validation: int, test: int, held_out: int, seed: int) -> dict[str, list[Example]]:
    """Disjoint sets of distinct inputs. train/validation/test: B's training lengths and symbols. Held-out variations
    of B: ``unseen_symbols`` (training lengths, at least one symbol B never shows) and ``longer`` (lengths B never
    shows, any symbol)."""
    rng = random.Random(seed)
    seen = set()

    def draw(count, lengths, accept):
        examples = []
        while len(examples) < count:
            symbols = tuple(random_symbols(rng, lengths))
            if symbols not in seen and accept(symbols):
                seen.add(symbols)
                examples.append(rule_example(REVERSE_INCREMENT, list(symbols)))
        return examples

    def trained(symbols):
        return max(symbols) < B_TRAIN_SYMBOLS

    return {
        "validation": draw(validation, B_TRAIN_LENGTHS, trained),
        "test": draw(test, B_TRAIN_LENGTHS, trained),
        "unseen_symbols": draw(held_out, B_TRAIN_LENGTHS, lambda symbols: not trained(symbols)),
        "longer": draw(held_out, B_HELD_OUT_LENGTHS, lambda symbols: True),
        "train": draw(train, B_TRAIN_LENGTHS, trained),
    }


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``, and ``labels`` on the answer tokens only (-100 elsewhere)."""
    length = max(len(e.prompt) + len(e.answer) for e in examples)
    input_ids = torch.full((len(examples), length), PAD)
    labels = torch.full((len(examples), length), -100)
    for row, e in enumerate(examples):
        tokens = e.prompt + e.answer
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, len(e.prompt) : len(tokens)] = torch.tensor(e.answer)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels}


def batches(examples: list[Example], size: int):
    for start in range(0, len(examples), size):
        yield collate(examples[start : start + size])


@torch.no_grad()
def score(model, examples: list[Example], batch_size: int = 256) -> tuple[float, float]:
    """Exact match (the fraction of examples whose whole answer is the argmax at every answer position) and the mean
    cross-entropy per answer token."""
    correct, loss, tokens = 0, 0.0, 0
    for batch in batches(examples, batch_size):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        answer = targets != -100
        correct += ((logits.argmax(-1) == targets) | ~answer).all(1).sum().item()
        loss += torch.nn.functional.cross_entropy(logits[answer], targets[answer], reduction="sum").item()
        tokens += answer.sum().item()
    return correct / len(examples), loss / tokens
