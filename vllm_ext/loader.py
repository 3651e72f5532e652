"""Builds vLLM ``LoRAModel`` objects from S²FT folders inside vLLM's worker LoRA manager.

Every way vLLM loads an adapter (offline ``LoRARequest``, ``--lora-modules``, ``/v1/load_lora_adapter``) ends in
``WorkerLoRAManager._load_adapter`` in the worker process, so that is the one place an S²FT folder is recognised.
The folder is checked as the front end checks it (``vllm_ext.validation``: PEFT's checks against the served model's
config, and the engine's buffers), and against the served layers. Each module becomes a LoRA pair whose one-hot factor
is replaced by its 1-D integer indices, which only the S²FT layers (``vllm_ext.layers``) accept; a module whose layer
has no S²FT buffers is refused, never converted.

A switch should cost the adapter's bytes and little else, since with more adapters than slots (or than vLLM's CPU
cache) it happens all the time:

- The checks of a folder are made once and remembered per worker, keyed by its files (inode, size, modification time
  of the config and the weights, taken before and after reading them) and the engine's ``VLLM_S2FT_MAX_K``: a folder
  evicted from vLLM's CPU cache is read again but not checked again while its files stay the same.
- Each module is cut to this rank's shard and laid out as the slots hold it (``S2FTLayerMixin.s2ft_module``) here,
  once per load, so bringing a cached adapter into a slot is one copy per module (``vllm_ext.layers``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.utils import parse_fine_tuned_lora_name

from .adapter import PREFIX, S2FTAdapter, folder_state, read_s2ft_adapter
from .capacity import SETTING, engine_setting
from .layers import S2FTLayerMixin
from .moe import experts_lora_weights
from .validation import check_servable


@dataclass(frozen=True)
class Placement:
    """Where a module of a checked adapter goes: vLLM's module name, its LoRA layer and the slice in it."""

    name: str
    layer: S2FTLayerMixin
    slice_index: int
    side: str


def load_s2ft_lora_model(worker_manager, path: str, lora_id: int) -> LoRAModel:
    """The S²FT adapter in ``path`` as a LoRAModel for ``worker_manager`` (a vLLM ``WorkerLoRAManager``)."""
    checked = worker_manager.__dict__.setdefault("_s2ft_checked", {})  # key -> (config, {module path: Placement})
    setting = engine_setting(_started_with(worker_manager))
    before = folder_state(path)
    key = (path, setting, before)
    config, placements = checked.get(key, (None, None))
    adapter = read_s2ft_adapter(path, config)
    unchanged = bool(before) and folder_state(path) == before
    if not unchanged:  # the files changed while being read: check what was read, and remember nothing
        placements = None
    if placements is None:
        placements = servable_projections(worker_manager, adapter, setting)
        if unchanged:
            checked[key] = adapter.config, placements

    loras = {}
    for module_path, module in adapter.modules.items():
        placement = placements[module_path]
        indices, delta = placement.layer.s2ft_module(placement.slice_index, module.indices, module.delta)
        lora_a, lora_b = (indices, delta) if placement.side == "input" else (delta, indices)
        loras[placement.name] = LoRALayerWeights(placement.name, module.k, module.k, lora_a, lora_b, scaling=1.0)
    for module_path, module in adapter.experts.items():
        name, weights = experts_lora_weights(worker_manager._adapter_manager, path, module_path, module)
        loras[name] = weights
    return LoRAModel(lora_id, adapter.max_k, loras)


def servable_projections(worker_manager, adapter: S2FTAdapter, setting: str) -> dict[str, Placement]:
    """Refuse an adapter this worker cannot serve (the front end's checks, then the served layers'); return where
    each of its modules goes."""
    manager = worker_manager._adapter_manager
    projections = check_servable(adapter, manager.model.config, worker_manager.lora_config.target_modules, setting)
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    owners = _layer_owners(manager)
    placements = {}
    for module_path in adapter.modules:
        where = f"S2FT adapter at {adapter.path!r}, module {module_path!r}"
        name, _ = parse_fine_tuned_lora_name(f"{PREFIX}{module_path}.lora_A.weight", mapper)
        if name not in owners:
            raise ValueError(
                f"{where}: the served model has no LoRA layer {name!r}; the adapter targets another architecture or "
                "the engine restricts LoRA targets (--lora-target-modules)."
            )
        layer, slice_index = owners[name]
        if not isinstance(layer, S2FTLayerMixin) or layer.s2ft_slices[slice_index or 0] is None:
            raise ValueError(
                f"{where}: vLLM serves this projection with {type(layer).__name__}, which has no S2FT buffers for it "
                f"(S2FT serves q/k/v/gate/up_proj slices of qkv_proj/gate_up_proj and o_proj/down_proj, with "
                f"{SETTING} naming the projection)."
            )
        projection, dims = projections[module_path], _dims(layer, slice_index)
        if dims != (projection.out_features, projection.in_features):
            raise ValueError(  # the model config's sizes, which the adapter was checked against, are not the layer's
                f"{where}: vLLM's layer {name!r} is {dims} (out, in) but the model config gives "
                f"{(projection.out_features, projection.in_features)}; S2FT serves models whose projections have "
                "Llama's sizes."
            )
        placements[module_path] = Placement(name, layer, slice_index or 0, projection.side)
    return placements


def _started_with(worker_manager) -> str | None:
    """What the plugin sized the engine's S2FT buffers from at start-up (None: nothing), as its layers recorded it."""
    return next((layer.s2ft_sized for layer in worker_manager._adapter_manager.modules.values()
                 if isinstance(layer, S2FTLayerMixin)), None)


def _layer_owners(manager) -> dict:
    """vLLM module name (unpacked, e.g. ``...q_proj``) -> (LoRA layer, slice index or None)."""
    owners = {name: (layer, None) for name, layer in manager.modules.items()}
    for packed_name, names in manager.packed_modules.items():
        for slice_index, name in enumerate(names):
            owners[name] = (manager.modules[packed_name], slice_index)
    return owners


def _dims(layer, slice_index) -> tuple[int, int]:
    """Unsharded (out_features, in_features) of one projection of a vLLM LoRA layer."""
    base = layer.base_layer
    if slice_index is None:
        return base.output_size, base.input_size
    if hasattr(base, "total_num_kv_heads"):  # QKVParallelLinear: output_sizes count replicated kv heads
        heads = base.total_num_heads if slice_index == 0 else base.total_num_kv_heads
        return heads * base.head_size, base.input_size
    return base.output_sizes[slice_index], base.input_size
