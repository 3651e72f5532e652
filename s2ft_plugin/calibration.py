"""Score-based unit selection (the paper's weight, activation, weight x activation and gradient strategies)."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from .architectures import base_layer, linear_shape, linear_weight
from .moe import ChannelStatistics, Experts, select_channels
from .selection import select_units
from .structure import SCORING_ROLE, Block


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

    Scores come from the input side of each block (o_proj columns of a head, the down_proj column of a channel; each
    expert's own down_proj columns in MoE blocks) of the base model with adapters disabled, in the original
    coordinates. ``forward_fn(model, batch)`` returns the loss
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
    experts = {
        path: ChannelStatistics(layer, config.selection)
        for path, layer in tuner.model.named_modules()
        if isinstance(layer, Experts) and adapter_name in layer.s2ft_indices
    }
    with tuner.original_layout():  # score in the original coordinates
        column_scores = _column_scores(
            model, tuner, blocks, experts, config.selection, dataloader, forward_fn, show_progress_bar
        )
        for path, block, layer in tuner.s2ft_layers():
            if adapter_name in layer.s2ft_indices:
                unit_scores = column_scores[block.key].view(block.num_units, block.unit_size).sum(1)
                count = config.unit_count(block.kind, block.num_units)
                units = select_units(block, count, unit_scores, config.selection_order)
                layer.s2ft_indices[adapter_name].copy_(block.elements(block.role(path), units))
    for statistics in experts.values():
        layout = statistics.layer.layout
        channels = select_channels(
            config.unit_count("channels", layout.channels), statistics.scores(), config.selection_order
        )
        statistics.layer.s2ft_indices[adapter_name].copy_(channels)
    tuner.s2ft_uncalibrated.discard(adapter_name)


def _column_scores(model, tuner, blocks, experts, selection, dataloader, forward_fn, show_progress_bar):
    """Per input column of each block's scoring projection; the experts' statistics gather in the same pass."""
    modules = {}
    for key, block in blocks.items():
        role = SCORING_ROLE[block.kind]
        if role not in block.projections:
            raise ValueError(f"S2FT cannot score the units of block '{block.name}': it has no {role} projection.")
        modules[key] = tuner.model.get_submodule(block.projections[role])
    if selection == "weight":
        return {key: _weight_column_sums(module) for key, module in modules.items()}
    sums = {key: torch.zeros(linear_shape(module)[1], dtype=torch.float64) for key, module in modules.items()}

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
    handles += [stats.layer.register_forward_hook(stats.hook, with_kwargs=True) for stats in experts.values()]
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
    weight = module.dequantized_weight() if hasattr(module, "dequantized_weight") else linear_weight(base_layer(module))
    return weight.detach().float().abs().sum(0)
