"""Builds vLLM ``LoRAModel`` objects from S²FT folders inside vLLM's worker LoRA manager.

Every way vLLM loads an adapter (offline ``LoRARequest``, ``--lora-modules``, ``/v1/load_lora_adapter``) ends in
``WorkerLoRAManager._load_adapter`` in the worker process, so that is the one place an S²FT folder is recognised.
The folder is checked as the front end checks it (``vllm_ext.validation``: PEFT's checks against the served model's
config, and the engine's buffers). Each module becomes a LoRA pair whose one-hot factor is replaced by its 1-D integer
indices, which only the S²FT layers (``vllm_ext.layers``) accept; a module whose layer has no S²FT buffers is refused,
never converted.
"""

from __future__ import annotations

from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.utils import parse_fine_tuned_lora_name

from .adapter import PREFIX, read_s2ft_adapter
from .capacity import SETTING
from .layers import S2FTLayerMixin
from .moe import experts_lora_weights
from .validation import check_servable


def load_s2ft_lora_model(worker_manager, path: str, lora_id: int) -> LoRAModel:
    """The S²FT adapter in ``path`` as a LoRAModel for ``worker_manager`` (a vLLM ``WorkerLoRAManager``)."""
    manager = worker_manager._adapter_manager
    lora_config = worker_manager.lora_config
    adapter = read_s2ft_adapter(path)
    projections = check_servable(adapter, manager.model.config, lora_config.target_modules)
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    owners = _layer_owners(manager)

    loras = {}
    for module_path, module in adapter.modules.items():
        where = f"S2FT adapter at {path!r}, module {module_path!r}"
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
        delta, indices = module.delta.to(lora_config.lora_dtype), module.indices.long()
        lora_a, lora_b = (indices, delta) if projection.side == "input" else (delta, indices)
        loras[name] = LoRALayerWeights(name, module.k, module.k, lora_a, lora_b, scaling=1.0)
    for module_path, module in adapter.experts.items():
        name, weights = experts_lora_weights(manager, path, module_path, module)
        loras[name] = weights
    return LoRAModel(lora_id, adapter.max_k, loras)


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
