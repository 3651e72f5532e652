"""Score-based unit selection (the paper's weight, activation, weight x activation and gradient strategies)."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from peft.utils.integrations import dequantize_module_weight
from tqdm.auto import tqdm

from .selection import select_units, selection_count
from .structure import SCORING_PROJECTION, Block, projection_name


def _default_forward(model, batch) -> torch.Tensor:
    batch = dict(batch)
    batch.setdefault("labels", batch["input_ids"])
    return model(**batch).loss


def initialize_s2ft_selection(
    model,
    dataloader: Optional[Iterable] = None,
    adapter_name: str = "default",
    forward_fn: Callable = _default_forward,
    show_progress_bar: bool = True,
) -> None:
    """Select the units of ``adapter_name`` by its config's score-based strategy, from calibration batches.

    Scores come from the input side of each block (o_proj columns of a head, the down_proj column of a channel) of the
    base model with adapters disabled, in the original coordinates. ``forward_fn(model, batch)`` returns the loss
    (used by the gradient strategy); the default feeds a dict batch with ``labels = input_ids``.
    """
    tuner = model.base_model
    config = tuner.peft_config[adapter_name]
    if config.selection == "random":
        raise ValueError(f"S2FT adapter '{adapter_name}' uses random selection; there is nothing to calibrate.")
    if config.selection != "weight" and dataloader is None:
        raise ValueError(f"S2FT selection '{config.selection}' needs a calibration dataloader.")
    blocks: dict[str, Block] = {}
    for _, block, layer in tuner.s2ft_layers():
        if adapter_name in layer.s2ft_indices:
            blocks[block.key] = block
    with tuner.original_layout():  # score in the original coordinates
        column_scores = _column_scores(
            model, tuner, blocks, config.selection, dataloader, forward_fn, show_progress_bar
        )
        for path, block, layer in tuner.s2ft_layers():
            if adapter_name in layer.s2ft_indices:
                unit_scores = column_scores[block.key].view(block.num_units, block.unit_size).sum(1)
                count = selection_count(config, block, projection_name(path), path)
                units = select_units(block, count, unit_scores, config.selection_order)
                layer.s2ft_indices[adapter_name].copy_(block.elements(projection_name(path), units))
    tuner.s2ft_uncalibrated.discard(adapter_name)


def _column_scores(model, tuner, blocks, selection, dataloader, forward_fn, show_progress_bar):
    """Per input column of each block's scoring projection."""
    modules = {
        key: tuner.model.get_submodule(block.projections[SCORING_PROJECTION[block.kind]]) for key, block in blocks.items()
    }
    if selection == "weight":
        return {key: _weight_column_sums(module) for key, module in modules.items()}
    sums = {key: torch.zeros(module.in_features, dtype=torch.float64) for key, module in modules.items()}

    def make_hook(key):
        def hook(_module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if selection == "activation":
                sums[key] += x.abs().sum(0).double().cpu()
            elif selection == "weight_activation":
                sums[key] += x.square().sum(0).double().cpu()
            elif output.requires_grad:  # gradient: |dL/dW| summed over rows, per column
                output.register_hook(lambda grad: accumulate_gradient(key, grad, x))

        return hook

    def accumulate_gradient(key, grad, x):
        sums[key] += (grad.reshape(-1, grad.shape[-1]).float().t() @ x).abs().sum(0).double().cpu()

    handles = [module.register_forward_hook(make_hook(key)) for key, module in modules.items()]
    embeddings = tuner.model.get_input_embeddings()
    if selection == "gradient":  # frozen weights: let the loss reach the blocks through the embeddings' output
        handles.append(embeddings.register_forward_hook(lambda _m, _i, output: output.requires_grad_(True)))
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.set_grad_enabled(selection == "gradient"):
            for batch in tqdm(dataloader, desc="S2FT selection", disable=not show_progress_bar):
                loss = forward_fn(model, batch)
                if selection == "gradient":
                    loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if selection == "weight_activation":  # Wanda-style: |W_ij| * ||x_j||
        return {key: _weight_column_sums(modules[key]) * total.sqrt().float() for key, total in sums.items()}
    return {key: total.float() for key, total in sums.items()}


def _weight_column_sums(module) -> torch.Tensor:
    """Sum of |W| per input column of the weight the projection computes with (quantized bases dequantized)."""
    if hasattr(module, "dequantized_weight"):
        weight = module.dequantized_weight()
    else:
        weight = dequantize_module_weight(module.get_base_layer() if hasattr(module, "get_base_layer") else module)
    return weight.detach().float().abs().sum(0)
