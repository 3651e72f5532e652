"""S2FT options for HfArgumentParser/TrlParser scripts (YAML keys and command-line flags), shared by the TRL example
and the recipes so that each option is spelled and validated in one place."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .calibration import initialize_s2ft_selection
from .config import S2FTConfig


@dataclass
class S2FTArguments:
    s2ft_target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Default: o_proj and down_proj."})
    s2ft_head_ratio: float = field(default=0.125, metadata={"help": "Fraction of attention heads trained per block."})
    s2ft_num_heads: Optional[int] = field(default=None, metadata={"help": "Heads per block (overrides the ratio)."})
    s2ft_channel_ratio: float = field(default=0.05, metadata={"help": "Fraction of FFN channels trained per block."})
    s2ft_num_channels: Optional[int] = field(default=None, metadata={"help": "Channels per block (overrides ratio)."})
    s2ft_selection: str = field(default="random", metadata={"help": "random, weight, activation, weight_activation "
                                                                     "or gradient."})
    s2ft_selection_order: str = field(default="large", metadata={"help": "Keep the largest or smallest scores."})
    s2ft_calibration_batches: int = field(default=8, metadata={"help": "Batches scoring a data-based selection."})
    s2ft_seed: int = field(default=42, metadata={"help": "Seed of the random selection."})
    s2ft_permute: Optional[bool] = field(default=None, metadata={"help": "Co-permute the base weights (default: "
                                                                          "wherever the block allows it)."})
    s2ft_delta_dtype: str = field(default="float32", metadata={"help": "dtype of the trainable deltas."})

    def to_config(self) -> S2FTConfig:
        return S2FTConfig(
            task_type="CAUSAL_LM", target_modules=self.s2ft_target_modules, head_ratio=self.s2ft_head_ratio,
            num_heads=self.s2ft_num_heads, channel_ratio=self.s2ft_channel_ratio, num_channels=self.s2ft_num_channels,
            selection=self.s2ft_selection, selection_order=self.s2ft_selection_order, seed=self.s2ft_seed,
            permute=self.s2ft_permute,
        )

    def cast_deltas(self, model) -> None:
        """Hold the trainable deltas in ``s2ft_delta_dtype``: TRL casts a quantized model's trainable parameters to
        bf16 (QLoRA's recipe). Call it before the optimizer is created (``trainer.train()`` creates it)."""
        dtype = getattr(torch, self.s2ft_delta_dtype)
        for name, param in model.named_parameters():
            if "s2ft_delta" in name:
                param.data = param.data.to(dtype)


def select_from_training_data(trainer, num_batches: int) -> None:
    """Score-based selection from the first ``num_batches`` batches of a Trainer's own training data.

    Every process scores the same batches and the ranks' scores are combined, so all select the units one process
    would; call it before ``trainer.train()``.
    """
    loader = DataLoader(trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size,
                        collate_fn=trainer.data_collator)
    initialize_s2ft_selection(trainer.model, itertools.islice(loader, num_batches),
                              show_progress_bar=trainer.accelerator.is_main_process)
