from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists

from s2ft_format.tensors import check_delta, check_present, stray_error

from .bnb import bnb_layer_class, standard_4bit_layouts
from .combine import add_weighted_adapter
from .config import S2FTConfig
from .architectures import base_layer, default_target_modules, is_conv1d
from .distributed import adapter_entries
from .layer import Linear, S2FTLayer, add_compiled_sync_hook, remove_compiled_sync_hook
from .layout import Layout, layout_blocker, through_tuner
from .mixed_batch import mixed_batch
from .moe import Experts, add_experts_adapter, check_experts_target, is_experts, targeted_parts
from .selection import random_scores, select_units, selection_count
from .structure import ROLES, Block, find_block, projection_role, text_config
from .transactions import loading, note_created


class S2FTModel(BaseTuner):
    """Injects S²FT layers and keeps the co-permutation of the base weights.

    The first adapter injected into the model lays out the blocks it targets so that its units are contiguous
    (``permute``); that layout then stays until ``unload``/``merge_and_unload`` restore the original order: adding,
    loading or deleting other adapters never moves base weights, so they cannot change what a concurrent forward of
    another adapter computes. Every adapter addresses its units through the layout; saved indices are always in the
    original coordinates.
    """

    prefix: str = "s2ft_"
    tuner_layer_cls = S2FTLayer

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # a model that already holds S2FT layers (transformers' own ``load_adapter`` makes a new tuner per adapter)
        # keeps their layout: the new adapter addresses its units through it and moves no base weights
        self.s2ft_layout = _layout_of(model) or Layout()
        self.s2ft_layout_owner: Optional[str] = None
        self.s2ft_uncalibrated: set[str] = set()
        self._blocks: dict[str, Block] = {}
        self._pending_units: dict[tuple[str, int], torch.Tensor] = {}  # (block key, count) -> units being added
        note_created(self)
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.register_load_state_dict_pre_hook(_load_through_tuner)
        self.register_load_state_dict_post_hook(lambda tuner, _keys: tuner.arrange())  # lay out loaded selections

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        owns_layout = (config.permute is not False and self.s2ft_layout_owner is None and len(self.peft_config) == 1
                       and _layout_of(model) is None)
        self._check_targets(model, adapter_name, config, owns_layout)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._pending_units.clear()
        if config.selection != "random":
            self.s2ft_uncalibrated.add(adapter_name)
        if owns_layout:
            self.s2ft_layout_owner = adapter_name
        try:
            self.arrange()
        except LayoutRefused:  # permute=True on a block that fails verification: the caller's model as it was
            self._unload_and_optionally_merge(merge=False)
            raise
        add_compiled_sync_hook(model)

    def _check_targets(self, model: nn.Module, adapter_name: str, config: S2FTConfig, owns_layout: bool) -> None:
        """Refuse what cannot be honoured before any module is replaced, so a failure leaves the model as it was."""
        _check_adapter_name(adapter_name)
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        layer_paths = tuple(path + "." for path, module in model.named_modules() if isinstance(module, BaseTunerLayer))
        for key, module in model.named_modules():
            if not key or key.startswith(layer_paths) or not self._check_target_module_exists(config, key):
                continue
            if is_experts(module):
                check_experts_target(config, key, module)
                continue
            block = self._block(model, key)
            base = base_layer(module)
            if not (isinstance(base, nn.Linear) or is_conv1d(base)):
                raise TypeError(f"S2FT supports linear projections; '{key}' is a {type(base).__name__}.")
            selection_count(config, block, block.role(key), key)
            blocker = layout_blocker(model, block) if owns_layout and config.permute and not loading() else None
            if blocker is not None:
                raise ValueError(
                    f"S2FT cannot honour permute=True: {blocker}, so its coupled weights cannot be co-permuted. Leave "
                    "permute unset to co-permute only the blocks that allow it, or set permute=False."
                )
        _check_layers_exist(model, config, layer_paths)

    def _prepare_adapter_config(self, peft_config: S2FTConfig, model_config: dict) -> S2FTConfig:
        """Default targets: the input side of each block (on MoE models ``down_proj`` also names the experts')."""
        if peft_config.target_modules is None:
            peft_config.target_modules = set(default_target_modules(text_config(self.model)))
        return peft_config

    def _check_target_module_exists(self, peft_config, key):
        """Projections match by name; fused MoE experts match through their parts (``...experts.down_proj``)."""
        found = check_target_module_exists(peft_config, key)
        if found or isinstance(found, _ExcludedModule):
            return found
        try:
            module = self.model.get_submodule(key)
        except AttributeError:  # PEFT lists modules before injecting: this one was inside a module now wrapped
            return False
        return bool(targeted_parts(peft_config, key, module))

    def _block(self, model: nn.Module, key: str) -> Block:
        cache_key = f"{key.rsplit('.', 1)[0]}:{ROLES[projection_role(model, key)][0]}"
        if cache_key not in self._blocks:
            self._blocks[cache_key] = find_block(model, key)
        return self._blocks[cache_key]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if is_experts(target):
            new_module = add_experts_adapter(config, adapter_name, target, current_key)
            if new_module is not None:
                if adapter_name not in self.active_adapters:
                    new_module.requires_grad_(False)
                self._replace_module(parent, target_name, new_module, target)
            return
        block = self._block(self.model, current_key)
        role = block.role(current_key)
        count = selection_count(config, block, role, current_key)
        if (block.key, count) not in self._pending_units:
            self._pending_units[block.key, count] = select_units(
                block, count, random_scores(block, config.seed), config.selection_order
            )
        indices = block.elements(role, self._pending_units[block.key, count])
        if isinstance(target, S2FTLayer):
            target.update_layer(adapter_name, indices, config.init_weights, inference_mode=config.inference_mode)
            return
        layer_cls = bnb_layer_class(target) or Linear
        new_module = layer_cls(target, adapter_name, side=block.side(role), unit_size=block.unit_size,
                               indices=indices, init_weights=config.init_weights)
        # how the layer maps indices to positions on its own (not a submodule, not saved)
        object.__setattr__(new_module, "_s2ft_place", (self.s2ft_layout, block, role))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, Experts) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)  # unloading experts: they hold 3-D parameters, no .weight to relink
            return
        super()._replace_module(parent, child_name, new_module, child)

    # ------------------------------------------------------------------ co-permutation
    def s2ft_layers(self):
        """(path, block, layer) of every S2FT layer of an attention or FFN block, paths relative to the wrapped model
        (MoE experts have their own layer, outside any block)."""
        for path, module in self.model.named_modules():
            if isinstance(module, S2FTLayer) and not isinstance(module, Experts):
                yield path, self._block(self.model, path), module

    def adapted_blocks(self) -> dict[str, Block]:
        """Block key -> block, for every block with an S2FT layer."""
        return {block.key: block for _, block, _ in self.s2ft_layers()}

    def adapter_units(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Selected units (query heads or channels, original coordinates) of an adapter, per block key."""
        units: dict[str, torch.Tensor] = {}
        for path, block, layer in self.s2ft_layers():
            if adapter_name not in layer.s2ft_indices:
                continue
            role = block.role(path)
            found = block.units_from_elements(role, layer.s2ft_indices[adapter_name].cpu())
            # key/value rows name whole groups; a query-axis projection of the same block names the exact heads
            if block.key not in units or ROLES[role][2] != "key_value":
                units[block.key] = found
        return units

    def arrange(self) -> None:
        """Lay out the owner's blocks so its units are contiguous, then point every adapter at its units.

        Every move is verified (``Layout.move_verified``): a block whose function a move would change stays where it
        is and still trains, with a warning; if the owner asked for ``permute=True`` (and is not being loaded, where
        ``permute`` is a preference), a ValueError follows once every adapter points at its units.
        """
        refused = {}
        owner = self.s2ft_layout_owner
        if owner is not None:
            moves = [(self._blocks[key], self._blocks[key].contiguous_order(units))
                     for key, units in self.adapter_units(owner).items()
                     if layout_blocker(self.model, self._blocks[key]) is None]
            refused = self.s2ft_layout.move_verified(self.model, moves)
        for path, block, layer in self.s2ft_layers():
            for adapter_name, indices in layer.s2ft_indices.items():
                layer.set_positions(adapter_name, self.s2ft_layout.positions(block, block.role(path), indices))
        if refused:
            _report_refused(refused, strict=self.peft_config[owner].permute is True and not loading())

    @contextlib.contextmanager
    def original_layout(self):
        """Undo the co-permutation for the duration (e.g. to score units in the original coordinates)."""
        owner, self.s2ft_layout_owner = self.s2ft_layout_owner, None
        self._restore_original_order()
        try:
            yield
        finally:
            self.s2ft_layout_owner = owner
            self.arrange()

    def _restore_original_order(self) -> None:
        for block in list(self.s2ft_layout.blocks.values()):
            self.s2ft_layout.move(self.model, block, None)
        self.arrange()

    def state_dict(self, *args, **kwargs):
        """Base weights stay in the current layout (no copy); the layout is recorded beside them (extra state).
        PeftModel's state dict, which every save and hotswap takes, passes through here."""
        with through_tuner(), standard_4bit_layouts(self.model):
            return super().state_dict(*args, **kwargs)

    def get_extra_state(self) -> torch.Tensor:
        return self.s2ft_layout.extra_state(self.adapted_blocks())

    def set_extra_state(self, state) -> None:
        """Nothing to set: the load pre-hook has already brought the weights from the saved layout to this one."""

    # ------------------------------------------------------------------ PEFT behaviour
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PeftModel's forward and generate hand their arguments here: serves ``adapter_names`` (one adapter per row)
        and refuses the special arguments S2FT cannot honour."""
        return mixed_batch(self, kwargs)

    def forward(self, *args, **kwargs):
        if self.training and self.s2ft_uncalibrated & set(self.active_adapters):
            names = sorted(self.s2ft_uncalibrated & set(self.active_adapters))
            raise RuntimeError(
                f"S2FT adapter(s) {names} use a score-based selection that has not been computed: call "
                "s2ft_plugin.initialize_s2ft_selection(model, dataloader) before training."
            )
        return self.model(*args, **kwargs)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear") -> None:
        """Add ``adapter_name`` = sum of ``weights[i]`` x ``adapters[i]``, exactly (see :mod:`s2ft_plugin.combine`).

        Like LoRA's, the new adapter is not activated: call ``set_adapter(adapter_name)`` to use it.
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.s2ft_uncalibrated.discard(adapter_name)
        if self.s2ft_layout_owner == adapter_name:
            self.s2ft_layout_owner = None  # the layout stays: the other adapters keep computing what they did
        self.arrange()

    def _check_finite(self, adapter_names: Optional[list[str]]) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for path, layer in self.model.named_modules():
            for deltas in (getattr(layer, attr) for attr in getattr(layer, "adapter_layer_names", ())):
                for name in names:
                    if name in deltas and not torch.isfinite(deltas[name]).all():
                        raise ValueError(  # PEFT's message first: PEFT's tests and users' scripts match it
                            f"NaNs detected in the merged weights. The adapter {name} seems to be broken (S2FT: a "
                            f"non-finite delta at '{path}'; nothing was merged)."
                        )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_finite(adapter_names)
        self.s2ft_layout_owner = None
        self._restore_original_order()  # exported weights are a drop-in checkpoint
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        remove_compiled_sync_hook(model)
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        return adapter_entries(model, state_dict)  # also under FSDP1's nested wrappers

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the saved indices and deltas against the layers before anything is loaded."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_adapter_tensors(model, adapter_name, remapped)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, S2FTModel):
            tuner.s2ft_uncalibrated.discard(adapter_name)
        return remapped


class LayoutRefused(ValueError):
    """``permute=True`` cannot be honoured: co-permuting a block would change what it computes."""


def _report_refused(refused: dict[str, str], strict: bool) -> None:
    listed = "; ".join(f"'{key.rsplit(':', 1)[0]}': {why}" for key, why in list(refused.items())[:3])
    more = f"; and {len(refused) - 3} more block(s)" if len(refused) > 3 else ""
    if strict:
        raise LayoutRefused(
            f"S2FT cannot honour permute=True: {listed}{more}. Leave permute unset to co-permute only the blocks that "
            "allow it, or set permute=False."
        )
    warnings.warn(
        f"S2FT leaves {len(refused)} block(s) in their original layout: {listed}{more}. They still train; S2FT "
        "gathers their selected rows/columns instead of slicing them.",
        stacklevel=3,
    )


def _layout_of(model: nn.Module) -> Optional[Layout]:
    """The layout the model's S2FT layers address their units through, if it has any."""
    return next((module._s2ft_place[0] for module in model.modules() if hasattr(module, "_s2ft_place")), None)


def _check_adapter_name(adapter_name: str) -> None:
    """Adapter names become attribute names of parameter and buffer dicts: refuse one torch cannot register."""
    from peft.tuners._buffer_dict import BufferDict

    if adapter_name == "__base__":
        raise ValueError(
            "Invalid S2FT adapter name '__base__': it is reserved, as in `adapter_names` it means the base model."
        )
    try:
        nn.ParameterDict({adapter_name: nn.Parameter(torch.empty(0))})
        BufferDict({adapter_name: torch.empty(0)})
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"Invalid S2FT adapter name {adapter_name!r}: it must be a non-empty string without '.' that is not an "
            f"attribute of torch.nn.ParameterDict ({error})."
        ) from None


def _check_layers_exist(model: nn.Module, config: S2FTConfig, layer_paths: tuple) -> None:
    """PEFT skips indices of ``layers_to_transform`` that match no layer; S2FT refuses them (a typo, or an adapter
    for a deeper model)."""
    requested = config.layers_to_transform
    if requested is None:
        return
    keys = [key for key, _ in model.named_modules() if key and not key.startswith(layer_paths)]
    missing = []
    for index in [requested] if isinstance(requested, int) else requested:
        one_layer = replace(config, layers_to_transform=[index])
        if not any(check_target_module_exists(one_layer, key) for key in keys):
            missing.append(index)
    if missing:
        raise ValueError(
            f"S2FTConfig.layers_to_transform names layer(s) {missing} but no target module of the model sits in a "
            f"layer with that index (layers_pattern={config.layers_pattern!r})."
        )


def _load_through_tuner(tuner, state_dict, prefix, *_args) -> None:
    """A state dict taken through a tuner holds base weights in its recorded layout: bring them to the original
    order, which the base modules' own hooks then bring into this model's layout."""
    tuner.s2ft_layout.to_original(tuner.model, tuner.adapted_blocks(), state_dict, prefix)


_PEFT_PREFIX = "base_model.model."


def _check_adapter_tensors(model: nn.Module, adapter_name: str, state_dict: dict) -> None:
    expected = set()
    for path, module in model.named_modules():
        where = f"S2FT adapter '{adapter_name}' at '{path.removeprefix(_PEFT_PREFIX)}'"
        if isinstance(module, Experts) and adapter_name in module.s2ft_indices:
            expected.update(module.check_saved(adapter_name, state_dict, path, where))
            continue
        if not isinstance(module, S2FTLayer) or adapter_name not in module.s2ft_delta:
            continue
        keys = (f"{path}.s2ft_indices.{adapter_name}", f"{path}.s2ft_delta.{adapter_name}")
        expected.update(keys)
        indices, delta = (state_dict.get(key) for key in keys)
        check_present(where, indices, delta)  # the checks vLLM and the converter make (s2ft_format), in this order
        try:
            module.check_indices(adapter_name, indices, expected_count=module.s2ft_indices[adapter_name].numel())
        except ValueError as error:
            raise ValueError(f"{error} Module: '{path.removeprefix(_PEFT_PREFIX)}'.") from None
        check_delta(where, delta, module.s2ft_delta[adapter_name].shape)
    # PEFT names only the keys that match an adapted module; the others keep their saved names
    for key in state_dict:
        if key not in expected and ".s2ft_" in key:
            raise stray_error(f"S2FT adapter '{adapter_name}'", key.removeprefix(_PEFT_PREFIX))
