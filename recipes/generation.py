"""Batched generation for the recipes' evaluations: prompts left-padded, completions decoded without their prompt."""

from __future__ import annotations

from typing import Optional

import torch


def left_pad(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             max_length: Optional[int] = None, num_beams: int = 1) -> list[str]:
    """Deterministic completions (greedy, or beam search with ``num_beams``) of tokenized prompts: at most
    ``max_new_tokens`` new tokens, and at most ``max_length`` tokens with the batch's padded prompt."""
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        limit = max_new_tokens if max_length is None else min(max_new_tokens, max_length - width)
        output = model.generate(input_ids=batch["input_ids"].to(model.device),
                                attention_mask=batch["attention_mask"].to(model.device), max_new_tokens=max(1, limit),
                                do_sample=False, num_beams=num_beams, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return completions
