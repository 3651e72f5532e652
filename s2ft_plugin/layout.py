"""Co-permutation of coupled weights ("compute densely"), kept inside the tuner.

A block's layout is a permutation of its units applied in place to every tensor that indexes them: q/k/v rows and
biases, o_proj columns, gate/up rows, down_proj columns, and per-head state beside them (``Block.coupled``). The model
computes the same function in any layout (every move to a new layout is verified, ``verification.py``), and the
layout never leaves the tuner:

- a state dict taken from the base model (``get_base_model().state_dict()``, ``peft.get_base_model_state_dict``,
  ``save_pretrained`` of the base) holds the original order, and one loaded into it is taken in the original order;
- a state dict taken through the tuner (``PeftModel.state_dict()``: what PEFT, Trainer and accelerate save) holds the
  current layout without copying the weights, plus one ``coperm_layout.<block>`` entry per permuted block, so a load
  through the tuner converts it to whatever layout the loading model has.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Optional

import torch
from torch import nn

from .architectures import base_layer, weight_dim
from .distributed import index_select
from .structure import Block
from .verification import BlockProbe, tolerance

LAYOUT_KEY = "_extra_state"  # torch.nn.Module's key for get_extra_state()
# set while a state dict is taken through the tuner: the base weights then stay in the current layout
_THROUGH_TUNER: ContextVar[bool] = ContextVar("s2ft_state_dict_through_tuner", default=False)


def layout_blocker(model: nn.Module, block: Block) -> Optional[str]:
    """Why ``block`` cannot be co-permuted on ``model``, or None if it can."""
    if block.layout_blocker is not None:
        return block.layout_blocker
    for path in block.projections.values():
        weight = base_layer(model.get_submodule(path)).weight
        if not weight.dtype.is_floating_point or type(weight) is not nn.Parameter:
            return f"'{path}' holds a quantized weight ({type(weight).__name__}, {weight.dtype})"
    return None


def _moved_tensors(model: nn.Module, block: Block):
    """(owning module, attribute, dim, index permutation for a unit permutation) of every tensor the layout moves."""
    for role, path in block.projections.items():
        base = base_layer(model.get_submodule(path))
        dim = 0 if block.side(role) == "output" else 1

        def permutation(unit_perm, role=role):
            return block.index_permutation(role, unit_perm)

        yield base, "weight", weight_dim(base, dim), permutation
        if dim == 0 and base.bias is not None:
            yield base, "bias", 0, permutation
    for tensor in block.coupled:
        owner, _, attr = tensor.path.rpartition(".")

        def permutation(unit_perm, tensor=tensor):
            return block.permutation(tensor.axis, unit_perm, tensor.per_unit)

        yield (model.get_submodule(owner) if owner else model), attr, 0, permutation


class Layout:
    """The permutation of each block's units that is applied to the base weights now (absent: original order)."""

    def __init__(self) -> None:
        self.orders: dict[str, torch.Tensor] = {}
        self.blocks: dict[str, Block] = {}
        self.refused: dict[str, str] = {}  # block key -> why a move of it failed verification; it stays in place

    def order(self, block: Block) -> torch.Tensor:
        return self.orders.get(block.key, torch.arange(block.num_units))

    @torch.no_grad()
    def move(self, model: nn.Module, block: Block, target: Optional[torch.Tensor]) -> None:
        """Permute the block's tensors in place from the current layout to ``target`` (None: the original order)."""
        identity = torch.arange(block.num_units)
        current = self.order(block)
        target = identity if target is None else target
        if torch.equal(current, target):
            return
        relative = torch.argsort(current)[target]
        permuted = not torch.equal(target, identity)
        moved = list(_moved_tensors(model, block))
        for module, attr, dim, permutation in moved:
            tensor = getattr(module, attr)
            tensor.data.copy_(index_select(tensor.data, dim, permutation(relative).to(tensor.device)))
            _track(module, attr, (self, block, dim, permutation) if permuted else None)
        if permuted:
            self.orders[block.key], self.blocks[block.key] = target, block
        else:
            self.orders.pop(block.key, None)
            self.blocks.pop(block.key, None)

    def move_verified(self, model: nn.Module, moves: list[tuple[Block, torch.Tensor]]) -> dict[str, str]:
        """Move each block to its target order and keep only the moves that preserve what the block computes
        (``verification.py``); a block that fails is moved back and refused from then on. Returns block key -> why,
        for the blocks refused by this call."""
        moves = [(block, target) for block, target in moves
                 if block.key not in self.refused and not torch.equal(self.order(block), target)]
        if not moves:
            return {}
        probe = BlockProbe(model, [block.name for block, _ in moves])
        refused = {}
        for block, target in moves:
            if probe.error is not None:
                refused[block.key] = f"S2FT cannot verify that co-permuting it keeps its function: {probe.error}"
                continue
            previous = self.order(block)
            self.move(model, block, target)
            change = probe.change(block.name)
            limit = tolerance(base_layer(model.get_submodule(next(iter(block.projections.values())))).weight.dtype)
            if not change <= limit:
                self.move(model, block, previous)
                refused[block.key] = (
                    f"co-permuting its {'heads' if block.kind == 'heads' else 'channels'} changed its output by "
                    f"{change:.1e} (relative; reordering float sums stays below {limit:.0e}), so it couples them in a "
                    "way S2FT does not see"
                )
        self.refused.update(refused)
        return refused

    def positions(self, block: Block, role: str, indices: torch.Tensor) -> torch.Tensor:
        """Where the original rows/columns ``indices`` of ``role``'s projection sit in the current layout."""
        if block.key not in self.orders:
            return indices
        inverse = torch.argsort(block.index_permutation(role, self.orders[block.key]))
        return inverse.to(indices.device)[indices]

    def extra_state(self, blocks: dict) -> torch.Tensor:
        """The layout as the tuner's ``_extra_state``: the unit order of every adapted block (``blocks``, block key ->
        Block), concatenated in key order. ``_extra_state`` is the one non-attribute key that FSDP2 and
        torch.distributed.checkpoint resolve in a sharded model's state dict, and a tensor keeps every value of the
        state dict a tensor."""
        orders = [self.order(blocks[key]) for key in sorted(blocks)]
        return torch.cat(orders) if orders else torch.empty(0, dtype=torch.long)

    def to_original(self, model: nn.Module, blocks: dict, state_dict: dict, prefix: str) -> None:
        """Bring base weights that a tuner's state dict holds in the layout it recorded back to the original order.

        ``prefix`` is the tuner's key prefix in ``state_dict``; ``blocks`` maps block keys to the model's blocks.
        """
        saved = state_dict.get(prefix + LAYOUT_KEY)
        if saved is None:
            return
        keys = sorted(blocks)
        sizes = [blocks[key].num_units for key in keys]
        if saved.numel() != sum(sizes):
            raise ValueError(
                f"S2FT state dict entry {prefix + LAYOUT_KEY!r} records the layout of {saved.numel()} units, but this "
                f"model adapts {sum(sizes)}: the state dict was taken from an S2FT model with other target modules."
            )
        names = {id(module): name for name, module in model.named_modules()}
        for key, order in zip(keys, torch.split(saved.long().cpu(), sizes)):
            block = blocks[key]
            if torch.equal(order, torch.arange(block.num_units)):
                continue
            for module, attr, dim, permutation in _moved_tensors(model, block):
                name = names[id(module)]
                tensor_key = f"{prefix}model.{name}.{attr}" if name else f"{prefix}model.{attr}"
                if tensor_key in state_dict:
                    value = state_dict[tensor_key]
                    state_dict[tensor_key] = index_select(value, dim, torch.argsort(permutation(order)).to(value.device))


class through_tuner:
    """While active, base-model state dict hooks leave the weights in the current layout."""

    def __enter__(self):
        self._token = _THROUGH_TUNER.set(True)

    def __exit__(self, *exc):
        _THROUGH_TUNER.reset(self._token)


def _track(module: nn.Module, attr: str, entry: Optional[tuple]) -> None:
    """Record how ``module.attr`` is permuted (None: it is in the original order) and keep the module's state dict
    hooks, which show it in the original order, registered exactly while something of it is permuted."""
    moved = module.__dict__.setdefault("_s2ft_moved", {})
    if entry is None:
        moved.pop(attr, None)
    else:
        moved[attr] = entry
    if moved and "_s2ft_layout_hooks" not in module.__dict__:
        module.__dict__["_s2ft_layout_hooks"] = (
            module.register_state_dict_post_hook(_state_dict_in_original_order),
            module.register_load_state_dict_pre_hook(_load_from_original_order),
        )
    elif not moved:
        for handle in module.__dict__.pop("_s2ft_layout_hooks", ()):
            handle.remove()
        del module.__dict__["_s2ft_moved"]


def _moved_entries(module: nn.Module, state_dict: dict, prefix: str):
    """(key, dim, current index permutation) of the module's permuted tensors present in ``state_dict``."""
    for attr, (layout, block, dim, permutation) in module.__dict__.get("_s2ft_moved", {}).items():
        if prefix + attr in state_dict:
            yield prefix + attr, dim, permutation(layout.order(block)).to(state_dict[prefix + attr].device)


def _state_dict_in_original_order(module, state_dict, prefix, _local_metadata) -> None:
    if _THROUGH_TUNER.get():
        return
    for key, dim, index in _moved_entries(module, state_dict, prefix):
        state_dict[key] = index_select(state_dict[key].detach(), dim, torch.argsort(index))


def _load_from_original_order(module, state_dict, prefix, *_args) -> None:
    for key, dim, index in _moved_entries(module, state_dict, prefix):
        state_dict[key] = index_select(state_dict[key], dim, index)
