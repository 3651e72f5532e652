"""The rest of PEFT's surface on S2FT: mixed-adapter batches, layer selection, hotswapping, adapter fusion and
torch.compile, each checked against per-adapter runs, fresh loads or dense references."""

import json

import pytest
import torch
import torch._dynamo
from helpers import ALL_PROJECTIONS, INPUT_SIDE, dense_merge, reference_model, saved_adapter
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import s2ft_plugin
from s2ft_plugin import S2FTConfig, S2FTLayer
from s2ft_plugin.tiny import build_model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def s2ft(model=None, architecture="mistral", seed=0, **options):
    options = {"init_weights": False, "task_type": "CAUSAL_LM", **options}
    torch.manual_seed(seed)  # the random deltas of init_weights=False
    return get_peft_model(model or build_model(architecture), S2FTConfig(**options))


def two_adapters(tmp_path, architecture="mistral"):
    """'default' on every projection (1 head, GQA: half a key/value group) and 'other' on o/down_proj, saved."""
    model = s2ft(architecture=architecture, target_modules=ALL_PROJECTIONS, num_heads=1, num_channels=16)
    torch.manual_seed(1)
    model.add_adapter("other", S2FTConfig(target_modules=["o_proj", "down_proj"], num_heads=2, seed=7,
                                          init_weights=False))
    model.save_pretrained(tmp_path)  # default in tmp_path, other in tmp_path/other
    return model.eval(), {"default": tmp_path, "other": tmp_path / "other"}


def modules_of(model, adapter_name="default"):
    return {path for path, module in model.get_base_model().named_modules()
            if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_delta}


# ---------------------------------------------------------------- mixed-adapter batches
def test_mixed_adapter_batch_forward_is_exact_per_row(tmp_path):
    model, folders = two_adapters(tmp_path)
    ids = torch.randint(3, 384, (5, 9), generator=torch.Generator().manual_seed(0))
    names = ["other", "default", "__base__", "other", "default"]
    mixed = logits(model, ids, adapter_names=names)

    runs = {}
    for name in folders:
        model.base_model.set_adapter(name)
        runs[name] = logits(model, ids)
    with model.disable_adapter():
        runs["__base__"] = logits(model, ids)
    references = {name: logits(reference_model("mistral", [folder]), ids) for name, folder in folders.items()}
    references["__base__"] = logits(build_model("mistral"), ids)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], runs[name][row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[row], references[name][row], atol=1e-4, rtol=1e-4)
    # hooks are gone afterwards: a plain call uses the active adapter on every row
    torch.testing.assert_close(logits(model, ids), runs["other"], atol=0, rtol=0)


def test_mixed_adapter_batch_generate_follows_beams_and_return_sequences(tmp_path):
    model, folders = two_adapters(tmp_path)
    references = {name: reference_model("mistral", [folder]) for name, folder in folders.items()}
    references["__base__"] = build_model("mistral")
    ids = torch.randint(3, 384, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    names = ["other", "__base__", "default"]
    settings = [dict(), dict(num_beams=2, num_return_sequences=2)]
    for options in settings:
        per_row = options.get("num_return_sequences", 1)
        generate = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, **options)
        mixed = model.generate(input_ids=ids, adapter_names=names, **generate)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids, **generate)
            else:
                model.base_model.set_adapter(name)
                alone = model.generate(input_ids=ids, **generate)
            rows = slice(row * per_row, (row + 1) * per_row)
            assert torch.equal(mixed[rows], alone[rows]), (options, name)
            assert torch.equal(mixed[rows], references[name].generate(input_ids=ids, **generate)[rows]), (options, name)


def test_mixed_adapter_batches_on_a_model_that_flattens_its_tokens(tmp_path):
    """OPT's FFN sees (batch x tokens, hidden) rows: each token still gets its row's adapter."""
    model = s2ft(architecture="opt", num_heads=1)  # out_proj and fc2
    torch.manual_seed(1)
    model.add_adapter("other", S2FTConfig(target_modules=["fc1", "q_proj"], num_heads=2, seed=3, init_weights=False))
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 384, (3, 7), generator=torch.Generator().manual_seed(0))
    names = ["other", "__base__", "default"]
    mixed = logits(model.eval(), ids, adapter_names=names)
    references = {"default": reference_model("opt", [tmp_path]), "other": reference_model("opt", [tmp_path / "other"]),
                  "__base__": build_model("opt")}
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], logits(references[name], ids)[row], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(ids, adapter_names=names[:2])


def test_switching_adapters_by_merging_matches_each_adapter_merged_densely(tmp_path):
    """unmerge_adapter, set_adapter, merge_adapter, back and forth between adapters on other units (the cheap switch
    hf_generate measures): each time the model is the base with that adapter's deltas added, and the base comes back."""
    model, folders = two_adapters(tmp_path)
    ids = torch.randint(3, 384, (2, 5), generator=torch.Generator().manual_seed(0))
    references = {name: logits(reference_model("mistral", [folder]), ids) for name, folder in folders.items()}
    base = logits(build_model("mistral"), ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), references["default"], atol=1e-4, rtol=1e-4)
    for name in ("other", "default", "other"):
        model.unmerge_adapter()
        model.set_adapter(name)
        model.merge_adapter()
        torch.testing.assert_close(logits(model, ids), references[name], atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=1e-5)


def test_unmerge_after_loading_into_a_merged_adapter_restores_the_base():
    """Weights and indices written into a merged adapter (a loader) must not change what unmerging subtracts: the
    base comes back exactly, and the new adapter then applies."""
    base = build_model("mistral")
    ids = torch.randint(3, 384, (2, 5), generator=torch.Generator().manual_seed(0))
    model = s2ft(build_model("mistral"), seed=0).eval()
    torch.manual_seed(5)  # other deltas on other units (the selection's own seed)
    other = get_peft_model(build_model("mistral"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=5)).eval()
    model.merge_adapter()
    set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids), logits(other, ids), atol=1e-5, rtol=1e-5)


def test_mixed_adapter_batches_refuse_what_they_cannot_serve(tmp_path):
    model, _ = two_adapters(tmp_path)
    ids = torch.randint(3, 384, (2, 5))
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(ids, adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(ids, adapter_names=["default"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(ids, adapter_names="default")
    with pytest.raises(ValueError, match="cannot honour `alora_offsets`"):
        model(ids, alora_offsets=[1, 1])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(ids, adapter_names=["default", "__base__"])
    model.unmerge_adapter()
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(ids, adapter_names=["default", "__base__"])


def test_compiled_model_refuses_adapter_names_instead_of_ignoring_them(tmp_path):
    """Issue 15 row 5: compiled code does not see hooks added after compilation, so it would give every row the active
    adapter; it refuses instead, whether it was compiled on a plain call or on a mixed one."""
    model, _ = two_adapters(tmp_path)
    ids = torch.randint(3, 384, (2, 5), generator=torch.Generator().manual_seed(0))
    names = ["other", "__base__"]
    expected = logits(model, ids, adapter_names=names)
    for first_call in ({}, {"adapter_names": names}):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        if not first_call:
            torch.testing.assert_close(logits(compiled, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
        for adapter_names in (names, names[:1]):
            with pytest.raises(ValueError, match="torch.compile'd S2FT model cannot honour `adapter_names`"):
                logits(compiled, ids, adapter_names=adapter_names)
    torch._dynamo.reset()
    torch.testing.assert_close(logits(model, ids, adapter_names=names), expected, rtol=0, atol=0)


def test_mixed_batches_reach_modules_to_save(tmp_path):
    torch.manual_seed(0)
    model = s2ft(target_modules=["o_proj"], num_heads=1, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.eval()
    ids = torch.randint(3, 384, (2, 5))
    mixed = logits(model, ids, adapter_names=["__base__", "default"])
    with model.disable_adapter():
        torch.testing.assert_close(mixed[0], logits(model, ids)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], logits(model, ids)[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- layer selection
@pytest.mark.parametrize("layers", [dict(layers_to_transform=1), dict(layers_to_transform=[1], layers_pattern="layers")])
def test_layers_to_transform_adapts_only_those_layers_and_round_trips(layers, token_batch, tmp_path):
    model = s2ft(target_modules=ALL_PROJECTIONS, num_heads=2, **layers)
    ffn = ("gate_proj", "up_proj", "down_proj")
    assert modules_of(model) == {f"model.layers.1.{'mlp' if name in ffn else 'self_attn'}.{name}"
                                 for name in ALL_PROJECTIONS}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {key: saved[key] for key in layers} == layers
    loaded = PeftModel.from_pretrained(build_model("mistral"), tmp_path)
    assert modules_of(loaded) == modules_of(model)
    expected = logits(reference_model("mistral", [tmp_path]), token_batch)
    torch.testing.assert_close(logits(model, token_batch), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("options, error, message", [
    (dict(layers_pattern="layers"), ValueError, "layers_pattern needs layers_to_transform"),
    (dict(target_modules=r".*\.o_proj", layers_to_transform=[0]), ValueError, "regex string"),
    (dict(layers_to_transform=[-1]), ValueError, "indices >= 0"),
    (dict(layers_to_transform="0"), TypeError, "layers_to_transform must be a layer index"),
    (dict(layers_to_transform=[0.5]), TypeError, "layers_to_transform must be a layer index"),
    (dict(layers_pattern=3, layers_to_transform=0), TypeError, "layers_pattern must be a name"),
    (dict(unit_pattern={"o_proj": "two"}), TypeError, "unit_pattern must be a mapping"),
    (dict(unit_pattern={"o_proj": 0}), ValueError, "counts must be positive"),
])
def test_layer_selection_options_are_validated(options, error, message):
    with pytest.raises(error, match=message):
        S2FTConfig(**options)


def test_layers_beyond_the_model_are_refused_before_any_change(tmp_path):
    base = build_model("mistral")
    with pytest.raises(ValueError, match=r"layers_to_transform names layer\(s\) \[5\]"):
        get_peft_model(base, S2FTConfig(layers_to_transform=[0, 5]))
    assert not any(isinstance(module, S2FTLayer) for module in base.modules())
    model = s2ft(layers_to_transform=[0])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["layers_to_transform"] = "all"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="S2FTConfig.layers_to_transform"):
        PeftModel.from_pretrained(build_model("mistral"), tmp_path)


@pytest.mark.parametrize("exclude", [["model.layers.0.mlp.down_proj", "q_proj"], r".*layers\.0\.mlp\.down_proj|.*q_proj"])
def test_exclude_modules_leaves_them_alone(exclude, token_batch, tmp_path):
    model = s2ft(target_modules=["q_proj", "o_proj", "down_proj"], exclude_modules=exclude)
    assert modules_of(model) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj",
                                 "model.layers.1.mlp.down_proj"}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model("mistral"), tmp_path)
    assert modules_of(loaded) == modules_of(model)
    expected = logits(reference_model("mistral", [tmp_path]), token_batch)
    torch.testing.assert_close(logits(loaded, token_batch), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- hotswapping
def saved_s2ft(folder, seed, **options):
    model = s2ft(seed=seed, **{"target_modules": ALL_PROJECTIONS, "num_heads": 2, "num_channels": 16, **options})
    model.save_pretrained(folder)
    return folder


def test_hotswap_into_a_compiled_model_gives_the_new_adapter_without_recompiling(token_batch, tmp_path):
    first, second = saved_s2ft(tmp_path / "a", seed=1), saved_s2ft(tmp_path / "b", seed=2, permute=False)
    expected = {folder: logits(reference_model("mistral", [folder]), token_batch) for folder in (first, second)}
    model = PeftModel.from_pretrained(build_model("mistral"), first)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # guards, not the backend, decide recompilation
    torch.testing.assert_close(logits(compiled, token_batch), expected[first], atol=1e-4, rtol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for folder in (second, first, second):
            s2ft_plugin.hotswap_adapter(compiled, str(folder))
            torch.testing.assert_close(logits(compiled, token_batch), expected[folder], atol=1e-4, rtol=1e-4)
    assert model.peft_config["default"].permute is False and model.peft_config["default"].inference_mode
    reloaded = PeftModel.from_pretrained(build_model("mistral"), second)
    torch.testing.assert_close(logits(model, token_batch), logits(reloaded, token_batch), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_hotswap_refuses_unfit_adapters_and_changes_nothing(token_batch, tmp_path):
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    first = saved_s2ft(tmp_path / "a", seed=1)
    other_counts = saved_s2ft(tmp_path / "heads", seed=2, num_heads=1)
    corrupt = saved_s2ft(tmp_path / "corrupt", seed=3)
    tensors = load_file(corrupt / "adapter_model.safetensors")
    indices = tensors[next(key for key in tensors if key.endswith("layers.1.mlp.down_proj.s2ft_indices"))]
    indices[1] = indices[0]
    save_file(tensors, corrupt / "adapter_model.safetensors")
    lora = tmp_path / "lora"
    get_peft_model(build_model("mistral"), LoraConfig(target_modules=["o_proj"])).save_pretrained(lora)

    model = PeftModel.from_pretrained(build_model("mistral"), first)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for folder, adapter_name, match in [
        (other_counts, "default", "indices but the config gives this layer"),
        (corrupt, "default", "duplicates.*layers.1.mlp.down_proj"),
        (lora, "default", "holds a LORA adapter"),
        (first, "missing", "No S2FT adapter 'missing'"),
    ]:
        with pytest.raises(ValueError, match=match):
            s2ft_plugin.hotswap_adapter(model, str(folder), adapter_name=adapter_name)
        assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    model.merge_adapter()
    with pytest.raises(ValueError, match="while it is merged"):
        s2ft_plugin.hotswap_adapter(model, str(other_counts))
    with pytest.raises(ValueError, match="only supports"):  # PEFT's own hotswap serves LoRA only, and says so
        peft_hotswap(model, str(first), adapter_name="default")


# ---------------------------------------------------------------- adapter fusion
def dense_delta(layer_shape, side, indices, delta):
    full = torch.zeros(layer_shape)
    return full.index_add_(1 if side == "input" else 0, indices, delta)


def test_add_weighted_adapter_is_the_weighted_sum_of_dense_deltas_and_reloads_exactly(token_batch, tmp_path):
    model, folders = two_adapters(tmp_path / "sources")
    weights = {"default": 0.7, "other": -1.5}
    adapted = logits(model, token_batch)
    model.add_weighted_adapter(list(weights), list(weights.values()), "fused")
    torch.testing.assert_close(logits(model, token_batch), adapted, atol=0, rtol=0)  # not activated, as for LoRA

    sources = {name: saved_adapter(folder) for name, folder in folders.items()}
    for path, module in model.get_base_model().named_modules():
        if isinstance(module, S2FTLayer) and "fused" in module.s2ft_delta:
            shape = module.get_base_layer().weight.shape
            side = "input" if path.endswith(INPUT_SIDE) else "output"
            expected = sum(weight * dense_delta(shape, side, *sources[name][path])
                           for name, weight in weights.items() if path in sources[name])
            fused = dense_delta(shape, side, module.s2ft_indices["fused"], module.s2ft_delta["fused"].detach())
            torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-6, msg=path)
    assert modules_of(model, "fused") == set(sources["default"]) | set(sources["other"])

    reference = build_model("mistral")
    for name, weight in weights.items():
        dense_merge(reference, {path: (indices, weight * delta) for path, (indices, delta) in sources[name].items()})
    model.set_adapter("fused")
    torch.testing.assert_close(logits(model, token_batch), logits(reference, token_batch), atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "saved", selected_adapters=["fused"])
    folder = tmp_path / "saved" / "fused"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["unit_pattern"]["model.layers.0.self_attn.o_proj"] > 1
    loaded = PeftModel.from_pretrained(build_model("mistral"), folder)
    assert load_file(folder / "adapter_model.safetensors").keys() == saved_tensors(loaded).keys()
    for key, value in saved_tensors(loaded).items():
        assert torch.equal(load_file(folder / "adapter_model.safetensors")[key], value), key
    torch.testing.assert_close(logits(loaded, token_batch), logits(reference, token_batch), atol=1e-4, rtol=1e-4)


def saved_tensors(model):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.add_weighted_adapter(["default", "other"], [1.0, 1.0], "svd", combination_type="svd"), "exactly by addition"),
    (lambda m: m.add_weighted_adapter(["default", "missing"], [1.0, 1.0], "x"), "missing does not exist"),
    (lambda m: m.add_weighted_adapter(["default", "other"], [1.0], "x"), "one weight per adapter"),
    (lambda m: m.add_weighted_adapter(["default"], [float("nan")], "x"), "finite numbers"),
    (lambda m: m.add_weighted_adapter(["default"], [1.0], "other"), "already exists"),
    (lambda m: m.add_weighted_adapter(["default"], [1.0], "v1.2"), "Invalid S2FT adapter name"),
])
def test_add_weighted_adapter_refuses_bad_arguments(call, message, tmp_path):
    model, _ = two_adapters(tmp_path)
    with pytest.raises(ValueError, match=message):
        call(model)
    assert set(model.peft_config) == {"default", "other"}


@pytest.mark.parametrize("architecture", ["phi3", "falcon_gqa"])  # fused [q|k|v] + [gate|up]; per-group qkv rows
def test_add_weighted_adapter_on_fused_projections(architecture, token_batch, tmp_path):
    fused = ["qkv_proj", "gate_up_proj", "query_key_value", "dense_h_to_4h"]
    model = s2ft(architecture=architecture, target_modules=fused, num_heads=1, num_channels=8, seed=0)
    torch.manual_seed(1)
    model.add_adapter("other", S2FTConfig(target_modules=fused, num_heads=1, num_channels=8, seed=9,
                                          init_weights=False))
    model.save_pretrained(tmp_path / "sources")
    model.add_weighted_adapter(["default", "other"], [0.5, -2.0], "fused")
    model.set_adapter("fused")
    reference = build_model(architecture)
    for name, weight in (("default", 0.5), ("other", -2.0)):
        folder = tmp_path / "sources" / ("" if name == "default" else name)
        dense_merge(reference, {p: (i, weight * d) for p, (i, d) in saved_adapter(folder).items()})
    expected = logits(reference, token_batch)
    torch.testing.assert_close(logits(model.eval(), token_batch), expected, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved", selected_adapters=["fused"])
    loaded = PeftModel.from_pretrained(build_model(architecture), tmp_path / "saved" / "fused")
    torch.testing.assert_close(logits(loaded, token_batch), expected, atol=1e-4, rtol=1e-4)


def test_add_weighted_adapter_refuses_moe_expert_deltas():
    model = s2ft(architecture="mixtral", num_heads=1)  # default targets: o_proj and the experts' down_proj
    with pytest.raises(ValueError, match="adapts the MoE experts at 'model.layers.0.mlp.experts'"):
        model.add_weighted_adapter(["default"], [2.0], "doubled")
    assert set(model.peft_config) == {"default"}


def test_unit_pattern_sets_the_count_of_each_module():
    model = s2ft(target_modules=ALL_PROJECTIONS, num_heads=1, num_channels=8,
                 unit_pattern={"layers.0.self_attn.k_proj": 2, "layers.0.mlp.down_proj": 40})
    layers = model.get_base_model().model.layers
    head_dim = 32
    assert layers[0].self_attn.k_proj.s2ft_indices["default"].numel() == 2 * head_dim  # both key/value heads
    assert layers[1].self_attn.k_proj.s2ft_indices["default"].numel() == head_dim
    assert layers[0].mlp.down_proj.s2ft_indices["default"].numel() == 40
    assert layers[0].mlp.up_proj.s2ft_indices["default"].numel() == 8
    with pytest.raises(ValueError, match="gives 'model.layers.0.self_attn.k_proj' 3 units but it has only 2"):
        s2ft(target_modules=["k_proj"], unit_pattern={"k_proj": 3})


# ---------------------------------------------------------------- torch.compile
def test_compiled_training_step_matches_eager_and_still_checks_loaded_indices(token_batch):
    def tiny_s2ft():
        base = build_model("mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=1)
        return s2ft(base, target_modules=ALL_PROJECTIONS, num_heads=1, num_channels=8).train()

    eager, model = tiny_s2ft(), tiny_s2ft()
    torch._dynamo.reset()
    compiled = torch.compile(model)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (eager, model)]
    for _ in range(2):
        losses = []
        for step_model, optimizer in zip((eager, compiled), optimizers):
            loss = step_model(token_batch, labels=token_batch).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trained
        for (name, param), reference in zip(trained, (p for p in eager.parameters() if p.requires_grad)):
            torch.testing.assert_close(param.grad, reference.grad, atol=1e-5, rtol=1e-4, msg=name)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    # indices written behind the tuner's back (as transformers' load_adapter does) are still checked when compiled
    model.get_base_model().model.layers[0].mlp.down_proj.s2ft_indices["default"].fill_(3)
    with pytest.raises(ValueError, match="duplicates.*layers.0.mlp.down_proj"):
        compiled(token_batch)
    torch._dynamo.reset()
