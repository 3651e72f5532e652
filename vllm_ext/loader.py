"""Builds vLLM ``LoRAModel`` objects from S²FT folders inside vLLM's worker LoRA manager.

Every way vLLM loads an adapter (offline ``LoRARequest``, ``--lora-modules``, ``/v1/load_lora_adapter``) ends in
``WorkerLoRAManager._load_adapter`` in the worker process, so that is the one place an S²FT folder is recognised.
Each module becomes a LoRA pair whose one-hot factor is replaced by its 1-D integer indices, which only the S²FT
layers (``vllm_ext.layers``) accept; a module whose layer has no S²FT buffers is refused, never converted.
"""

from __future__ import annotations

from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.utils import parse_fine_tuned_lora_name

from .adapter import PREFIX, check_dims, read_s2ft_adapter
from .capacity import SETTING, check_capacity, max_k_per_projection
from .layers import S2FTLayerMixin
from .moe import experts_lora_weights


def load_s2ft_lora_model(worker_manager, path: str, lora_id: int) -> LoRAModel:
    """The S²FT adapter in ``path`` as a LoRAModel for ``worker_manager`` (a vLLM ``WorkerLoRAManager``)."""
    manager = worker_manager._adapter_manager
    lora_config = worker_manager.lora_config
    adapter = read_s2ft_adapter(path)
    check_capacity(adapter, max_k_per_projection())
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
        out_features, in_features = _dims(layer, slice_index)
        if module.side == "input":
            axis_size, projection_dim = in_features, out_features
        else:
            axis_size, projection_dim = out_features, in_features
        check_dims(where, module, axis_size, projection_dim)
        delta = module.delta.to(lora_config.lora_dtype)
        lora_a, lora_b = (module.indices, delta) if module.side == "input" else (delta, module.indices)
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
