"""S²FT on bitsandbytes 4-bit (nf4/fp4) and 8-bit base layers: QLoRA-style structured sparse fine-tuning.

The forward is inherited from :class:`~s2ft_plugin.layer.Linear`: the quantized base layer computes ``x W_q^T`` and the
delta is added by the partial-backprop functions, so only the selected activations are saved for the delta. Deltas stay
in a trainable float dtype (float32 unless cast on purpose); they are never quantized. Merging dequantizes the base
weight, adds (or subtracts) the deltas at their rows/columns and requantizes, which rounds, hence the warning.

Importing this module does not import bitsandbytes; dispatch only looks for bitsandbytes layers once it is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .layer import Linear


class _QuantizedLinear(Linear):
    """Merge and unmerge through dequantize -> add/subtract the deltas -> requantize."""

    quantization = "quantized"

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # PEFT would cast the delta to the base layer's compute dtype; keep its own (trainable) dtype, move it only.
        target = device if device is not None else self.get_base_layer().weight.device
        for name in ("s2ft_delta", "s2ft_indices", "s2ft_positions"):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)

    def dequantized_weight(self) -> torch.Tensor:
        """A new float tensor (out, in) holding the base weight as the base layer computes with it."""
        raise NotImplementedError

    def _set_weight(self, weight: torch.Tensor) -> None:
        """Requantize ``weight`` (float, out x in) into the base layer."""
        raise NotImplementedError

    def _apply_deltas(self, names: list[str], merged_deltas: list[tuple], sign: float, safe: bool) -> None:
        weight = self.dequantized_weight()
        dtype = weight.dtype
        merged = weight.float()
        for merged_delta in merged_deltas:
            self._add_delta(merged, merged_delta, sign)
        merged = merged.to(dtype)
        if safe and not torch.isfinite(merged).all():
            broken = names[0] if len(names) == 1 else names
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {broken} seems to be broken (the base layer was "
                "left unchanged)."
            )
        self._set_weight(merged)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.sync_positions()
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [name for name in adapter_names if name in self.s2ft_delta]
        if not names:
            return
        warnings.warn(
            f"Merging S2FT adapter(s) {names} into a {self.quantization} base layer dequantizes, adds the deltas and "
            "requantizes the weight: outputs may differ from the unmerged adapter due to rounding errors."
        )
        merged_deltas = [self._merged_delta(name) for name in names]
        self._apply_deltas(names, merged_deltas, 1.0, safe_merge)
        self._merged.update(zip(names, merged_deltas))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        names = [name for name in reversed(self.merged_adapters) if name in self._merged]
        self.merged_adapters.clear()
        if names:
            warnings.warn(
                f"Unmerging S2FT adapter(s) {names} from a {self.quantization} base layer requantizes the weight: it "
                "may differ from the weight before merging due to rounding errors."
            )
            self._apply_deltas(names, [self._merged.pop(name) for name in names], -1.0, safe=False)


class Linear4bit(_QuantizedLinear):
    """S²FT on a ``bitsandbytes.nn.Linear4bit`` (nf4 or fp4) projection."""

    @property
    def quantization(self) -> str:
        return f"4-bit ({self.get_base_layer().weight.quant_type})"

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = self.get_base_layer().weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            _restore_standard_4bit_layout(weight)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    def _set_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        state = old.quant_state
        base.weight = bnb.nn.Params4bit(
            weight.to("cpu"),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        ).to(old.device)  # quantizes


@contextlib.contextmanager
def standard_4bit_layouts(model: nn.Module):
    """While a state dict of ``model`` is taken: its 4-bit layers that bitsandbytes repacked for its CPU inference
    kernel hold the standard layout (the state dict's format), and afterwards their repacked form again, so they
    compute exactly as before. bitsandbytes 0.50's own ``_save_to_state_dict`` restores the standard layout with a
    faulty inverse instead (absmax left transposed) and keeps it: the layers then compute ~0.3 logits off."""
    bnb = sys.modules.get("bitsandbytes")
    repacked = []
    if bnb is not None:
        for module in model.modules():
            weight = getattr(module, "weight", None) if isinstance(module, bnb.nn.Linear4bit) else None
            if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
                repacked.append((weight, weight.data, copy.copy(weight.quant_state)))
                _restore_standard_4bit_layout(weight)
    try:
        yield
    finally:
        for weight, data, quant_state in repacked:
            weight.data, weight.quant_state = data, quant_state


def _restore_standard_4bit_layout(weight) -> None:
    """Undo bitsandbytes' CPU inference repacking (AVX512-BF16 kernel layout) of a ``Params4bit``, in place.

    bitsandbytes 0.50's inverse restores the packed codes and the nested statistics but leaves plain (non-nested)
    absmax transposed to (blocks per row, rows) in bf16; flatten it back to the standard per-block order.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).float()
    weight.data, weight.quant_state = data, state


class Linear8bitLt(_QuantizedLinear):
    """S²FT on a ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8()) projection."""

    quantization = "8-bit"

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        weight = base.weight
        if weight.dtype.is_floating_point:  # has_fp16_weights=True keeps a float weight
            return weight.data.clone()
        scales = base.state.SCB if base.state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))

    def _set_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)  # quantizes
        base.state.reset_grads()  # the next forward takes the new int8 weight and scales


def bnb_layer_class(target: nn.Module) -> Optional[type]:
    """The S²FT layer class for a bitsandbytes base layer, or None for any other module."""
    bnb = sys.modules.get("bitsandbytes")  # no bitsandbytes layer can exist before bitsandbytes is imported
    if bnb is None:
        return None
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, bnb.nn.Linear4bit):
        return Linear4bit
    if isinstance(base, bnb.nn.Linear8bitLt):
        return Linear8bitLt
    return None
