"""Co-permutation is verified, not assumed.

The shape rules of ``structure.py`` find the tensors that index a block's units, but a coupling can live in code,
where no tensor shows it (DiffLlama pairs head h with head h + H/2 in its forward). So every move of a block to a new
layout is checked where it happens: one forward of the base model on a short probe input records each block's inputs
and output, and after its move each block is run again on the same inputs. A block whose output changed by more than
float reordering explains is moved back to where it was.

The probe runs the base model alone (S2FT layers that are not merged are bypassed; merged deltas are part of the
weights and move with them), in eval mode, without gradients, in the model's own dtype.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

PROBE_TOKENS = 8
PROBE_SEED = 0


def tolerance(dtype: torch.dtype) -> float:
    """Relative change (Frobenius norm) a function-preserving move can cause: reordering float sums changes a result
    by a few units of the last place (~1e-6 in float32, ~1e-2 in bfloat16), a broken coupling by ~1e-1 or more."""
    return max(4 * torch.finfo(dtype).eps, 1e-4)


class BlockProbe:
    """Each block module's inputs and output on a probe input, recorded in one forward of the model."""

    def __init__(self, model: nn.Module, block_names: list[str]) -> None:
        self.model = model
        self.records: dict[str, tuple] = {}
        self.error: Optional[str] = None
        unverifiable = _why_unverifiable(model)
        if unverifiable:
            self.error = unverifiable
            return
        handles = [model.get_submodule(name).register_forward_hook(self._recorder(name), with_kwargs=True)
                   for name in dict.fromkeys(block_names)]
        try:
            with _base_model_only(model):
                model(input_ids=_probe_input(model), use_cache=False)
        except Exception as error:  # noqa: BLE001 - any failure only means the layout cannot be verified
            self.error = f"a probe forward of the model failed ({type(error).__name__}: {error})"
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in block_names if name not in self.records]
        if self.error is None and missing:
            self.error = f"the probe forward of the model never ran '{missing[0]}'"

    def _recorder(self, name: str) -> Callable:
        def record(_module, args, kwargs, output):
            if name not in self.records:  # the first call, should a model run a block twice
                self.records[name] = (_cloned(args), _cloned(kwargs), _main_output(output).detach().clone())

        return record

    def change(self, block_name: str) -> float:
        """Relative change of the block's output, run again now on its recorded inputs."""
        args, kwargs, before = self.records[block_name]
        with _base_model_only(self.model):
            after = _main_output(self.model.get_submodule(block_name)(*args, **kwargs)).detach()
        before, after = before.double(), after.double()
        if not torch.isfinite(before).all():
            return float("inf")
        return float((after - before).norm() / before.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _why_unverifiable(model: nn.Module) -> Optional[str]:
    from .distributed import is_partitioned

    if any(is_partitioned(parameter) for parameter in model.parameters()):
        return "DeepSpeed ZeRO-3 has partitioned the weights, so the model cannot run a probe forward"
    if model.get_input_embeddings() is None:
        return "the model has no input embeddings to run a probe forward through"
    return None


def _probe_input(model: nn.Module) -> torch.Tensor:
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(0, embeddings.num_embeddings, (1, PROBE_TOKENS), generator=generator)
    return ids.to(embeddings.weight.device)


def _main_output(output) -> torch.Tensor:
    """The block's output proper (attention modules also return per-head weights, which a head move reorders)."""
    while not isinstance(output, torch.Tensor):
        output = output[0]
    return output


def _cloned(tree):
    return tree_map(lambda value: value.detach().clone() if isinstance(value, torch.Tensor) else value, tree)


@contextlib.contextmanager
def _base_model_only(model: nn.Module):
    """Eval mode, no gradients, S2FT layers that are not merged bypassed; every flag restored afterwards."""
    from .layer import S2FTLayer

    modes = [(module, module.training) for module in model.modules()]
    bypassed = [layer for layer in model.modules()
                if isinstance(layer, S2FTLayer) and not layer.merged and not layer._disable_adapters]
    model.eval()
    for layer in bypassed:
        layer._disable_adapters = True
    try:
        with torch.no_grad():
            yield
    finally:
        for layer in bypassed:
            layer._disable_adapters = False
        for module, training in modes:
            module.training = training
