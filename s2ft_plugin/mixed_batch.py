"""Mixed-adapter batches: ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``.

PEFT's convention, as for LoRA: one adapter name per row of the batch, ``"__base__"`` for the base model. PeftModel
hands its forward/generate arguments to the tuner's ``_enable_peft_forward_hooks`` and then drops PEFT's special
arguments, so anything S2FT does not serve must be refused here or it is silently ignored. The names reach every S2FT
layer (and ``modules_to_save`` wrapper) as a forward argument through pre-forward hooks; the layers refuse a batch
of another length and merged adapters.

``generate`` repeats each row ``num_beams``/``num_return_sequences`` times before decoding (and after encoding, for
encoder-decoder models); the names follow the rows because the model's own expansion step repeats them too, whatever
set the expansion (arguments, a ``GenerationConfig``, the model's default generation config).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Optional

import torch

from peft.utils.other import AuxiliaryTrainingWrapper

from .layer import MIXED_BATCH, S2FTLayer
from .moe import Experts

# PeftModel's special forward arguments that S2FT has no use for: passing one raises instead of being dropped
UNSUPPORTED_FORWARD_ARGS = {"alora_offsets": "aLoRA offsets apply to activated LoRA adapters only"}


class _RowAdapters:
    """The adapter of each row of the batch the model sees now, and the tokens per row of the current call."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.tokens: Optional[int] = None

    def for_input(self, x) -> list[str]:
        """The names for a layer input: per row, or per token where the model flattened its (batch, tokens) rows into
        one (batch x tokens) axis (OPT's FFN), batch-major as a reshape leaves them."""
        batch, tokens = len(self.names), self.tokens
        if isinstance(x, torch.Tensor) and x.dim() == 2 and tokens and tokens > 1 and x.shape[0] == batch * tokens:
            return [name for name in self.names for _ in range(tokens)]
        return self.names

    def repeat(self, times: int) -> None:
        self.names = [name for name in self.names for _ in range(times)]


@contextlib.contextmanager
def mixed_batch(tuner, kwargs: dict):
    """While active, ``kwargs["adapter_names"]`` (if given) selects each row's adapter in every S2FT layer."""
    for name, reason in UNSUPPORTED_FORWARD_ARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"S2FT models cannot honour `{name}`: {reason}.")
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    _check_adapter_names(tuner, adapter_names)
    rows = _RowAdapters(list(adapter_names))
    handles = [tuner.model.register_forward_pre_hook(partial(_note_tokens, rows=rows), with_kwargs=True)]
    handles += [
        module.register_forward_pre_hook(partial(_pass_adapter_names, rows=rows), with_kwargs=True)
        for module in tuner.model.modules()
        if isinstance(module, (S2FTLayer, AuxiliaryTrainingWrapper))
    ]
    token = MIXED_BATCH.set(True)
    try:
        with _names_follow_generation_expansion(tuner.model, rows):
            yield
    finally:
        MIXED_BATCH.reset(token)
        for handle in handles:
            handle.remove()


def _check_adapter_names(tuner, adapter_names) -> None:
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"`adapter_names` must be a list with one adapter name per row, got {adapter_names!r}.")
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    layers = [module for module in tuner.model.modules() if isinstance(module, S2FTLayer)]
    known = {name for layer in layers for name in layer.s2ft_indices}
    unknown = sorted(set(adapter_names) - known - {"__base__"})
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    on_experts = sorted({name for layer in layers if isinstance(layer, Experts) for name in layer.s2ft_indices}
                        & set(adapter_names))
    if on_experts:
        raise ValueError(
            f"S2FT adapter(s) {on_experts} adapt MoE experts, which do not serve mixed-adapter batches "
            "(`adapter_names`): run their rows in batches of their own with the adapter set active, or merge it. Rows "
            "of adapters that leave the experts alone can be mixed."
        )


def _note_tokens(_model, args, kwargs, rows: _RowAdapters) -> None:
    """Record the tokens per row of this call of the model (each generation step has its own)."""
    inputs = next((value for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1])
                   if value is not None), None)
    rows.tokens = inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None


def _pass_adapter_names(_module, args, kwargs, rows: _RowAdapters):
    kwargs["adapter_names"] = rows.for_input(args[0] if args else None)
    return args, kwargs


@contextlib.contextmanager
def _names_follow_generation_expansion(model, rows: _RowAdapters):
    """While active, the model's generation input expansion (transformers' ``_expand_inputs_for_generation``, which
    repeats each row ``expand_size`` times) repeats the rows' adapter names the same way."""
    original = getattr(model, "_expand_inputs_for_generation", None)
    if original is None or "_expand_inputs_for_generation" in vars(model):
        yield  # no expansion step to follow: a changed batch size is refused by the layers
        return

    def expand(expand_size: int = 1, *args, **kwargs):
        result = original(expand_size, *args, **kwargs)
        rows.repeat(expand_size)
        return result

    model._expand_inputs_for_generation = expand
    try:
        yield
    finally:
        del model._expand_inputs_for_generation
