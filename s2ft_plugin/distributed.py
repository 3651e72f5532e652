"""S²FT across processes: the same selection on every rank, whole weights where ZeRO-3 has partitioned them, FSDP2
shards permuted whole, and the adapter's entries found in a sharded model's state dict.

FSDP shards only when ``accelerator.prepare`` runs, after ``get_peft_model`` has co-permuted the full weights on every
rank, so co-permutation needs nothing there. DeepSpeed ZeRO-3 partitions the weights while the model loads: scoring
them by magnitude needs the whole weights, which :func:`whole_weights` gathers for the duration, and co-permutation
is not done there (a partitioned model cannot run the probe that verifies it, ``verification.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from torch.distributed.tensor import DTensor, distribute_tensor

# module-path segments that FSDP1 and activation-checkpoint wrappers insert and their state dicts leave out
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_partitioned(tensor: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose data this rank holds only a partition of (``ds_id`` marks them)."""
    return hasattr(tensor, "ds_id")


@contextlib.contextmanager
def whole_weights(tensors: Iterable[torch.Tensor]):
    """Gather ZeRO-3 partitioned ``tensors`` for the duration (read only)."""
    partitioned = [tensor for tensor in tensors if is_partitioned(tensor)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def adapter_entries(model, state_dict: dict) -> dict:
    """The tuner's entries of ``state_dict``, found by module path as PEFT does, with every wrapper segment removed:
    PEFT removes only a leading one, so under FSDP1 with per-block wrapping it finds nothing and saves an empty
    adapter (and checkpoints without the deltas)."""
    prefixes = set()
    for prefix in _get_tuner_state_dict_key_prefixes(model):
        for segment in WRAPPER_SEGMENTS:
            prefix = prefix.replace(segment, "")
        prefixes.add(prefix)
    return _filter_state_dict_by_key_prefixes(state_dict, prefixes)


def index_select(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor.index_select``, also for an FSDP2 shard (DTensor): permuting along a sharded dim moves rows between
    ranks, so the whole tensor is gathered, permuted and sharded again as before (a state dict loaded into a sharded
    model, as when a run resumes, passes through here)."""
    if isinstance(tensor, DTensor):
        whole = tensor.full_tensor().index_select(dim, index.to(tensor.device))
        return distribute_tensor(whole, tensor.device_mesh, tensor.placements)
    return tensor.index_select(dim, index.to(tensor.device))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree_on_scores(scores: dict[str, torch.Tensor], combine: str) -> dict[str, torch.Tensor]:
    """Make every rank hold the same score tensors, bit for bit: ``combine="sum"`` sums them over the ranks (scores
    from each rank's calibration batches), ``"rank0"`` takes rank 0's (weight magnitudes: rank 0 holds the loaded
    weights even where the others start from placeholders, as with FSDP's ``cpu_ram_efficient_loading``).

    The final broadcast from rank 0 also removes any rank-to-rank rounding difference of the reduction.
    """
    if world_size() == 1 or not scores:
        return scores
    keys = sorted(scores)
    flat = torch.cat([scores[key].double().flatten() for key in keys]).to(_collective_device())
    if combine == "sum":
        dist.all_reduce(flat)
    elif combine != "rank0":
        raise ValueError(f"combine must be 'sum' or 'rank0', got {combine!r}.")
    dist.broadcast(flat, src=0)
    flat = flat.cpu()
    result, offset = {}, 0
    for key in keys:
        size = scores[key].numel()
        result[key] = flat[offset : offset + size].view_as(scores[key]).to(scores[key].dtype)
        offset += size
    return result


def placeholder_weights_on_other_ranks() -> bool:
    """True where only rank 0 loads the weights and the others hold placeholders until FSDP broadcasts rank 0's
    (accelerate's ``fsdp_cpu_ram_efficient_loading``)."""
    flag = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true", "yes")
    return world_size() > 1 and flag and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def _collective_device() -> torch.device:
    """gloo (and mixed backends such as "cuda:nccl,cpu:gloo") reduce CPU tensors; NCCL and its kin the rank's device."""
    if "gloo" in str(dist.get_backend()) or not torch.accelerator.is_available():
        return torch.device("cpu")
    return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
