"""S²FT behaves as PEFT users expect from LoRA, checked against the base model and dense references."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from helpers import ALL_PROJECTIONS, dense_merge, reference_model, saved_adapter, selected_grad
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file

from s2ft_plugin import S2FTConfig, S2FTLayer
from s2ft_plugin.tiny import build_model

ARCHITECTURES = ["llama", "mistral", "qwen2"]


def s2ft(architecture="llama", seed=0, model=None, **options):
    options.setdefault("target_modules", ALL_PROJECTIONS)
    options.setdefault("head_ratio", 0.5)
    options.setdefault("init_weights", False)
    model = model or build_model(architecture)
    torch.manual_seed(seed)  # the random deltas of init_weights=False
    return get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", **options))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("architecture", ARCHITECTURES + ["qwen3", "gemma"])
def test_co_permutation_preserves_the_function(architecture, token_batch):
    base_logits = logits(build_model(architecture), token_batch)
    model = s2ft(architecture, seed=3)
    tuner = model.base_model
    assert tuner.s2ft_layout.orders, "the selection should need a permutation"
    permuted = model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    assert not torch.equal(permuted, build_model(architecture).model.layers[0].mlp.down_proj.weight)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, token_batch), base_logits, atol=1e-5, rtol=1e-5)
    # every adapter's positions are contiguous after co-permutation
    for _, _, layer in tuner.s2ft_layers():
        assert layer.s2ft_start["default"] is not None
    unpermuted = s2ft(architecture, seed=3, permute=False)
    assert not unpermuted.base_model.s2ft_layout.orders
    torch.testing.assert_close(logits(model, token_batch), logits(unpermuted, token_batch), atol=1e-5, rtol=1e-5)


def test_fresh_adapter_leaves_outputs_unchanged(token_batch):
    base_logits = logits(build_model("llama"), token_batch)
    model = s2ft(init_weights=True)
    torch.testing.assert_close(logits(model, token_batch), base_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_delta_gradients_equal_full_fine_tuning_gradients(architecture, token_batch, tmp_path):
    """dL/dD must be dL/dW restricted to the selected rows/columns, in the original coordinates."""
    model = s2ft(architecture, seed=5)
    model.save_pretrained(tmp_path)
    model.train()
    model(token_batch, labels=token_batch).loss.backward()

    adapters = saved_adapter(tmp_path)
    dense = dense_merge(build_model(architecture), adapters, requires_grad=True)
    dense(token_batch, labels=token_batch).loss.backward()

    for path, (indices, _) in adapters.items():
        layer = model.get_base_model().get_submodule(path)
        assert layer.get_base_layer().weight.grad is None
        expected = selected_grad(dense, path, indices)
        torch.testing.assert_close(layer.s2ft_delta["default"].grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_and_load_in_a_fresh_process(architecture, token_batch, tmp_path):
    model = s2ft(architecture, seed=1)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "S2FT" and config["selection"] == "random" and config["seed"] == 42
    assert all(key.endswith((".s2ft_delta", ".s2ft_indices")) for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    torch.save(token_batch, tmp_path / "ids.pt")
    script = f"""
import torch, s2ft_plugin
from peft import PeftModel
from s2ft_plugin.tiny import build_model
model = PeftModel.from_pretrained(build_model({architecture!r}), {str(tmp_path / 'adapter')!r})
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(model, token_batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        logits(reference_model(architecture, [tmp_path / "adapter"]), token_batch),
        logits(model, token_batch), atol=1e-4, rtol=1e-4,
    )


@pytest.mark.parametrize("trained_permuted", [None, False])
def test_adapter_loads_across_permutation_settings(trained_permuted, token_batch, tmp_path):
    model = s2ft("mistral", seed=2, permute=trained_permuted)
    assert bool(model.base_model.s2ft_layout.orders) == (trained_permuted is None)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["permute"] = None if trained_permuted is False else False
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(build_model("mistral"), tmp_path)
    assert bool(loaded.base_model.s2ft_layout.orders) == (trained_permuted is False)
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_from_pretrained_and_auto_class(low_cpu_mem_usage, token_batch, tmp_path):
    build_model("qwen2").save_pretrained(tmp_path / "base")
    model = s2ft("qwen2", seed=4)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model, token_batch)
    loaded = PeftModel.from_pretrained(build_model("qwen2"), tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(logits(loaded, token_batch), expected, atol=1e-5, rtol=1e-5)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(logits(auto, token_batch), expected, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_unload_restore_original_layout(token_batch, tmp_path):
    original = build_model("mistral")
    model = s2ft("mistral", seed=6)
    model.save_pretrained(tmp_path)
    adapted = logits(model, token_batch)

    model.merge_adapter()
    torch.testing.assert_close(logits(model, token_batch), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, token_batch), adapted, atol=1e-5, rtol=1e-5)

    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(module, S2FTLayer) for module in merged.modules())
    reference = reference_model("mistral", [tmp_path])
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, atol=1e-6, rtol=1e-6, msg=name)

    unloaded = model.unload()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(unloaded.state_dict()[name], tensor, atol=1e-6, rtol=1e-6, msg=name)


def test_safe_merge_refuses_nan_and_leaves_base_untouched(token_batch):
    model = s2ft("llama", seed=7)
    before = {name: tensor.clone() for name, tensor in model.get_base_model().state_dict().items()}
    adapted = logits(model, token_batch)
    with torch.no_grad():
        model.get_base_model().model.layers[1].mlp.down_proj.s2ft_delta["default"][0, 0] = float("nan")
    for merge in (lambda: model.merge_adapter(safe_merge=True), lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match="NaN"):
            merge()
        after = model.get_base_model().state_dict()
        assert all(torch.equal(after[name], tensor) for name, tensor in before.items() if "s2ft_delta" not in name)
    assert not model.get_base_model().model.layers[0].mlp.down_proj.merged
    with torch.no_grad():
        model.get_base_model().model.layers[1].mlp.down_proj.s2ft_delta["default"][0, 0] = 0.0
    assert torch.isfinite(logits(model, token_batch)).all() and adapted.shape == token_batch.shape + (384,)


def test_multiple_adapters_add_set_combine_delete(token_batch, tmp_path):
    model = s2ft("mistral", seed=8)
    torch.manual_seed(9)
    model.add_adapter("other", S2FTConfig(task_type="CAUSAL_LM", target_modules=["o_proj", "down_proj"], seed=7, init_weights=False))
    model.save_pretrained(tmp_path)  # writes tmp_path (default) and tmp_path/other
    first, second = tmp_path, tmp_path / "other"

    torch.testing.assert_close(logits(model, token_batch), logits(reference_model("mistral", [first]), token_batch), atol=1e-4, rtol=1e-4)
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, token_batch), logits(reference_model("mistral", [second]), token_batch), atol=1e-4, rtol=1e-4)
    model.base_model.set_adapter(["default", "other"])
    both = reference_model("mistral", [first, second])
    torch.testing.assert_close(logits(model, token_batch), logits(both, token_batch), atol=1e-4, rtol=1e-4)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged, token_batch), logits(both, token_batch), atol=1e-4, rtol=1e-4)

    layout = {key: order.clone() for key, order in model.base_model.s2ft_layout.orders.items()}
    model.delete_adapter("default")
    # deleting the adapter that laid the blocks out moves no base weight: the other adapters compute what they did
    assert model.base_model.s2ft_layout_owner is None
    assert model.base_model.s2ft_layout.orders.keys() == layout.keys()
    assert all(torch.equal(model.base_model.s2ft_layout.orders[key], order) for key, order in layout.items())
    torch.testing.assert_close(logits(model, token_batch), logits(reference_model("mistral", [second]), token_batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, token_batch):
    grads = []
    for checkpointing in (False, True):
        model = s2ft("llama", seed=10)
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.get_base_model().enable_input_require_grads()
        model.train()
        model(token_batch, labels=token_batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_keep_float32_deltas(dtype, token_batch):
    reference = s2ft("llama", seed=11)
    model = s2ft("llama", seed=11, model=build_model("llama").to(dtype))
    deltas = [p for n, p in model.named_parameters() if "s2ft_delta" in n]
    assert deltas and all(p.dtype == torch.float32 and p.requires_grad for p in deltas)
    model.train()
    out = model(token_batch, labels=token_batch)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in deltas)
    torch.testing.assert_close(out.logits.float(), logits(reference, token_batch), atol=0.1, rtol=0.05)


def test_bf16_autocast_training_step(token_batch):
    model = s2ft("llama", seed=12)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(token_batch, labels=token_batch).loss
    loss.backward()
    deltas = [p for n, p in model.named_parameters() if "s2ft_delta" in n]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in deltas)


def test_peft_loads_s2ft_adapters_without_an_explicit_import(token_batch, tmp_path):
    """The installed start-up hook registers S2FT as soon as peft is imported."""
    build_model("llama").save_pretrained(tmp_path / "base")
    model = s2ft("llama", seed=13)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(token_batch, tmp_path / "ids.pt")
    script = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r}), {str(tmp_path / 'adapter')!r})
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(model, token_batch), atol=1e-5, rtol=1e-5)


def test_importing_peft_prints_nothing():
    """bitsandbytes' notice about the hub kernel package it cannot find is dropped by the start-up hook (only it)."""
    result = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True, check=True)
    assert (result.stdout, result.stderr) == ("", "")
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():  # the CPUs where bitsandbytes looks for the kernel: without the hook, the notice shows
        unhooked = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "
                    "'_RegisterAfterPeft']; import peft")
        result = subprocess.run([sys.executable, "-c", unhooked], capture_output=True, text=True, check=True)
        assert "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" in result.stderr


def test_hooks_on_the_base_layer_still_run(token_batch):
    """The fused path (base matmul inside the delta) is only taken where it computes exactly what the base would."""
    model = s2ft("llama", seed=14)
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    expected = layer(torch.ones(1, 3, 256)) + 1.0
    layer.get_base_layer().register_forward_hook(lambda module, inputs, output: output + 1.0)
    torch.testing.assert_close(layer(torch.ones(1, 3, 256)), expected)
