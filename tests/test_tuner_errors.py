"""Bad input gets a clear error, and nothing already there is lost or corrupted."""

import json

import pytest
import torch
from helpers import ALL_PROJECTIONS
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from s2ft_plugin import S2FTConfig, S2FTLayer
from s2ft_plugin.tiny import build_model


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(head_ratio=0.0), "head_ratio must lie in"),
        (dict(channel_ratio=1.5), "channel_ratio must lie in"),
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(selection="magic"), "selection must be one of"),
        (dict(selection_order="medium"), "selection_order must be one of"),
    ],
)
def test_config_values_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        S2FTConfig(**options)


@pytest.mark.parametrize(
    "architecture,options,message",
    [
        ("llama", dict(target_modules=["not_a_module"]), "not_a_module"),
        ("llama", dict(target_modules=["lm_head"]), "cannot target 'lm_head'"),
        ("llama", dict(num_heads=5), "only 4"),
        ("bloom", dict(permute=True), "cannot reorder its heads: its ALiBi position biases follow the head order"),
        ("gpt2", dict(target_modules=["ln_1"]), "cannot target 'transformer.h.0.ln_1'"),
    ],
)
def test_unfit_targets_are_refused_before_the_model_changes(architecture, options, message):
    model = build_model(architecture)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", **options))
    assert not any(isinstance(module, S2FTLayer) for module in model.modules())
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())


def test_fused_model_trains_without_permutation(token_batch):
    model = get_peft_model(build_model("phi3"), S2FTConfig(task_type="CAUSAL_LM", permute=False, init_weights=False,
                                                           target_modules=["qkv_proj", "o_proj", "gate_up_proj"]))
    assert not model.base_model.s2ft_layout.orders
    adapted = model(token_batch).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(token_batch).logits, adapted, atol=1e-5, rtol=1e-5)


def tamper(adapter_dir, edit):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.s2ft_indices"))
    edit(tensors, key)
    save_file(tensors, path)


def duplicate(tensors, key):
    tensors[key][1] = tensors[key][0]


def out_of_range(tensors, key):
    tensors[key][0] = 10_000


def wrong_count(tensors, key):
    tensors[key] = tensors[key][:-1]


def missing(tensors, key):
    del tensors[key]


@pytest.mark.parametrize(
    "edit,message",
    [(duplicate, "duplicates"), (out_of_range, r"must lie in \[0, 256\)"), (wrong_count, "config gives this layer"),
     (missing, "has no indices")],
)
def test_unfit_adapter_is_refused_and_the_model_keeps_serving(edit, message, token_batch, tmp_path):
    get_peft_model(build_model("llama"), S2FTConfig(task_type="CAUSAL_LM", seed=1, init_weights=False)).save_pretrained(tmp_path / "bad")
    tamper(tmp_path / "bad", edit)
    torch.manual_seed(0)
    serving = get_peft_model(build_model("llama"), S2FTConfig(task_type="CAUSAL_LM", seed=2, init_weights=False))
    before = serving(token_batch).logits
    with pytest.raises(ValueError, match=message):
        serving.load_adapter(tmp_path / "bad", adapter_name="bad")
    assert "bad" not in serving.peft_config
    assert not any("bad" in name for name, _ in serving.named_parameters())
    torch.testing.assert_close(serving(token_batch).logits, before)


def test_adapter_for_another_model_shape_is_refused(token_batch, tmp_path):
    get_peft_model(build_model("llama", intermediate_size=512), S2FTConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    base = build_model("llama")
    with pytest.raises(ValueError, match="config gives this layer"):
        PeftModel.from_pretrained(base, tmp_path)
    # the base passed in is left as it was: no S2FT layers, original weight order
    assert not any(isinstance(module, S2FTLayer) for module in base.modules())
    for name, tensor in build_model("llama").state_dict().items():
        assert torch.equal(base.state_dict()[name], tensor), name
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_channels"] = 26  # fits the count, but the shapes still do not
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="must lie in|shape"):
        PeftModel.from_pretrained(build_model("llama"), tmp_path)


def test_all_projections_accepted_on_supported_families():
    for architecture in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        model = get_peft_model(build_model(architecture), S2FTConfig(target_modules=ALL_PROJECTIONS))
        assert sum(isinstance(m, S2FTLayer) for m in model.modules()) == 14


def test_failed_load_into_an_adapter_in_use_keeps_it(token_batch, tmp_path):
    get_peft_model(build_model("llama"), S2FTConfig(task_type="CAUSAL_LM", seed=1, init_weights=False)).save_pretrained(tmp_path)
    tamper(tmp_path, duplicate)
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), S2FTConfig(task_type="CAUSAL_LM", seed=2, init_weights=False))
    before = model(token_batch).logits  # the adapter is in use
    with pytest.raises(ValueError, match="duplicates"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(token_batch).logits, before)
