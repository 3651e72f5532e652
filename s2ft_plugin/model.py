from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists

from .bnb import bnb_layer_class
from .config import S2FTConfig
from .layer import Linear, S2FTLayer
from .selection import random_scores, select_units
from .structure import PROJECTIONS, Block, check_projection, find_block, projection_name

# Llama-family blocks: o_proj and down_proj adapt their inputs, so partial backprop keeps only selected activations.
TARGET_MODULES = {
    model_type: ["o_proj", "down_proj"]
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
}


class S2FTModel(BaseTuner):
    """Injects S²FT layers and keeps the co-permutation of the base weights.

    ``s2ft_unit_orders`` maps a block name to the permutation of its heads/channels currently applied to the base
    weights (absent: original order). The first adapter with ``permute=True`` owns it: its selection is made
    contiguous; other adapters address their units through it. Saved indices are always in the original coordinates.
    """

    prefix: str = "s2ft_"
    tuner_layer_cls = S2FTLayer
    target_module_mapping = TARGET_MODULES

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self.s2ft_unit_orders: dict[str, torch.Tensor] = {}
        self.s2ft_order_owner: Optional[str] = None
        self.s2ft_uncalibrated: set[str] = set()
        self._blocks: dict[str, Block] = {}
        self._pending_units: dict[str, torch.Tensor] = {}
        # adapters injected since the last forward pass that no load has filled yet: a failed load may remove these
        self._unfilled_adapters: set[str] = set()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.arrange())

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        self._check_targets(model, config)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._pending_units.clear()
        self._unfilled_adapters.add(adapter_name)
        if config.selection != "random":
            self.s2ft_uncalibrated.add(adapter_name)
        if config.permute and self.s2ft_order_owner is None:
            self.s2ft_order_owner = adapter_name
        self.arrange()

    def _check_targets(self, model: nn.Module, config: S2FTConfig) -> None:
        """Refuse unsupported targets before any module is replaced, so a failure leaves the model as it was."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        layer_paths = tuple(path + "." for path, module in model.named_modules() if isinstance(module, S2FTLayer))
        for key, module in model.named_modules():
            if not key or key.startswith(layer_paths) or not check_target_module_exists(config, key):
                continue
            check_projection(key)
            block = self._block(model, key)
            base = _base(module)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"S2FT supports torch.nn.Linear projections; '{key}' is a {type(base).__name__}.")
            if config.permute:
                self._check_permutable(model, block)

    def _check_permutable(self, model: nn.Module, block: Block) -> None:
        if block.fused:
            raise ValueError(
                f"S2FT cannot co-permute block '{block.name}': its fused projection '{block.fused[0]}' mixes "
                "projections. Set permute=False (o_proj/down_proj then still train without co-permutation)."
            )
        for path in block.projections.values():
            base = _base(model.get_submodule(path))
            if not base.weight.dtype.is_floating_point or bnb_layer_class(base) is not None:
                raise ValueError(
                    f"S2FT cannot co-permute '{path}': its weight is {base.weight.dtype} (quantized). Set permute=False."
                )

    def _block(self, model: nn.Module, key: str) -> Block:
        cache_key = f"{key.rsplit('.', 1)[0]}:{PROJECTIONS[projection_name(key)][0]}"
        if cache_key not in self._blocks:
            self._blocks[cache_key] = find_block(model, key)
        return self._blocks[cache_key]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        block = self._block(self.model, current_key)
        if block.key not in self._pending_units:
            count = config.unit_count(block.kind, block.num_units)
            self._pending_units[block.key] = select_units(
                block, count, random_scores(block, config.seed), config.selection_order
            )
        projection = projection_name(current_key)
        indices = block.elements(projection, self._pending_units[block.key])
        if isinstance(target, S2FTLayer):
            target.update_layer(adapter_name, indices, config.init_weights, inference_mode=config.inference_mode)
            return
        layer_cls = bnb_layer_class(target) or Linear
        new_module = layer_cls(target, adapter_name, side=block.side(projection), unit_size=block.unit_size,
                               indices=indices, init_weights=config.init_weights)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ co-permutation
    def s2ft_layers(self):
        """(path, block, layer) of every S2FT layer, paths relative to the wrapped model."""
        for path, module in self.model.named_modules():
            if isinstance(module, S2FTLayer):
                yield path, self._block(self.model, path), module

    def adapter_units(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Selected units (query heads or channels, original coordinates) of an adapter, per block name."""
        units: dict[str, torch.Tensor] = {}
        for path, block, layer in self.s2ft_layers():
            if adapter_name not in layer.s2ft_indices:
                continue
            found = block.units_from_elements(projection_name(path), layer.s2ft_indices[adapter_name].cpu())
            # key/value rows name whole groups; a query-axis projection of the same block names the exact heads
            if block.key not in units or block.axis(projection_name(path)) != "key_value":
                units[block.key] = found
        return units

    def arrange(self) -> None:
        """Permute each block so that the owner's units are contiguous, then re-point every adapter's positions."""
        owner_units = self.adapter_units(self.s2ft_order_owner) if self.s2ft_order_owner else {}
        layers = list(self.s2ft_layers())
        for key in {block.key for _, block, _ in layers} | set(self.s2ft_unit_orders):
            block = self._blocks[key]
            self._reorder(block, block.contiguous_order(owner_units[key]) if key in owner_units else None)
        for path, block, layer in layers:
            order = self.s2ft_unit_orders.get(block.key)
            inverse = None if order is None else torch.argsort(block.element_permutation(projection_name(path), order))
            for adapter_name, indices in layer.s2ft_indices.items():
                layer.set_positions(adapter_name, indices if inverse is None else inverse.to(indices.device)[indices])

    @torch.no_grad()
    def _reorder(self, block: Block, target: Optional[torch.Tensor]) -> None:
        identity = torch.arange(block.num_units)
        current = self.s2ft_unit_orders.get(block.key, identity)
        target = identity if target is None else target
        if torch.equal(current, target):
            return
        relative = torch.argsort(current)[target]
        for projection, path in block.projections.items():
            base = _base(self.model.get_submodule(path))
            elements = block.element_permutation(projection, relative).to(base.weight.device)
            dim = 0 if block.side(projection) == "output" else 1
            base.weight.data.copy_(base.weight.data.index_select(dim, elements))
            if dim == 0 and base.bias is not None:
                base.bias.data.copy_(base.bias.data[elements])
        if torch.equal(target, identity):
            self.s2ft_unit_orders.pop(block.key, None)
        else:
            self.s2ft_unit_orders[block.key] = target

    # ------------------------------------------------------------------ PEFT behaviour
    def forward(self, *args, **kwargs):
        self._unfilled_adapters.clear()
        if self.training and self.s2ft_uncalibrated & set(self.active_adapters):
            names = sorted(self.s2ft_uncalibrated & set(self.active_adapters))
            raise RuntimeError(
                f"S2FT adapter(s) {names} use a score-based selection that has not been computed: call "
                "s2ft_plugin.initialize_s2ft_selection(model, dataloader) before training."
            )
        return self.model(*args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.s2ft_uncalibrated.discard(adapter_name)
        self._unfilled_adapters.discard(adapter_name)
        if self.s2ft_order_owner == adapter_name:
            self.s2ft_order_owner = next(
                (name for name, cfg in self.peft_config.items() if cfg.permute and name != adapter_name), None
            )
        self.arrange()

    def _check_finite(self, adapter_names: Optional[list[str]]) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for path, _, layer in self.s2ft_layers():
            for name in names:
                if name in layer.s2ft_delta and not torch.isfinite(layer.s2ft_delta[name]).all():
                    raise ValueError(
                        f"NaNs detected in the S2FT adapter '{name}' at '{path}'; nothing was merged."
                    )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_finite(adapter_names)
        self.s2ft_order_owner = None
        self.arrange()  # restores the original order, so exported weights are a drop-in checkpoint
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the saved indices and deltas against the layers before loading; roll the adapter back if unfit."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            _check_adapter_tensors(model, adapter_name, remapped)
        except ValueError:
            _roll_back(model, adapter_name)
            raise
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, S2FTModel):
            tuner.s2ft_uncalibrated.discard(adapter_name)
            tuner._unfilled_adapters.discard(adapter_name)
        return remapped


def _roll_back(model: nn.Module, adapter_name: str) -> None:
    """Undo what the failed load added: its freshly injected adapter, or S2FT altogether if that was the only one.

    An adapter that was already in use (trained, or loaded before) is left as it was: nothing was loaded into it.
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, S2FTModel) or adapter_name not in tuner._unfilled_adapters:
        return
    if len(tuner.peft_config) > 1:
        model.delete_adapter(adapter_name)
    else:
        tuner.unload()


def _check_adapter_tensors(model: nn.Module, adapter_name: str, state_dict: dict) -> None:
    for path, module in model.named_modules():
        if not isinstance(module, S2FTLayer) or adapter_name not in module.s2ft_delta:
            continue
        indices = state_dict.get(f"{path}.s2ft_indices.{adapter_name}")
        delta = state_dict.get(f"{path}.s2ft_delta.{adapter_name}")
        if indices is None or delta is None:
            raise ValueError(
                f"S2FT adapter '{adapter_name}' has no {'indices' if indices is None else 'delta'} for '{path}'; the "
                "adapter was saved for other target modules or is incomplete."
            )
        expected = module.s2ft_delta[adapter_name].shape
        try:
            module.check_indices(adapter_name, indices, expected_count=module.s2ft_indices[adapter_name].numel())
        except ValueError as error:
            raise ValueError(f"{error} Module: '{path}'.") from None
        if tuple(delta.shape) != tuple(expected):
            raise ValueError(
                f"S2FT adapter '{adapter_name}' has a delta of shape {tuple(delta.shape)} for '{path}' but this base "
                f"model needs {tuple(expected)}."
            )


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, S2FTLayer) else module

