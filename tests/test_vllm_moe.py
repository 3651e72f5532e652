"""vLLM on CPU serving S2FT adapters on fused MoE experts (Mixtral, Qwen3-MoE) in mixed batches with dense S2FT, LoRA
and base requests, against the HF model with each adapter merged by PEFT; LoRA on the experts refused by name."""

import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from vllm_support import assert_matches, expected, generate, reference

from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import save_checkpoint

ADAPTERS = {
    "experts_down": dict(target_modules=["experts.down_proj"], num_channels=24, seed=1),
    # gate/up rows and down columns of 13 channels (padded to 16 in the engine), and attention heads
    "experts_all": dict(target_modules=["experts.gate_up_proj", "experts.down_proj", "o_proj"], num_channels=13,
                        num_heads=1, seed=2),
    "attention": dict(target_modules=["q_proj", "o_proj"], num_heads=2, seed=3),
    "lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "lora_experts": dict(r=4, lora_alpha=4, target_modules=[],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}
SERVED = ["experts_down", "experts_all", "attention", "lora"]
# 4 adapters over 3 slots: the scheduler splits the batch and slots change hands between S2FT experts and LoRA
MIXED = ["experts_down", None, "experts_all", "attention", "lora", "experts_down", None, "experts_all"]


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def served(request, tmp_path_factory):
    from vllm import LLM

    root = tmp_path_factory.mktemp(request.param)
    # 4 experts of 256 channels, top-2; head_dim 32 (vLLM's CPU attention)
    base_dir = save_checkpoint(str(root / "base"), request.param, hidden_size=128, intermediate_size=256)
    adapters = {}
    for name, settings in ADAPTERS.items():
        lora = name.startswith("lora")
        config = (LoraConfig(init_lora_weights=False, **settings) if lora else
                  S2FTConfig(init_weights=False, **settings))
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
        adapters[name] = str(root / name)
        model.save_pretrained(adapters[name])
    references = {name: reference(base_dir, adapters[name]) for name in SERVED}
    references[None] = reference(base_dir)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setenv("VLLM_S2FT_MAX_K", "q_proj=64,o_proj=128")  # the dense projections adapted; experts need none
        llm = LLM(model=base_dir, dtype="float32", max_model_len=128, max_num_seqs=16, max_num_batched_tokens=256,
                  kv_cache_memory_bytes=1 << 28, enable_lora=True, max_loras=3, max_lora_rank=8, seed=0)
        yield llm, root, adapters, references
    llm.llm_engine.engine_core.shutdown()
    del llm


def lora_request(adapters, name, path=None):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, [*ADAPTERS, "broken_range", "broken_layer"].index(name) + 1, path or adapters[name])


def test_expert_adapters_are_exact_in_a_batch_with_dense_s2ft_lora_and_base_requests(served):
    llm, _, adapters, references = served
    for name in SERVED:
        assert references[name] != references[None], f"adapter {name} leaves the outputs unchanged"
    requests = [lora_request(adapters, name) if name else None for name in MIXED]
    assert_matches(generate(llm, requests), expected(references, MIXED))
    # again, with slots holding other adapters than in the first batch
    assert_matches(generate(llm, requests[::-1]), expected(references, MIXED[::-1]))


def test_lora_on_experts_is_refused_by_name_and_the_engine_keeps_serving(served):
    llm, _, adapters, references = served
    request = lora_request(adapters, "lora_experts")
    message = r"adapts fused MoE experts \('.*experts.*'\); vLLM 0\.32 applies LoRA to fused experts only in its Triton"
    with pytest.raises(ValueError, match=message):
        llm.llm_engine.add_lora(request)  # the worker's loader
    with pytest.raises(ValueError, match=message):
        generate(llm, [request])  # the front end, before the request is queued
    names = ["experts_all", "lora", None]
    assert_matches(generate(llm, [lora_request(adapters, n) if n else None for n in names]),
                   expected(references, names))


def _out_of_range(tensors):
    key = next(k for k in tensors if k.endswith("experts.s2ft_indices"))
    tensors[key] = tensors[key] + 256


def _deeper_model(tensors):
    for key in [k for k in tensors if ".layers.1." in k]:
        tensors[key.replace(".layers.1.", ".layers.7.")] = tensors.pop(key)


@pytest.mark.parametrize("name,edit,message", [
    ("broken_range", _out_of_range, r"experts' \(channels of 4 experts with 256 channels each\): indices must lie in "
                                    r"\[0, 256\)"),
    ("broken_layer", _deeper_model, "'model.layers.1.mlp.experts' has no indices; the adapter was saved for other "
                                    "target modules or is incomplete"),
])
def test_expert_adapters_that_do_not_fit_are_refused(served, name, edit, message):
    llm, root, adapters, references = served
    broken = root / name
    shutil.copytree(adapters["experts_down"], broken, dirs_exist_ok=True)
    tensors = load_file(broken / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=message):
        generate(llm, [lora_request(adapters, name, str(broken))])
    assert_matches(generate(llm, [lora_request(adapters, "experts_down")]), expected(references, ["experts_down"]))


def test_expert_adapters_are_refused_off_cpu_and_outside_the_lora_targets(served, monkeypatch):
    from vllm.platforms import current_platform

    from vllm_ext.adapter import read_s2ft_adapter
    from vllm_ext.validation import check_servable

    llm, _, adapters, _ = served
    adapter, config = read_s2ft_adapter(adapters["experts_down"]), llm.llm_engine.model_config.hf_config
    check_servable(adapter, config)
    with pytest.raises(ValueError, match=r"experts': the engine serves LoRA only on --lora-target-modules"):
        check_servable(adapter, config, target_modules=["o_proj"])
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    with pytest.raises(ValueError, match="fused MoE experts are served on vLLM's CPU platform only"):
        check_servable(adapter, config)


@pytest.mark.parametrize("dtype,isa", [(torch.float32, "vec"), (torch.bfloat16, "vec"), (torch.bfloat16, "amx")])
def test_packed_layout_reads_rows_and_columns_of_prepacked_weights(dtype, isa):
    from vllm._custom_ops import cpu_prepack_moe_weight

    from vllm_ext.moe import find_layout

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX on this CPU")
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 192, 128), (3, 128, 96)]:  # w13 (E, 2I, H) and w2 (E, H, I) of a tiny model
        weight = torch.randn(shape, generator=generator).to(dtype)
        packed = cpu_prepack_moe_weight(weight, isa)
        assert not torch.equal(packed, weight)
        layout = find_layout(shape[1:], dtype, isa)
        rows = torch.stack([torch.randperm(shape[1], generator=generator)[:5] for _ in range(shape[0])])
        columns = torch.stack([torch.randperm(shape[2], generator=generator)[:7] for _ in range(shape[0])])
        want_rows = torch.stack([weight[e, rows[e]] for e in range(shape[0])])
        want_columns = torch.stack([weight[e][:, columns[e]] for e in range(shape[0])])
        assert torch.equal(layout.gather_rows(packed, rows), want_rows)
        assert torch.equal(layout.gather_columns(packed, columns), want_columns)
