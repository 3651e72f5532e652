"""S²FT adapters on fused MoE experts in vLLM's CPU engine, in mixed batches with dense S²FT, LoRA and base requests.

vLLM 0.32 applies LoRA to fused experts only inside its Triton experts kernels (the CPU punica wrapper has no fused-MoE
ops) and, with LoRA enabled, picks the Triton experts for every unquantized MoE model, which cannot run on CPU: no
adapter of any kind could be served on an MoE model there. On CPU the plugin keeps the experts kernel vLLM picks
without LoRA (its prepacked CPU grouped GEMM) for every token, and adds for the tokens of each slot that holds an S²FT
expert adapter the change of their experts' output, computed on the k selected channels of each routed expert only
(the formula of ``s2ft_plugin.moe``, exactly what the merged experts compute)::

    out += w * ((g(x W'ᵀ) - g(x Wᵀ)) W_down[:, S]ᵀ + g(x W'ᵀ) D_downᵀ),   W = W_gu[S],  W' = W + D_gu

(``g``: the experts' gated activation, ``w``: the routing weight). The frozen rows ``W_gu[S]`` and columns
``W_down[:, S]`` are read from the kernel's prepacked weights when an adapter enters a slot, through the packed layout
(:class:`PackedLayout`, found once per weight shape by packing probe tensors and verified on random weights). Per
slot, the routed (token, expert) pairs are sorted by expert and multiplied with one grouped GEMM per factor.

LoRA adapters on the experts have no CPU kernel in vLLM 0.32: they are refused by name (in the front end before they
are queued, and by the worker's loader); LoRA on the other layers of an MoE model is served as on dense models.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vllm.lora.layers import FusedMoEWithLoRA
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.experts.lora_experts_mixin import LoRAExpertsMixin

from .adapter import WEIGHTS_NAME, is_s2ft_folder
from .experts import EXPERT_DELTAS, S2FTExperts, moe_dims

K_ALIGNMENT = 8  # channels per slot are padded to a multiple of this: torch._grouped_mm reads 16-byte rows
# the experts' gated activation g([gate | up]) = act(gate) * up, as vLLM's CPU kernel computes it
GATES = {
    MoEActivation.SILU: F.silu,
    MoEActivation.GELU: F.gelu,
    MoEActivation.GELU_TANH: functools.partial(F.gelu, approximate="tanh"),
}
DIGIT = 256  # probe values: every float dtype vLLM's CPU experts take (bf16/fp16/fp32) holds 0..255 exactly


@dataclass(frozen=True)
class PackedLayout:
    """Where a prepacked (E, N, K) expert weight keeps element (n, k) of expert e: ``e*N*K + rows[n] + columns[k]``."""

    rows: torch.Tensor  # (N,) int64
    columns: torch.Tensor  # (K,) int64

    def gather_rows(self, packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(E, m, K): the rows ``rows`` (E, m) of each expert."""
        base = torch.arange(packed.shape[0]).view(-1, 1, 1) * packed[0].numel()
        return packed.reshape(-1)[base + self.rows[rows].unsqueeze(2) + self.columns.view(1, 1, -1)]

    def gather_columns(self, packed: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """(E, N, m): the columns ``columns`` (E, m) of each expert."""
        base = torch.arange(packed.shape[0]).view(-1, 1, 1) * packed[0].numel()
        return packed.reshape(-1)[base + self.rows.view(1, -1, 1) + self.columns[columns].unsqueeze(1)]


@functools.lru_cache(maxsize=None)
def find_layout(shape: tuple[int, int], dtype: torch.dtype, isa: str | None) -> PackedLayout | None:
    """The layout vLLM's CPU prepacking for ``isa`` (None: none, zentorch's) gives each (N, K) expert of an (E, N, K)
    weight, if it is a permutation of each expert's elements separable into row and column offsets (as blocked and
    VNNI layouts are); None otherwise. Probes the packing itself with base-256 digits of each element's row and
    column, then checks the result on random weights."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    def pack(weight: torch.Tensor) -> torch.Tensor:
        return weight if isa is None else cpu_prepack_moe_weight(weight, isa)

    n, k = shape
    digits = max(1, math.ceil(math.log(max(n, k), DIGIT)))
    position = [torch.zeros(n * k, dtype=torch.long), torch.zeros(n * k, dtype=torch.long)]  # packed slot -> (n, k)
    grids = (torch.arange(n).view(n, 1).expand(n, k), torch.arange(k).view(1, k).expand(n, k))
    try:
        for digit in range(digits):
            scale = DIGIT ** digit
            for axis, grid in enumerate(grids):
                packed = pack((grid // scale % DIGIT).to(dtype).unsqueeze(0).contiguous())[0].reshape(-1).long()
                position[axis] += packed * scale
        if bool((position[0] >= n).any() or (position[1] >= k).any()):
            return None
        slot = torch.full((n * k,), -1, dtype=torch.long)
        slot[position[0] * k + position[1]] = torch.arange(n * k)
        slot = slot.view(n, k)
        layout = PackedLayout(rows=slot[:, 0].clone(), columns=(slot[0] - slot[0, 0]).clone())
        sample = torch.randn(2, n, k).to(dtype)
        packed = pack(sample.clone())
        if not torch.equal(layout.gather_rows(packed, torch.arange(n).expand(2, n)), sample):
            return None
    except RuntimeError:
        return None
    return layout


class S2FTExpertsMixin(LoRAExpertsMixin):
    """vLLM's CPU experts kernel, plus the S²FT slots of its layer (``s2ft_slots``: slot -> :class:`ExpertSlot`)."""

    s2ft_slots: dict | None = None

    @property
    def s2ft_isa(self) -> str | None:
        """The prepacking this kernel's weights got (None: zentorch keeps them as loaded)."""
        return None if self._use_zentorch else self.isa

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        super().apply(output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                      expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
                      apply_router_weight_on_input)
        punica_wrapper = self._lora_context.punica_wrapper if self._lora_context is not None else None
        groups = getattr(punica_wrapper, "s2ft_groups", None)
        used = [slot for slot in (self.s2ft_slots or ()) if groups is not None and slot in groups.active]
        if not used:
            return
        if hidden_states.shape[0] != punica_wrapper.token_lora_indices.shape[0]:
            raise RuntimeError(f"S2FT experts got {hidden_states.shape[0]} rows for a batch of "
                               f"{punica_wrapper.token_lora_indices.shape[0]} tokens.")
        ends = groups.offsets.tolist()
        for slot in used:
            tokens = groups.order[(ends[slot - 1] if slot else 0):ends[slot]]
            self.s2ft_slots[slot].add(output, hidden_states, tokens, topk_ids,
                                      None if apply_router_weight_on_input else topk_weights, GATES[activation])


@functools.lru_cache(maxsize=None)
def s2ft_experts_class(cls: type) -> type:
    """``cls`` (one of vLLM's CPU experts kernels) with the S²FT slots added after it."""
    return type(f"S2FT{cls.__name__}", (S2FTExpertsMixin, cls), {})


@dataclass(frozen=True)
class ExpertSlot:
    """One S²FT expert adapter in a slot, laid out for ``torch._grouped_mm`` (b operands (E, K, N)), k padded to
    ``kp`` channels with zero rows (which add exactly zero)."""

    gate_up: torch.Tensor  # (E, H, 2kp): the frozen gate and up rows of the channels, [gate | up]
    gate_up_delta: torch.Tensor | None  # (E, H, 2kp), zero for a part not adapted; None: neither is
    down: torch.Tensor | None  # (E, kp, H): the frozen down_proj columns (needed only with gate_up_delta)
    down_delta: torch.Tensor | None  # (E, kp, H)

    def add(self, output: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor | None, gate) -> None:
        """Add to ``output`` the change of the experts' output for the rows ``tokens`` of ``x`` (one slot's)."""
        top_k = topk_ids.shape[1]
        experts = topk_ids.index_select(0, tokens).reshape(-1).long()
        order = torch.argsort(experts, stable=True)
        counts = torch.bincount(experts, minlength=self.gate_up.shape[0])
        offsets = counts.cumsum(0).to(torch.int32)
        rows = tokens.repeat_interleave(top_k).index_select(0, order)
        xs = x.index_select(0, rows)
        z = torch._grouped_mm(xs, self.gate_up, offs=offsets)
        h = _gated(z, gate)
        change = None
        if self.gate_up_delta is not None:
            adapted = _gated(z + torch._grouped_mm(xs, self.gate_up_delta, offs=offsets), gate)
            change = torch._grouped_mm(adapted - h, self.down, offs=offsets)
            h = adapted
        if self.down_delta is not None:
            update = torch._grouped_mm(h, self.down_delta, offs=offsets)
            change = update if change is None else change.add_(update)
        if topk_weights is not None:
            change = change * topk_weights.index_select(0, tokens).reshape(-1, 1).index_select(0, order).to(x.dtype)
        output.index_add_(0, rows, change.to(output.dtype))


def _gated(z: torch.Tensor, gate) -> torch.Tensor:
    half = z.shape[1] // 2
    return gate(z[:, :half]) * z[:, half:]


class S2FTFusedMoEWithLoRA(FusedMoEWithLoRA):
    """vLLM's fused-MoE LoRA layer whose slots can also hold S²FT expert adapters (CPU).

    The loader hands ``set_lora`` an S²FT module as the LoRA factors ``[gate delta, S, up delta]`` (A) and
    ``[S, down delta, S]`` (B), each one-hot factor replaced by the (E, k) integer channels ``S`` (no LoRA factor is an
    integer tensor), None for the parts not adapted.
    """

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.s2ft_slots: dict[int, ExpertSlot] = {}

    def set_mapping(self, punica_wrapper) -> None:
        super().set_mapping(punica_wrapper)
        self._moe_kernel.fused_experts.s2ft_slots = self.s2ft_slots

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self.s2ft_slots.pop(index, None)

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        if not any(_is_channels(factor) for factor in [*lora_a, *lora_b]):
            super().set_lora(index, lora_a, lora_b)
            return
        self.reset_lora(index)
        gate, channels, up = lora_a
        down = lora_b[1]
        self.s2ft_slots[index] = self._expert_slot(channels, gate, up, down)

    def s2ft_unservable(self) -> str | None:
        """Why this layer cannot hold S²FT expert adapters, or None."""
        experts, config = self._moe_kernel.fused_experts, self.moe_config
        if not isinstance(experts, S2FTExpertsMixin):
            return f"vLLM runs these experts with {type(experts).__name__}, not its CPU kernel"
        if config.activation not in GATES:
            return f"the experts' activation {config.activation.value!r} is not one of {[a.value for a in GATES]}"
        if config.has_bias:
            return "the experts have biases"
        if self.tp_size > 1 or self.use_ep:
            return "the experts are split across ranks (tensor or expert parallelism)"
        w13 = self.base_layer.routed_experts.w13_weight
        if w13.shape[2] * w13.itemsize % 16:
            return "their hidden size is not a multiple of 16 bytes"
        if any(self.packed_layout(name) is None for name in ("w13_weight", "w2_weight")):
            return f"vLLM's prepacked expert weights ({type(experts).__name__}) have a layout S2FT cannot read"
        return None

    def packed_layout(self, name: str) -> PackedLayout | None:
        weight = getattr(self.base_layer.routed_experts, name)
        return find_layout(tuple(weight.shape[1:]), weight.dtype, self._moe_kernel.fused_experts.s2ft_isa)

    def _expert_slot(self, channels, gate, up, down) -> ExpertSlot:
        routed = self.base_layer.routed_experts
        w13, w2 = routed.w13_weight, routed.w2_weight
        dtype, (experts, k), padded = w13.dtype, channels.shape, w2.shape[2]
        kp = -(-k // K_ALIGNMENT) * K_ALIGNMENT

        def pad(rows: torch.Tensor) -> torch.Tensor:  # (E, k, H) -> (E, kp, H)
            return F.pad(rows.to(dtype), (0, 0, 0, kp - k))

        frozen = self.packed_layout("w13_weight").gather_rows(w13, torch.cat([channels, channels + padded], dim=1))
        gate_up = torch.cat([pad(frozen[:, :k]), pad(frozen[:, k:])], dim=1).transpose(1, 2).contiguous()
        gate_up_delta = frozen_down = None
        if gate is not None or up is not None:
            zeros = torch.zeros(experts, k, w13.shape[2], dtype=dtype)
            gate_up_delta = torch.cat([pad(zeros if gate is None else gate), pad(zeros if up is None else up)],
                                      dim=1).transpose(1, 2).contiguous()
            columns = self.packed_layout("w2_weight").gather_columns(w2, channels)  # (E, H, k)
            frozen_down = pad(columns.transpose(1, 2)).contiguous()
        down_delta = None if down is None else pad(down.transpose(1, 2)).contiguous()
        return ExpertSlot(gate_up, gate_up_delta, frozen_down, down_delta)


# vLLM's model manager tells MoE LoRA layers apart by class name (dummy LoRAs for warm-up are built per name)
S2FTFusedMoEWithLoRA.__name__ = FusedMoEWithLoRA.__name__


def _is_channels(factor) -> bool:
    return isinstance(factor, torch.Tensor) and not factor.is_floating_point()


def experts_lora_weights(manager, path: str, module_path: str, module: S2FTExperts) -> tuple[str, LoRALayerWeights]:
    """(vLLM module name, LoRA weights for :class:`S2FTFusedMoEWithLoRA`) of one S²FT experts module (checked against
    the model's config, ``vllm_ext.validation``), or a ValueError naming why the served layer cannot hold it;
    ``manager`` is vLLM's LoRA model manager."""
    where = f"S2FT adapter at {path!r}, module {module_path!r}"
    layer_prefix = module_path.rpartition(".mlp.")[0] + "."  # vLLM names the block differently (Mixtral)
    names = [name for name, layer in manager.modules.items()
             if isinstance(layer, FusedMoEWithLoRA) and name.startswith(layer_prefix)]
    if len(names) != 1:
        raise ValueError(f"{where}: the served model has no LoRA layer on these experts; the adapter targets another "
                         "architecture or the engine restricts LoRA targets (--lora-target-modules).")
    name, layer = names[0], manager.modules[names[0]]
    reason = (layer.s2ft_unservable() if isinstance(layer, S2FTFusedMoEWithLoRA)
              else "the plugin serves S2FT expert deltas on vLLM's CPU platform only")
    if reason is not None:
        raise ValueError(f"{where}: vLLM's MoE layer {name!r} cannot hold S2FT expert deltas: {reason}.")
    deltas = {part: module.delta(part) for part in EXPERT_DELTAS if module.delta(part) is not None}
    channels = module.channels.long()
    hidden = deltas["down_proj"].shape[1] if "down_proj" in deltas else next(iter(deltas.values())).shape[2]
    config = layer.moe_config
    dims = (config.num_local_experts, config.intermediate_size_per_partition_unpadded, config.hidden_dim)
    if (channels.shape[0], hidden) != (dims[0], dims[2]) or int(channels.max()) >= dims[1]:
        raise ValueError(f"{where}: vLLM's layer {name!r} has {dims[0]} experts of {dims[1]} channels and hidden size "
                         f"{dims[2]}, which the model config does not give; S2FT serves experts of the config's sizes.")
    lora_a = [deltas.get("gate_proj"), channels, deltas.get("up_proj")]
    lora_b = [channels, deltas.get("down_proj"), channels]
    return name, LoRALayerWeights(name, module.k, module.k, lora_a, lora_b, scaling=1.0)


def install() -> None:
    """On CPU: vLLM's CPU experts kernel with LoRA enabled, the S²FT MoE layer, and LoRA on experts refused."""
    import vllm.lora.utils as lora_utils
    import vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method as method

    original = method.select_unquantized_moe_backend

    @functools.wraps(original)
    def select_unquantized_moe_backend(moe_config):
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        if not moe_config.is_lora_enabled:
            return original(moe_config)
        backend, cls = original(replace(moe_config, is_lora_enabled=False))
        if cls is None or not issubclass(cls, CPUUnquantizedExperts):
            return original(moe_config)
        return backend, s2ft_experts_class(cls)

    method.select_unquantized_moe_backend = select_unquantized_moe_backend
    lora_utils._all_lora_classes = tuple(S2FTFusedMoEWithLoRA if cls is FusedMoEWithLoRA else cls
                                         for cls in lora_utils._all_lora_classes)
    _refuse_lora_on_experts()


def _refuse_lora_on_experts() -> None:
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import WorkerLoRAManager

    load = WorkerLoRAManager._load_adapter

    @functools.wraps(load)
    def _load_adapter(self, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        if is_s2ft_folder(path) or not any(isinstance(layer, FusedMoEWithLoRA)
                                           for layer in self._adapter_manager.modules.values()):
            return load(self, lora_request)
        adapted = _expert_tensor(path)  # before vLLM's loader, whose own MoE format checks suggest other settings
        if adapted is None:
            lora = load(self, lora_request)
            adapted = next((name for name in lora.loras if ".experts." in f".{name}."), None)  # .bin, .pt folders
        if adapted is not None:
            raise ValueError(lora_on_experts_message(lora_request.lora_path, adapted))
        return lora

    WorkerLoRAManager._load_adapter = _load_adapter


def experts_refusal(input_processor, path: str) -> str | None:
    """Why the CPU engine of ``input_processor`` (a vLLM ``InputProcessor``) would refuse the adapter folder ``path``
    for what it holds on fused MoE experts (LoRA on them; S2FT on them with the experts split across ranks); None
    otherwise. The front end asks before a worker sees the folder."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or moe_dims(input_processor.model_config.hf_config.get_text_config()) is None:
        return None
    adapted = _expert_tensor(path)
    if adapted is None:
        return None
    if not is_s2ft_folder(path):
        return lora_on_experts_message(path, adapted)
    parallel = input_processor.vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.enable_expert_parallel:  # the worker's loader would refuse it
        return (f"S2FT adapter at {path!r} adapts fused MoE experts, which the plugin serves with tensor parallel "
                "size 1 and no expert parallelism.")
    return None


def lora_on_experts_message(path: str, tensor: str) -> str:
    return (f"LoRA adapter at {path!r} adapts fused MoE experts ({tensor!r}); vLLM 0.32 applies LoRA to fused experts "
            "only in its Triton kernels, which do not run on CPU. Serve it on a GPU, or merge it into the model.")


def _expert_tensor(path: str) -> str | None:
    """The first tensor of an adapter folder's safetensors that lies inside fused experts (``.experts.`` in its
    name); the file's header is read again only when the file changes."""
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        return None  # vLLM's loader reports the folder's problems; the worker's check still applies
    return _first_expert_key(weights, os.stat(weights).st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _first_expert_key(weights: str, mtime_ns: int) -> str | None:
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as tensors:
        return next((key for key in tensors.keys() if ".experts." in key), None)
