"""Score-based unit selection (the paper's weight, activation, weight x activation and gradient strategies)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable, Optional

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .architectures import base_layer, linear_shape, linear_weight
from .distributed import agree_on_scores, is_partitioned, placeholder_weights_on_other_ranks, whole_weights
from .moe import ChannelStatistics, Experts, select_channels
from .selection import select_units, selection_count
from .structure import SCORING_ROLE, Block


def _default_forward(model, batch) -> torch.Tensor:
    """The language-modelling loss of a dict batch; padding (``attention_mask`` 0) is not predicted."""
    batch = dict(batch)
    if "labels" not in batch:
        mask = batch.get("attention_mask")
        labels = batch["input_ids"]
        batch["labels"] = labels if mask is None else labels.masked_fill(mask == 0, -100)
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

    Launched on several processes, call it on every rank before the model is sharded (before ``trainer.train()`` or
    ``accelerator.prepare``): the ranks sum their data scores, so each rank may pass its own share of the calibration
    data, take the weight magnitudes from rank 0, and all select the same units.
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
                count = selection_count(config, block, block.role(path), path)
                units = select_units(block, count, unit_scores, config.selection_order)
                layer.s2ft_indices[adapter_name].copy_(block.elements(block.role(path), units))
    agreed = agree_on_scores({path: statistics.sums for path, statistics in experts.items()}, combine="sum")
    for path, statistics in experts.items():
        statistics.sums = agreed[path]  # every rank selects the same channels from all ranks' data
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
    _check_scorable(modules, selection)
    if selection == "weight":
        return _weight_scores(modules)
    sums = {key: torch.zeros(linear_shape(module)[1], dtype=torch.float64) for key, module in modules.items()}
    tokens = {"mask": None}  # the batch's attention mask: padding must not score, however the set is batched

    def make_hook(key):
        def hook(_module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            mask = tokens["mask"]
            if mask is not None:
                x = x[mask.to(x.device)]
            if selection == "activation":
                sums[key] += x.abs().sum(0).double().cpu()
            elif selection == "weight_activation":
                sums[key] += x.square().sum(0).double().cpu()
            elif output.requires_grad:  # gradient: |dL/dW| summed over rows, per column
                output.register_hook(lambda grad: accumulate_gradient(key, grad, x, mask))

        return hook

    def accumulate_gradient(key, grad, x, mask):
        grad = grad.reshape(-1, grad.shape[-1]).float()
        if mask is not None:
            grad = grad[mask.to(grad.device)]
        sums[key] += (grad.t() @ x).abs().sum(0).double().cpu()

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
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                tokens["mask"] = None if mask is None else mask.reshape(-1).bool()
                for statistics in experts.values():
                    statistics.mask = tokens["mask"]
                loss = forward_fn(model, batch)
                if selection == "gradient":
                    loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    sums = agree_on_scores(sums, combine="sum")
    if selection == "weight_activation":  # Wanda-style: |W_ij| * ||x_j||
        weights = _weight_scores(modules)
        return {key: weights[key] * total.sqrt().float() for key, total in sums.items()}
    return {key: total.float() for key, total in sums.items()}


def _weight_scores(modules) -> dict:
    return agree_on_scores({key: _weight_column_sums(module) for key, module in modules.items()}, combine="rank0")


def _weight_column_sums(module) -> torch.Tensor:
    """Sum of |W| per input column of the weight the projection computes with (quantized bases dequantized)."""
    if hasattr(module, "dequantized_weight"):
        weight = module.dequantized_weight()
    else:
        base = base_layer(module)
        with whole_weights([base.weight]):
            weight = linear_weight(base).detach().clone()
    return weight.detach().float().abs().sum(0)


def _check_scorable(modules, selection) -> None:
    """Refuse, before any work, weights that scoring cannot read on this rank."""
    for module in modules.values():
        weight = base_layer(module).weight
        if isinstance(weight, DTensor):
            raise ValueError(
                "S2FT selection must be made before FSDP shards the model: call initialize_s2ft_selection before "
                "trainer.train() or accelerator.prepare(model)."
            )
        if selection != "weight" and is_partitioned(weight):
            raise ValueError(
                f"S2FT selection '{selection}' runs the model on calibration data, but DeepSpeed ZeRO-3 has partitioned "
                "its weights and runs it only inside its engine. Use selection='weight' or 'random' under ZeRO-3, or "
                "select under ZeRO-2 or FSDP, which shard after the selection is made."
            )
    if selection != "weight" and placeholder_weights_on_other_ranks():
        raise ValueError(
            f"S2FT selection '{selection}' runs the model on calibration data on every rank, but with FSDP's "
            "cpu_ram_efficient_loading only rank 0 has loaded the weights yet. Set fsdp_cpu_ram_efficient_loading: "
            "false, or use selection='weight' (scored from rank 0's weights) or 'random'."
        )
