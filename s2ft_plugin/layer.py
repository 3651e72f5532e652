from __future__ import annotations

import math
import warnings
from contextvars import ContextVar
from functools import partial
from typing import NamedTuple, Optional

import torch
from torch import nn

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from s2ft_format.tensors import check_indices

from .architectures import linear_shape, linear_weight
from .functional import InputSideDelta, OutputSideDelta, input_side, output_side

_SYNC_HOOK = "_s2ft_compiled_sync_hook"
# True while a mixed-adapter batch (``adapter_names``) runs, which compiled code cannot honour (see _sync_layers)
MIXED_BATCH: ContextVar[bool] = ContextVar("s2ft_mixed_batch", default=False)


class S2FTLayer(BaseTunerLayer):
    """Adds dense deltas over a few rows (``side="output"``) or columns (``side="input"``) of a frozen projection.

    ``s2ft_indices`` holds the adapted rows/columns in the original coordinates and is saved with the adapter;
    ``s2ft_positions`` holds where they sit in the (possibly co-permuted) base weight and is rebuilt, never saved.
    """

    adapter_layer_names = ("s2ft_delta",)
    other_param_names = ("s2ft_indices", "s2ft_positions", "s2ft_start")

    def __init__(self, base_layer: nn.Module, side: str, unit_size: int, **kwargs) -> None:
        self.base_layer = base_layer
        self.side = side
        self.unit_size = unit_size
        self.s2ft_delta = nn.ParameterDict({})
        self.s2ft_indices = BufferDict({}, persistent=True)
        self.s2ft_positions = BufferDict({}, persistent=False)
        self.s2ft_start: dict[str, Optional[int]] = {}
        self._indices_seen: dict[str, tuple] = {}  # adapter -> _stamp of the indices its positions were derived from
        self._disable_adapters = False
        self.merged_adapters = []
        self._merged: dict[str, MergedDelta] = {}  # adapter -> what merging it added, for an exact unmerge
        self.out_features, self.in_features = linear_shape(self.get_base_layer())
        self.kwargs = kwargs

    @property
    def axis_size(self) -> int:
        """Rows (output side) or columns (input side) the indices range over."""
        return self.out_features if self.side == "output" else self.in_features

    def delta_shape(self, count: int) -> tuple[int, int]:
        return (count, self.in_features) if self.side == "output" else (self.out_features, count)

    def update_layer(self, adapter_name: str, indices: torch.Tensor, init_weights: bool, inference_mode=False):
        self.check_indices(adapter_name, indices)
        shape = self.delta_shape(indices.numel())
        if init_weights:
            delta = torch.zeros(shape)
        else:
            delta = torch.randn(shape) / math.sqrt(shape[1])
        self.s2ft_delta[adapter_name] = nn.Parameter(delta)
        self.s2ft_indices[adapter_name] = indices.long()
        self.set_positions(adapter_name, indices.long())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def check_indices(self, adapter_name: str, indices: torch.Tensor, expected_count: Optional[int] = None) -> None:
        """Raise a ValueError naming the problem if ``indices`` cannot address this layer's rows or columns."""
        where = (
            f"S2FT adapter '{adapter_name}' ({self.side}-side indices of a {self.out_features}x{self.in_features} layer)"
        )
        check_indices(where, indices, self.axis_size, self.unit_size, expected_count)

    def set_positions(self, adapter_name: str, positions: torch.Tensor) -> None:
        """Where the adapter's rows/columns sit in the base weight now (after co-permutation)."""
        positions = positions.to(self.s2ft_indices[adapter_name].device)
        self.s2ft_positions[adapter_name] = positions
        self.s2ft_start[adapter_name] = _contiguous_start(positions)
        self._indices_seen[adapter_name] = _stamp(self.s2ft_indices[adapter_name])

    def selected_count(self, adapter_name: str) -> int:
        """k: the rows/columns the adapter's delta covers."""
        delta = self.s2ft_delta[adapter_name]
        return delta.shape[0] if self.side == "output" else delta.shape[1]

    def sync_positions(self) -> None:
        """Check and apply index buffers that changed since their positions were derived.

        Loaders write the buffers directly (transformers' own ``load_adapter`` without ``load_state_dict`` hooks), so
        new indices are validated and mapped through the current layout here, before they are used. Only positions
        change, never the layout, so this is safe in the middle of a forward pass.
        """
        for name, indices in self.s2ft_indices.items():
            if self._indices_seen.get(name) != _stamp(indices):
                layout, block, projection = self._s2ft_place
                try:
                    self.check_indices(name, indices, expected_count=self.selected_count(name))
                except ValueError as error:
                    raise ValueError(f"{error} Module: '{block.projections[projection]}'.") from None
                with torch.inference_mode(False):  # later training steps save the positions for backward
                    self.set_positions(name, layout.positions(block, projection, indices))


def _stamp(tensor: torch.Tensor) -> tuple:
    return id(tensor), tensor._version


class MergedDelta(NamedTuple):
    """A delta as it was merged: its values, its indices (original coordinates) and the block's unit order then, with
    the positions and start that order gave them."""

    delta: torch.Tensor
    indices: torch.Tensor
    order: torch.Tensor
    positions: torch.Tensor
    start: Optional[int]


def _contiguous_start(positions: torch.Tensor) -> Optional[int]:
    """The first position when ``positions`` are consecutive (a co-permuted selection), else None."""
    start = int(positions[0])
    contiguous = torch.equal(positions, torch.arange(start, start + positions.numel(), device=positions.device))
    return start if contiguous else None


def add_compiled_sync_hook(model: nn.Module) -> None:
    """Under torch.compile the layers cannot read ``tensor._version`` inside the graph, so they skip
    :meth:`S2FTLayer.sync_positions` while traced; this pre-hook on the adapted model runs it for every layer once per
    call, outside the graph (a graph break, so ``fullgraph=True`` is refused), and indices written by other loaders
    are still checked. Called after each injection, so that it knows every layer."""
    remove_compiled_sync_hook(model)
    layers = tuple(module for module in model.modules() if isinstance(module, S2FTLayer))
    model.__dict__[_SYNC_HOOK] = model.register_forward_pre_hook(partial(_sync_when_compiled, layers=layers))


def remove_compiled_sync_hook(model: nn.Module) -> None:
    handle = model.__dict__.pop(_SYNC_HOOK, None)
    if handle is not None:
        handle.remove()


def _sync_when_compiled(_model: nn.Module, _args, layers: tuple) -> None:
    if torch.compiler.is_compiling():
        _sync_layers(layers)


@torch.compiler.disable
def _sync_layers(layers: tuple) -> None:
    if MIXED_BATCH.get():
        raise ValueError(
            "A torch.compile'd S2FT model cannot honour `adapter_names`: the compiled code does not see which adapter "
            "each row names (forward hooks added after compilation are not guarded), so every row would get the "
            "active adapter. Run mixed-adapter batches on the uncompiled model (`compiled._orig_mod`)."
        )
    for layer in layers:
        layer.sync_positions()


class Linear(nn.Module, S2FTLayer):
    """S²FT on a ``torch.nn.Linear`` projection."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        side: str,
        unit_size: int,
        indices: torch.Tensor,
        init_weights: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        S2FTLayer.__init__(self, base_layer, side=side, unit_size=unit_size, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, init_weights)

    def _merged_delta(self, adapter_name: str) -> MergedDelta:
        """What merging the adapter adds, copied and kept until it is unmerged, so that unmerging subtracts exactly
        that even if the adapter's weights or indices are written meanwhile (a loader)."""
        layout, block, _ = self._s2ft_place
        return MergedDelta(self.s2ft_delta[adapter_name].detach().clone(), self.s2ft_indices[adapter_name].clone(),
                           layout.order(block).clone(), self.s2ft_positions[adapter_name], self.s2ft_start[adapter_name])

    def _add_delta(self, weight: torch.Tensor, merged: MergedDelta, sign: float) -> None:
        """Adds a merged delta into the rows/columns it covers (a switch by merging touches only those)."""
        layout, block, projection = self._s2ft_place
        positions, start = merged.positions, merged.start
        if not torch.equal(layout.order(block), merged.order):  # laid out anew (a load): its lines moved with them
            positions = layout.positions(block, projection, merged.indices)
            start = _contiguous_start(positions)
        delta, dim = merged.delta.to(weight.device, weight.dtype), (0 if self.side == "output" else 1)
        if start is not None:  # co-permuted: one contiguous block, several times faster than index_add_
            weight.narrow(dim, start, delta.shape[dim]).add_(delta, alpha=sign)
        else:
            weight.index_add_(dim, positions.to(weight.device), delta, alpha=sign)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.sync_positions()
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = linear_weight(self.get_base_layer())
        for name in adapter_names:
            if name not in self.s2ft_delta:
                continue
            merged_delta = self._merged_delta(name)
            if safe_merge:
                merged = weight.data.clone()
                self._add_delta(merged, merged_delta, 1.0)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                weight.data.copy_(merged)
            else:
                self._add_delta(weight.data, merged_delta, 1.0)
            self._merged[name] = merged_delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = linear_weight(self.get_base_layer())
        while self.merged_adapters:
            merged_delta = self._merged.pop(self.merged_adapters.pop(), None)
            if merged_delta is not None:
                self._add_delta(weight.data, merged_delta, -1.0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if not torch.compiler.is_compiling():  # traced: see add_compiled_sync_hook
            self.sync_positions()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.s2ft_delta]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        fused = None if args or kwargs else self._fusable_weights()
        if fused is not None:  # the first delta also applies the frozen weight
            (weight, bias), result = fused, None
        else:
            weight, bias, result = None, None, self.base_layer(x, *args, **kwargs)
        for name in active:
            result = self._apply_delta(name, x, result, weight, bias)
            weight = bias = None
        return result

    def _apply_delta(self, name: str, x: torch.Tensor, result, weight=None, bias=None) -> torch.Tensor:
        delta = self.s2ft_delta[name]
        if torch.is_grad_enabled() and (delta.requires_grad or x.requires_grad or (
                result is not None and result.requires_grad)):
            apply = OutputSideDelta.apply if self.side == "output" else InputSideDelta.apply
        else:  # inference: no autograd node, no saved tensors
            apply = output_side if self.side == "output" else input_side
        # compiled code reads positions only, so that a hotswap (same k, new rows) never recompiles
        start = None if torch.compiler.is_compiling() else self.s2ft_start[name]
        return apply(x, delta, self.s2ft_positions[name], start, weight, bias, result)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list, *args, **kwargs) -> torch.Tensor:
        """Row ``i`` gets adapter ``adapter_names[i]`` (``"__base__"``: none), PEFT's mixed-adapter batches."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0]} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or name not in self.s2ft_delta:
                continue
            rows = [row for row, row_name in enumerate(adapter_names) if row_name == name]
            if len(rows) == len(adapter_names):
                result = self._apply_delta(name, x, result)
                continue
            rows = torch.tensor(rows, device=x.device)
            updated = self._apply_delta(name, x.index_select(0, rows), result.index_select(0, rows))
            result = result.index_copy(0, rows, updated)
        return result

    def _fusable_weights(self) -> Optional[tuple]:
        """``(weight, bias)`` when the base is a plain frozen nn.Linear with no hooks, which computes exactly F.linear
        and so can run inside the delta; None otherwise (a nested tuner layer is not an nn.Linear)."""
        base = self.base_layer
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        weight, bias = base.weight, base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        return weight, bias

    def __repr__(self) -> str:
        return "s2ft." + super().__repr__()
