"""MetaMathQA (training) and GSM8K (validation sample, test), from the Hub or from local JSON/JSONL files.

The split follows the published suite so that test accuracies compare: training on MetaMathQA without examples whose
query and response exceed ``MAX_CHARS`` characters, in the dataset's order; validation on ``VALID_SIZE`` questions drawn
from GSM8K's training split; test on the whole GSM8K test split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from datasets import Dataset, load_dataset

MAX_CHARS = 1300  # query + response; longer examples would not fit 768 tokens (about 6% of MetaMathQA)
VALID_SIZE = 50
BUCKET_BATCHES = 20  # batches sorted by length together: little padding, little ordering bias


def _load(path: Optional[str], hub_id: str, split: str, **hub_kwargs) -> Dataset:
    if path is None:
        return load_dataset(hub_id, split=split, **hub_kwargs)
    return load_dataset("json", data_files=path, split="train")


@dataclass
class Sources:
    """Local JSON/JSONL files replacing the Hub datasets (None: the Hub's)."""
    metamath: Optional[str] = None  # query, response
    gsm8k_train: Optional[str] = None  # question, answer; the validation sample is drawn from it
    gsm8k_test: Optional[str] = None  # question, answer
    forgetting_texts: Optional[str] = None  # text
    valid_size: int = VALID_SIZE


def load_splits(sources: Sources, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """(train, valid, test) with columns ``query`` and ``response``."""
    train = _load(sources.metamath, "meta-math/MetaMathQA", "train")
    train = train.filter(lambda row: len(f"{row['query']} {row['response']}") <= MAX_CHARS)
    gsm8k = {}
    for split, path in (("train", sources.gsm8k_train), ("test", sources.gsm8k_test)):
        gsm8k[split] = _load(path, "openai/gsm8k", split, name="main").rename_columns(
            {"question": "query", "answer": "response"})
    size = sources.valid_size
    if size > len(gsm8k["train"]):
        raise ValueError(f"valid_size {size} exceeds the {len(gsm8k['train'])} GSM8K training questions.")
    valid = gsm8k["train"].select(sorted(random.Random(seed).sample(range(len(gsm8k["train"])), size)))
    return train.select_columns(["query", "response"]), valid, gsm8k["test"]


def tokenize_for_training(dataset: Dataset, tokenizer, template: str, max_length: int) -> list[list[int]]:
    """Prompt, response and EOS as one sequence (the loss covers all of it, as in the published runs)."""
    texts = [template.format(query=query) + response for query, response in zip(dataset["query"], dataset["response"])]
    return [ids[: max_length - 1] + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]


def tokenize_prompts(dataset: Dataset, tokenizer, template: str, max_length: int) -> list[list[int]]:
    return [ids[:max_length] for ids in tokenizer([template.format(query=q) for q in dataset["query"]])["input_ids"]]


def length_grouped_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in dataset order, epoch after epoch, each bucket of ``BUCKET_BATCHES`` batches sorted longest first
    (an out-of-memory error then shows in the first steps)."""
    bucket = batch_size * BUCKET_BATCHES
    while True:
        for start in range(0, len(lengths), bucket):
            indices = sorted(range(start, min(start + bucket, len(lengths))), key=lambda i: -lengths[i])
            for first in range(0, len(indices), batch_size):
                yield indices[first:first + batch_size]


def collate(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``; ``labels`` ignore the padding."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def load_forgetting_texts(path: Optional[str] = None, count: int = 100) -> list[str]:
    """General text (``text`` column) whose loss before and after training measures forgetting: the first ``count``
    articles of FineWiki, streamed, unless a local file is given."""
    if path is not None:
        return load_dataset("json", data_files=path, split="train")["text"][:count]
    stream = load_dataset("HuggingFaceFW/finewiki", split="train", streaming=True)
    return [row["text"] for row in stream.take(count)]
