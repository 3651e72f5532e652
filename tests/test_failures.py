"""No silent wrong results: failed loads and saves leave everything as it was, co-permutation moves only what it
understands and never shows outside the tuner, and unusable input is refused with the field or module named."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

import peft.peft_model
import pytest
import torch
from helpers import ALL_PROJECTIONS, dense_merge, saved_adapter
from peft import PeftModel, get_base_model_state_dict, get_peft_model, set_base_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import s2ft_plugin
from s2ft_plugin import S2FTConfig, S2FTLayer
from s2ft_plugin.tiny import build_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_untouched(model, before, attributes=None):
    """No S2FT module, the same tensors bit for bit, and (if given) the same attributes."""
    assert not any(isinstance(module, S2FTLayer) for module in model.modules())
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in before.items())
    if attributes is not None:
        assert set(vars(model)) == attributes


def adapter(tmp_path, architecture="llama", name="adapter", **options):
    """A trained-looking (random deltas) S2FT adapter saved under tmp_path/name, and its logits on token ids."""
    options = {"num_heads": 2, "num_channels": 24, "init_weights": False, "seed": 3, **options}
    torch.manual_seed(0)
    model = get_peft_model(build_model(architecture), S2FTConfig(task_type="CAUSAL_LM", **options))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def tiny(model_type, **overrides):
    """A small random model of any transformers type, with head_dim 32."""
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=384, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval()


# ---------------------------------------------------------------- co-permutation moves only complete coupled sets
def unknown_output_projection():
    """A Llama whose attention output projection has a name S2FT does not know (as in families it does not list)."""
    model = tiny("llama")
    for layer in model.model.layers:
        attention = layer.self_attn
        output = attention._modules.pop("o_proj")
        attention.add_module("attn_out", output)
        attention.__dict__["o_proj"] = output  # the forward still finds it
    return model


def test_incomplete_coupled_set_is_left_in_place_or_refused(token_batch):
    """q/k/v without the output projection they couple with must not be co-permuted alone."""
    base = logits(unknown_output_projection(), token_batch)
    targets = ["q_proj", "v_proj"]
    model = get_peft_model(unknown_output_projection(), S2FTConfig(target_modules=targets, num_heads=1, seed=1))
    assert not model.base_model.s2ft_layout.orders
    torch.testing.assert_close(logits(model, token_batch), base, rtol=0, atol=0)

    trained = get_peft_model(unknown_output_projection(),
                             S2FTConfig(target_modules=targets, num_heads=1, seed=1, init_weights=False))
    adapted = logits(trained, token_batch)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(trained.merge_and_unload(), token_batch), adapted, atol=1e-5, rtol=1e-5)

    untouched = unknown_output_projection()
    before = snapshot(untouched)
    with pytest.raises(ValueError, match=r"permute=True: block 'model.layers.0.self_attn' has only q_proj, k_proj, v_proj"):
        get_peft_model(untouched, S2FTConfig(target_modules=targets, num_heads=1, seed=1, permute=True))
    assert_untouched(untouched, before)


PER_HEAD_STATE = {
    "olmo2": {},
    "cohere": dict(use_qk_norm=True),
    "gpt_oss": dict(num_local_experts=2, num_experts_per_tok=1, head_dim=32, layer_types=None),
}


@pytest.mark.parametrize("model_type", list(PER_HEAD_STATE))
def test_per_head_state_moves_with_its_heads(model_type, token_batch):
    """OLMo2 q/k norms over all heads, Cohere per-head norms and GPT-OSS sinks, trained away from their init."""
    def model_with_trained_state():
        model = tiny(model_type, num_attention_heads=4, **PER_HEAD_STATE[model_type])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "self_attn" in name and ("norm" in name or "sinks" in name):
                    parameter.add_(torch.randn(parameter.shape, generator=generator))
        return model

    original = model_with_trained_state()
    base, state = logits(original, token_batch), snapshot(original)
    model = get_peft_model(model_with_trained_state(), S2FTConfig(target_modules=ATTENTION, num_heads=1, seed=5))
    assert model.base_model.s2ft_layout.orders, "the selection should need a permutation"
    assert any(block.coupled for block in model.base_model.s2ft_layout.blocks.values())
    torch.testing.assert_close(logits(model, token_batch), base, atol=1e-5, rtol=1e-5)
    exported = get_base_model_state_dict(model)
    assert all(torch.equal(exported[name], tensor) for name, tensor in state.items())


def model_with_head_scale():
    model = tiny("llama")
    model.model.layers[0].self_attn.register_buffer("head_scale", torch.rand(2))
    return model


def test_unknown_per_head_state_blocks_co_permutation(token_batch):
    model = model_with_head_scale()
    base = logits(model, token_batch)
    peft_model = get_peft_model(model, S2FTConfig(target_modules=ATTENTION, num_heads=1, seed=5))
    assert "model.layers.0.self_attn:heads" not in peft_model.base_model.s2ft_layout.orders
    torch.testing.assert_close(logits(peft_model, token_batch), base, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"self_attn.head_scale' \(2,\)"):
        get_peft_model(model_with_head_scale(), S2FTConfig(target_modules=ATTENTION, num_heads=1, permute=True))


# ---------------------------------------------------------------- the permutation never leaks out of the tuner
def test_base_state_dict_api_sees_and_accepts_the_original_order(token_batch, tmp_path):
    original = build_model("mistral")
    state = snapshot(original)
    torch.manual_seed(0)
    model = get_peft_model(original, S2FTConfig(target_modules=ALL_PROJECTIONS, num_heads=2, seed=3,
                                                init_weights=False))
    assert model.base_model.s2ft_layout.orders
    adapted = logits(model, token_batch)

    exported = get_base_model_state_dict(model)
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in state.items())
    set_base_model_state_dict(model, state)
    torch.testing.assert_close(logits(model, token_batch), adapted, rtol=0, atol=0)

    # the base saved beside the adapter reproduces the model
    model.save_pretrained(tmp_path / "adapter")
    fresh = build_model("mistral", seed=7)
    fresh.load_state_dict(get_base_model_state_dict(model))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, token_batch), adapted, atol=1e-5, rtol=1e-5)


def test_tuner_state_dict_round_trips_into_another_layout(token_batch):
    """PeftModel.state_dict() keeps the base weights in the current layout, with the layout recorded: a model whose
    placeholder selection (and so layout) differs still ends up exact."""
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), S2FTConfig(num_heads=2, seed=3, init_weights=False))
    other = get_peft_model(build_model("llama", seed=5), S2FTConfig(num_heads=2, seed=11))
    assert any(not torch.equal(other.base_model.s2ft_layout.orders.get(key, order), order)
               for key, order in model.base_model.s2ft_layout.orders.items())
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(other, token_batch), logits(model, token_batch), rtol=0, atol=0)


# ---------------------------------------------------------------- failed loads change nothing
def _missing_weights(folder):
    (folder / "adapter_model.safetensors").unlink()


def _truncated(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def _not_safetensors(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"this is no safetensors file" * 10)


def _refused_pickle(folder):
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'true'\ntR.")


@pytest.mark.parametrize("damage", [_missing_weights, _truncated, _not_safetensors, _refused_pickle])
def test_failed_from_pretrained_leaves_the_callers_model_as_it_was(damage, token_batch, tmp_path):
    good, trained = adapter(tmp_path)
    expected = logits(trained, token_batch)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    damage(bad)

    base = build_model("llama")
    before, attributes = snapshot(base), set(vars(base))
    with pytest.raises(Exception):
        PeftModel.from_pretrained(base, bad)
    assert_untouched(base, before, attributes)
    assert all(parameter.requires_grad for parameter in base.parameters())
    # the user fixes the path and retries on the same model
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, good), token_batch), expected,
                               atol=1e-5, rtol=1e-5)


def test_failed_load_adapter_leaves_no_entry(token_batch, tmp_path):
    good, _ = adapter(tmp_path, seed=4)
    _missing_weights(good)
    torch.manual_seed(1)
    model = get_peft_model(build_model("llama"), S2FTConfig(num_heads=1, init_weights=False))
    before = logits(model, token_batch)
    with pytest.raises(Exception):
        model.load_adapter(good, adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert not any(".other" in name for name in model.state_dict())
    torch.testing.assert_close(logits(model, token_batch), before, rtol=0, atol=0)


def test_invalid_adapter_name_is_refused_up_front(token_batch, tmp_path):
    model = get_peft_model(build_model("llama"), S2FTConfig(num_heads=1))
    with pytest.raises(ValueError, match=r"Invalid S2FT adapter name 'v1.2'.*without '\.'"):
        model.add_adapter("v1.2", S2FTConfig(num_heads=1))
    assert list(model.peft_config) == ["default"]
    folder, trained = adapter(tmp_path)
    model.load_adapter(folder, adapter_name="v1_2")
    model.add_adapter("third", S2FTConfig(num_heads=1))
    model.set_adapter("v1_2")
    torch.testing.assert_close(logits(model, token_batch), logits(trained, token_batch), atol=1e-5, rtol=1e-5)


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def test_non_finite_deltas_are_refused_with_the_module_named(tmp_path):
    folder, _ = adapter(tmp_path)

    def poison(tensors):
        key = next(key for key in tensors if key.endswith("layers.1.mlp.down_proj.s2ft_delta"))
        tensors[key][0, 0] = float("inf")

    _edit_tensors(folder, poison)
    base = build_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj' has a delta holding NaN or infinite"):
        PeftModel.from_pretrained(base, folder)
    assert_untouched(base, before)


def test_tensors_without_a_place_are_refused(tmp_path):
    """An adapter from a deeper model, and one whose config no longer names all the projections it trained."""
    torch.manual_seed(0)
    deeper = get_peft_model(build_model("llama", num_hidden_layers=4), S2FTConfig(num_heads=2, init_weights=False))
    deeper.save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match=r"'model.layers.2.\S+', which has no place in this model"):
        PeftModel.from_pretrained(build_model("llama"), tmp_path / "deep")

    folder, _ = adapter(tmp_path, name="all", target_modules=ALL_PROJECTIONS)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    unplaced = r"'model.layers.0.(self_attn|mlp).(q|k|v|gate|up)_proj.s2ft_\w+', which has no place"
    with pytest.raises(ValueError, match=unplaced):
        PeftModel.from_pretrained(build_model("llama"), folder)


@pytest.mark.parametrize(
    "field,value,message",
    [("head_ratio", "0.5", "head_ratio must be a number, got '0.5'"), ("seed", None, "seed must be an int, got None"),
     ("target_modules", 5, "target_modules must be a module name, a list of names or null, got 5"),
     ("permute", "yes", "permute must be true, false or null")],
)
def test_wrongly_typed_config_values_name_the_field(field, value, message, tmp_path):
    with pytest.raises(TypeError, match=message):
        S2FTConfig(**{field: value})
    folder, _ = adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    base = build_model("llama")
    before = snapshot(base)
    with pytest.raises(TypeError, match=message):
        PeftModel.from_pretrained(base, folder)
    assert_untouched(base, before)


def test_too_many_units_are_refused_before_any_module_changes():
    model = build_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="asks for 300 channels per block but the model has only 256"):
        get_peft_model(model, S2FTConfig(num_channels=300))
    assert_untouched(model, before)


# ---------------------------------------------------------------- concurrency and atomic saves
@pytest.mark.parametrize("first_permutes", [False, None])
def test_adding_and_deleting_adapters_does_not_change_a_concurrent_forward(first_permutes, token_batch):
    """One thread serves adapter 'served' while another adds and deletes permuting adapters (and, when the first
    adapter laid the blocks out, deletes that one)."""
    options = dict(target_modules=ALL_PROJECTIONS, num_heads=2, init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(build_model("mistral"), S2FTConfig(seed=1, permute=first_permutes, **options),
                           adapter_name="first")
    model.add_adapter("served", S2FTConfig(seed=2, **options))
    model.set_adapter("served")
    expected = logits(model, token_batch)
    layout = {key: order.clone() for key, order in model.base_model.s2ft_layout.orders.items()}
    results, errors = [], []

    def serve():
        try:
            for _ in range(30):
                results.append(logits(model, token_batch))
        except Exception as error:  # reported below
            errors.append(error)

    server = threading.Thread(target=serve)
    server.start()
    model.delete_adapter("first")
    for round_ in range(6):
        name = f"other{round_}"
        model.add_adapter(name, S2FTConfig(seed=round_ + 7, **options))
        model.delete_adapter(name)
    server.join(timeout=120)
    assert not errors and len(results) == 30
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert model.base_model.s2ft_layout.orders.keys() == layout.keys()


def test_interrupted_save_keeps_the_previous_adapter(token_batch, tmp_path, monkeypatch):
    folder, first = adapter(tmp_path)
    expected = logits(first, token_batch)
    torch.manual_seed(9)
    second = get_peft_model(build_model("llama"), S2FTConfig(num_heads=2, num_channels=24, seed=8,
                                                             init_weights=False))

    def interrupted(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "safe_save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(folder)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no staging folder left behind
    torch.testing.assert_close(logits(PeftModel.from_pretrained(build_model("llama"), folder), token_batch), expected,
                               atol=1e-5, rtol=1e-5)
    second.save_pretrained(folder)
    reference = dense_merge(build_model("llama"), saved_adapter(folder))
    torch.testing.assert_close(logits(reference, token_batch), logits(second, token_batch), atol=1e-4, rtol=1e-4)


def test_transformers_own_adapter_api_applies_and_checks_loaded_indices(token_batch, tmp_path):
    """transformers' ``model.load_adapter`` writes the saved indices straight into the buffers; a calibrated
    selection differs from the placeholder the layers were built with."""
    from s2ft_plugin import initialize_s2ft_selection

    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), S2FTConfig(num_heads=2, init_weights=False, selection="weight",
                                                            selection_order="small"))
    initialize_s2ft_selection(model, show_progress_bar=False)
    model.save_pretrained(tmp_path / "adapter")
    base = build_model("llama")
    base.load_adapter(str(tmp_path / "adapter"))
    reference = dense_merge(build_model("llama"), saved_adapter(tmp_path / "adapter"))
    torch.testing.assert_close(logits(base, token_batch), logits(reference, token_batch), atol=1e-4, rtol=1e-4)

    _edit_tensors(tmp_path / "adapter", lambda tensors: tensors[next(
        key for key in tensors if key.endswith("layers.0.mlp.down_proj.s2ft_indices"))].fill_(3))
    other = build_model("llama")
    other.load_adapter(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"duplicates.*Module: 'model.layers.0.mlp.down_proj'"):
        other(token_batch)


def test_transformers_load_adapter_of_a_second_adapter_keeps_the_first_exact(token_batch, tmp_path):
    """transformers makes a new tuner per ``load_adapter``: it must address its units through the layout the first
    adapter laid out, not lay the blocks out again behind the first one's back."""
    for seed, name in ((1, "first"), (2, "second")):
        torch.manual_seed(seed)
        get_peft_model(build_model("llama"), S2FTConfig(num_heads=2, init_weights=False, seed=seed)).save_pretrained(
            tmp_path / name)
    base = build_model("llama")
    base.load_adapter(str(tmp_path / "first"), adapter_name="first")
    base.load_adapter(str(tmp_path / "second"), adapter_name="second")
    for name in ("second", "first"):
        base.set_adapter(name)
        reference = dense_merge(build_model("llama"), saved_adapter(tmp_path / name))
        torch.testing.assert_close(logits(base, token_batch), logits(reference, token_batch), atol=1e-4, rtol=1e-4)
    shown = {key.replace("base_layer.", ""): value for key, value in base.state_dict().items() if ".s2ft_" not in key}
    state = build_model("llama").state_dict()
    assert shown.keys() == state.keys() and all(torch.equal(shown[key], state[key]) for key in state)  # original order


# ---------------------------------------------------------------- issue 15: messages, leftovers, reserved names
def test_unreadable_weights_name_the_file(tmp_path):
    """Row 7: safetensors' own error names no file; the load (and hotswap) errors name it, and nothing changes."""
    good, _ = adapter(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:100])
    file = str(bad / "adapter_model.safetensors")
    base = build_model("llama")
    before = snapshot(base)
    with pytest.raises(SafetensorError, match=re.escape(file)):
        PeftModel.from_pretrained(base, bad)
    assert_untouched(base, before)
    model = PeftModel.from_pretrained(base, good)
    with pytest.raises(SafetensorError, match=re.escape(file)):
        model.load_adapter(bad, adapter_name="other")
    with pytest.raises(SafetensorError, match=re.escape(file)):
        s2ft_plugin.hotswap_adapter(model, str(bad))
    assert list(model.peft_config) == ["default"]


def test_safe_merge_of_non_finite_deltas_says_what_peft_says(token_batch):
    """Row 8: PEFT's message first (its tests and users' scripts match it), S2FT's detail after it."""
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), S2FTConfig(num_heads=2, init_weights=False))
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.down_proj.s2ft_delta["default"][0, 0] = float("nan")
    before = {key: value for key, value in snapshot(model.get_base_model()).items() if ".s2ft_" not in key}
    peft_message = "NaNs detected in the merged weights. The adapter default seems to be broken"
    for merge in (lambda: model.merge_adapter(safe_merge=True), lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match=re.escape(peft_message) + r" \(S2FT: .*'model.layers.1.mlp.down_proj'"):
            merge()
        state = model.get_base_model().state_dict()
        assert all(torch.equal(state[key], value) for key, value in before.items())


KILLED_SAVE = """
import os, signal, sys, torch, peft.peft_model
from peft import get_peft_model
from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import build_model

def killed(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)

peft.peft_model.safe_save_file = killed
get_peft_model(build_model("llama"), S2FTConfig(num_heads=1)).save_pretrained(sys.argv[1])
"""


def test_staging_folders_of_killed_saves_are_removed_by_the_next_save(token_batch, tmp_path):
    """Row 9: a save killed midway leaves its staging folder; the next save to that adapter removes it (a live save's
    folder, of this process here, stays)."""
    folder, first = adapter(tmp_path)
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder)], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    leftovers = [path for path in tmp_path.iterdir() if path.name.startswith(".adapter.saving-")]
    assert len(leftovers) == 1 and (leftovers[0] / "adapter_model.safetensors").read_bytes() == b"partial"
    live = tempfile.mkdtemp(prefix=f".adapter.saving-{os.getpid()}-", dir=tmp_path)  # not this machine's format
    torch.testing.assert_close(logits(PeftModel.from_pretrained(build_model("llama"), folder), token_batch),
                               logits(first, token_batch), atol=1e-5, rtol=1e-5)  # the killed save changed nothing
    first.save_pretrained(folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["adapter", os.path.basename(live)])


def test_the_reserved_name_of_the_base_model_is_refused_everywhere(tmp_path):
    """Row 10: "__base__" means the base model in `adapter_names`, so no adapter may take it."""
    folder, _ = adapter(tmp_path)
    model = PeftModel.from_pretrained(build_model("llama"), folder)
    reserved = "adapter name '__base__': it is reserved"
    with pytest.raises(ValueError, match=reserved):
        model.add_weighted_adapter(["default"], [1.0], "__base__")
    with pytest.raises(ValueError, match=reserved):
        model.add_adapter("__base__", S2FTConfig(num_heads=1))
    with pytest.raises(ValueError, match=reserved):
        model.load_adapter(folder, adapter_name="__base__")
    with pytest.raises(ValueError, match=reserved):
        get_peft_model(build_model("llama"), S2FTConfig(num_heads=1), adapter_name="__base__")
    assert list(model.peft_config) == ["default"]
