"""S²FT on the fused experts of MoE models (Mixtral, Qwen3-MoE, Llama 4) against independent references: the base
model, the adapter written into a dense copy of the expert weights, full fine-tuning gradients, a reload."""

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import s2ft_plugin
from s2ft_plugin import S2FTConfig, S2FTLayer, initialize_s2ft_selection
from s2ft_plugin.moe import Experts, experts_layout
from s2ft_plugin.tiny import build_model

SIZE = dict(hidden_size=64, intermediate_size=96, head_dim=16)
EXPERTS = {"mixtral": "mlp.experts", "qwen3_moe": "mlp.experts", "llama4_text": "feed_forward.experts",
           "gpt_oss": "mlp.experts"}
TRANSPOSED = ("llama4_text", "gpt_oss")  # gate_up (E, H, 2I), down (E, I, H)
PARTS = {"s2ft_down_delta": "down", "s2ft_gate_delta": "gate", "s2ft_up_delta": "up"}


def build(arch, **kwargs):
    model = build_model(arch, **{**SIZE, **kwargs})
    if arch == "gpt_oss":  # non-zero expert biases (zero at init), so the gate/up bias path counts
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("_proj_bias"):
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture
def ids():
    return torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))


def experts_paths(model):
    return [f"model.layers.{i}.{EXPERTS[model.config.model_type]}" for i in range(model.config.num_hidden_layers)]


def saved_experts(adapter_dir):
    """{experts path: {"indices"/"down"/"gate"/"up": tensor}} read straight from the saved file."""
    found = {}
    for key, value in load_file(f"{adapter_dir}/adapter_model.safetensors").items():
        path, name = key.removeprefix("base_model.model.").rsplit(".", 1)
        if name == "s2ft_indices" or name in PARTS:
            found.setdefault(path, {})[PARTS.get(name, "indices")] = value
    return found


def expert_weights(model, path, grad=False):
    """gate_up (E, 2I, H) and down (E, H, I) views of the experts' weights (or gradients)."""
    experts = model.get_submodule(path)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    gate_up, down = (gate_up.grad, down.grad) if grad else (gate_up.data, down.data)
    if model.config.model_type in TRANSPOSED:
        return gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


def gate_up_rows(model, channel, channels):
    """Rows of a channel's gate and up parts: [gate; up] halves, or alternating (GPT-OSS)."""
    if model.config.model_type == "gpt_oss":
        return 2 * channel, 2 * channel + 1
    return channel, channels + channel


def write_dense(model, adapter, requires_grad=False):
    """Add every expert's deltas into its weights channel by channel: down_proj column c, gate and up rows of c."""
    for path, tensors in adapter.items():
        gate_up, down = expert_weights(model, path)
        for e, chosen in enumerate(tensors["indices"]):
            for j, c in enumerate(chosen.tolist()):
                gate, up = gate_up_rows(model, c, down.shape[2])
                if "down" in tensors:
                    down[e][:, c] += tensors["down"][e][:, j]
                if "gate" in tensors:
                    gate_up[e][gate] += tensors["gate"][e][j]
                if "up" in tensors:
                    gate_up[e][up] += tensors["up"][e][j]
        experts = model.get_submodule(path)
        experts.gate_up_proj.requires_grad_(requires_grad)
        experts.down_proj.requires_grad_(requires_grad)
    return model


def masked_gradients(model, adapter):
    """Full fine-tuning gradients of the expert weights restricted to each adapter's channels, shaped like deltas."""
    grads = {}
    for path, tensors in adapter.items():
        gate_up, down = expert_weights(model, path, grad=True)
        indices = tensors["indices"]
        gate, up = gate_up_rows(model, indices, down.shape[2])
        grads[path] = {
            "down": torch.stack([down[e][:, indices[e]] for e in range(len(indices))]),
            "gate": torch.stack([gate_up[e][gate[e]] for e in range(len(indices))]),
            "up": torch.stack([gate_up[e][up[e]] for e in range(len(indices))]),
        }
    return grads


def train(model, ids, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "llama4_text"])
def test_default_config_trains_heads_and_expert_channels(arch, ids):
    base = build(arch)
    reference = base(ids).logits
    model = get_peft_model(build(arch), S2FTConfig(task_type="CAUSAL_LM"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.endswith("o_proj.s2ft_delta.default") for name in trainable)
    assert any(name.endswith("experts.s2ft_down_delta.default") for name in trainable)
    assert all(".s2ft_" in name for name in trainable)  # router and base expert weights frozen
    torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-5)  # o_proj heads are co-permuted
    layer = model.base_model.model.get_submodule(experts_paths(base)[0])
    assert isinstance(layer, Experts)
    assert layer.s2ft_indices["default"].shape == (4, round(0.05 * 96))  # channel_ratio of every expert's channels


def test_unmerge_after_loading_into_merged_experts_restores_the_base(ids):
    """Expert deltas and channels written into a merged adapter (a loader) must not change what unmerging subtracts."""
    base_logits = build("mixtral")(ids).logits
    options = dict(task_type="CAUSAL_LM", target_modules=["down_proj", "gate_up_proj"], channel_ratio=0.1,
                   init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(build("mixtral"), S2FTConfig(**options, seed=0))
    other = get_peft_model(build("mixtral"), S2FTConfig(**options, seed=5))
    model.merge_adapter()
    set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    model.unmerge_adapter()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_train_save_reload_merge_unload(arch, ids, tmp_path):
    base = build(arch)
    base_logits = base(ids).logits
    config = S2FTConfig(task_type="CAUSAL_LM", target_modules=["down_proj", "gate_up_proj"], channel_ratio=0.1,
                        permute=False)
    model = get_peft_model(build(arch), config)
    assert torch.equal(model(ids).logits, base_logits)  # zero deltas change nothing, bit for bit
    train(model, ids)
    trained = model(ids).logits
    assert (trained - base_logits).abs().max() > 1e-2
    model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(build(arch), tmp_path)
    assert torch.equal(reloaded(ids).logits, trained)
    dense = write_dense(build(arch), saved_experts(tmp_path))  # indices in original coordinates, per expert
    torch.testing.assert_close(dense(ids).logits, trained, rtol=1e-4, atol=1e-4)

    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, trained, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, Experts) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-4, atol=1e-4)

    unloaded = reloaded.unload()
    for name, tensor in base.state_dict().items():
        assert torch.equal(unloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "arch,targets",
    [
        ("mixtral", ["down_proj"]),
        ("mixtral", ["up_proj"]),
        ("mixtral", ["down_proj", "gate_up_proj"]),
        ("qwen3_moe", ["down_proj", "gate_proj", "up_proj"]),
        ("llama4_text", ["experts.down_proj", "experts.gate_up_proj"]),
        ("gpt_oss", ["down_proj", "gate_up_proj"]),
    ],
)
def test_gradients_equal_dense_masked_reference(arch, targets, ids, tmp_path):
    """Delta gradients = full fine-tuning gradients of the expert weights on the selected channels (original
    coordinates), and the gradient reaching the inputs (through the experts and the frozen router) is the dense one."""
    torch.manual_seed(0)
    config = S2FTConfig(task_type="CAUSAL_LM", target_modules=targets, channel_ratio=0.1, init_weights=False)
    model = get_peft_model(build(arch), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.05)  # deltas of the weights' scale
    model.save_pretrained(tmp_path)
    adapter = saved_experts(tmp_path)
    reference = write_dense(build(arch), adapter, requires_grad=True)

    outputs = {}
    for name, net in (("s2ft", model), ("dense", reference)):
        net.train()
        embeds = net.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = net(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        outputs[name] = (loss, embeds.grad)
    torch.testing.assert_close(outputs["s2ft"][0], outputs["dense"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["s2ft"][1], outputs["dense"][1], rtol=1e-4, atol=1e-7)

    wanted = masked_gradients(reference, adapter)
    tuner = model.base_model.model
    checked = 0
    for path in experts_paths(tuner):
        layer = tuner.get_submodule(path)
        for attr, part in PARTS.items():
            if "default" in getattr(layer, attr):
                got = getattr(layer, attr)["default"].grad
                torch.testing.assert_close(got, wanted[path][part], rtol=1e-4, atol=1e-7)
                checked += 1
    parts = {part for tensors in adapter.values() for part in tensors if part != "indices"}
    assert checked == len(experts_paths(tuner)) * len(parts) > 0


@pytest.mark.parametrize("targets", [["down_proj"], ["down_proj", "gate_up_proj"]])
def test_backward_keeps_only_the_selected_channels(targets):
    """Partial backprop: over the frozen model, S2FT on the experts keeps the selected channels' pre-activations
    (2k per routed token, twice when gate/up rows train, which also keep the experts' input) and each pair's routing,
    never a (tokens x I) activation."""
    ids = torch.randint(3, 384, (4, 64), generator=torch.Generator().manual_seed(1))

    def saved_bytes(model):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        return sum(saved.values())

    floor = build("mixtral").requires_grad_(False)
    model = get_peft_model(build("mixtral"), S2FTConfig(task_type="CAUSAL_LM", target_modules=targets, num_channels=4))
    extra = saved_bytes(model) - saved_bytes(floor)
    tokens, layers, hidden, channels, k = ids.numel(), 2, 64, 96, 4
    pairs, copies = 2 * tokens, len(targets)
    # pre-activations (2k fp32 per copy), and per pair its row, its place in the routing sort and its weight
    limit = layers * (pairs * (copies * 2 * k * 4 + 8 + 8 + 4) + (copies - 1) * tokens * hidden * 4)
    assert 0 < extra <= limit
    if copies == 1:
        assert extra < layers * pairs * channels * 4 / 4  # a quarter of one full intermediate activation


def test_several_active_adapters(ids):
    base_model = build("mixtral")
    config = S2FTConfig(task_type="CAUSAL_LM", target_modules=["down_proj"], channel_ratio=0.1, init_weights=False)
    model = get_peft_model(base_model, config)
    model.add_adapter("other", S2FTConfig(task_type="CAUSAL_LM", target_modules=["down_proj"], channel_ratio=0.1,
                                          init_weights=False, seed=7))
    model.base_model.set_adapter(["default", "other"])
    both = model(ids).logits
    model.merge_adapter(["default", "other"])  # down_proj deltas add up exactly, as in a linear layer
    torch.testing.assert_close(model(ids).logits, both, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()

    model.add_adapter("rows", S2FTConfig(task_type="CAUSAL_LM", target_modules=["gate_up_proj"], channel_ratio=0.1))
    model.base_model.set_adapter(["default", "rows"])
    with pytest.raises(ValueError, match="gate/up rows"):
        model(ids)


def test_load_refuses_broken_expert_tensors(ids, tmp_path):
    model = get_peft_model(build("mixtral"), S2FTConfig(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.mlp.experts.s2ft_indices"
    broken = dict(tensors)
    broken[key] = tensors[key].clone()
    broken[key][2, 1] = broken[key][2, 0]
    save_file(broken, file)
    fresh = build("mixtral")
    with pytest.raises(ValueError, match=r"repeat a channel.*layers\.1\.mlp\.experts"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, Experts) for m in fresh.modules())  # the caller's model is left as it was

    extra = dict(tensors)
    extra["base_model.model.model.layers.7.mlp.experts.s2ft_down_delta"] = tensors[key.replace("indices", "down_delta")].clone()
    save_file(extra, file)
    with pytest.raises(ValueError, match="no place"):
        PeftModel.from_pretrained(build("mixtral"), tmp_path)

    nan = dict(tensors)
    nan[key.replace("indices", "down_delta")] = torch.full_like(tensors[key.replace("indices", "down_delta")], float("nan"))
    save_file(nan, file)
    with pytest.raises(ValueError, match="NaN"):
        PeftModel.from_pretrained(build("mixtral"), tmp_path)


def routed_activations(model, batches):
    """{experts path: (E, I) sums of |h|, of h² and of |dL/dW_down| per column}, from an eager per-expert
    re-computation."""
    act, square, grad = {}, {}, {}
    for path in experts_paths(model):
        experts = model.get_submodule(path)
        act[path] = torch.zeros(experts.down_proj.shape[0], experts.down_proj.shape[2], dtype=torch.float64)
        square[path] = torch.zeros_like(act[path])

        def hook(module, args, path=path):
            hidden, index, weights = args
            for e in range(module.down_proj.shape[0]):
                tokens = (index == e).any(-1)
                gate, up = (hidden[tokens] @ module.gate_up_proj[e].t()).chunk(2, dim=-1)
                h = (module.act_fn(gate) * up).double().detach()
                act[path][e] += h.abs().sum(0)
                square[path][e] += h.square().sum(0)

        experts.register_forward_pre_hook(hook)
        experts.down_proj.requires_grad_(True)
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
        for path in experts_paths(model):
            down = model.get_submodule(path).down_proj
            grad[path] = grad.get(path, 0) + down.grad.abs().sum(1).double()
            down.grad = None
    return act, square, grad


@pytest.mark.parametrize("selection", ["weight", "activation", "weight_activation", "gradient"])
def test_score_based_selection_per_expert(selection):
    batches = [torch.randint(3, 384, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reference = build("mixtral")
    act, square, grad = routed_activations(reference, batches)
    model = get_peft_model(build("mixtral"), S2FTConfig(task_type="CAUSAL_LM", selection=selection, num_channels=6))
    with pytest.raises(RuntimeError, match="initialize_s2ft_selection"):
        model.train()
        model(input_ids=batches[0], labels=batches[0])
    initialize_s2ft_selection(model, [{"input_ids": b} for b in batches], show_progress_bar=False)
    for path in experts_paths(reference):
        weight = reference.get_submodule(path).down_proj.detach().abs().sum(1)  # |W| per channel (column)
        scores = {"weight": weight, "activation": act[path], "weight_activation": weight * square[path].sqrt(),
                  "gradient": grad[path]}[selection]
        chosen = model.base_model.model.get_submodule(path).s2ft_indices["default"]
        want = torch.sort(torch.topk(scores.float(), 6, dim=1).indices, dim=1).values
        assert torch.equal(chosen, want), path


@pytest.mark.parametrize("selection", ["activation", "weight_activation"])
def test_padding_does_not_score_experts(selection):
    """A right-padded batch selects the channels that its sequences, each run alone and unpadded, select."""
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 384, (length,), generator=generator) for length in (16, 6)]
    reference = build("mixtral")
    act, square, _ = routed_activations(reference, [sequence[None] for sequence in sequences])
    padded = torch.zeros(2, 16, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    model = get_peft_model(build("mixtral"), S2FTConfig(task_type="CAUSAL_LM", selection=selection, num_channels=6))
    initialize_s2ft_selection(model, [{"input_ids": padded, "attention_mask": mask}], show_progress_bar=False)
    for path in experts_paths(reference):
        weight = reference.get_submodule(path).down_proj.detach().abs().sum(1)
        scores = act[path] if selection == "activation" else weight * square[path].sqrt()
        want = torch.sort(torch.topk(scores.float(), 6, dim=1).indices, dim=1).values
        assert torch.equal(model.base_model.model.get_submodule(path).s2ft_indices["default"], want), path


def test_unsupported_experts_are_refused_by_name():
    class NonGated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = torch.nn.Parameter(torch.zeros(4, 16, 8))
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 16))

    with pytest.raises(ValueError, match=r"'layers\.0\.experts' \(NonGated\).*gate_up_proj"):
        experts_layout(NonGated(), "layers.0.experts")
    quantized = build("mixtral").model.layers[0].mlp.experts
    quantized.gate_up_proj.data = quantized.gate_up_proj.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="quantized"):
        experts_layout(quantized, "model.layers.0.mlp.experts")
    model = build("mixtral")
    with pytest.raises(ValueError, match="channels per block but the model has only 96"):
        get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", num_channels=97))
    with pytest.raises(ValueError, match=r"parts of the experts 'model\.layers\.0\.mlp\.experts'.*down_proj"):
        get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", target_modules=["o_proj", "experts"]))
    assert not any(isinstance(m, S2FTLayer) for m in model.modules())


def test_expert_targets_match_like_module_names():
    def adapted(**config):
        model = get_peft_model(build("qwen3_moe"), S2FTConfig(task_type="CAUSAL_LM", **config))
        layers = {path: m for path, m in model.base_model.model.named_modules() if isinstance(m, Experts)}
        return {path.split(".")[2]: m.parts("default") for path, m in layers.items()}

    assert adapted(target_modules=["up_proj"]) == {"0": ("up_proj",), "1": ("up_proj",)}
    assert adapted(target_modules=r".*\.1\.mlp\.experts\.(down|gate)_proj") == {"1": ("down_proj", "gate_proj")}
    assert adapted(target_modules=["o_proj", "down_proj"], exclude_modules=["model.layers.0.mlp.experts"]) == {
        "1": ("down_proj",)
    }


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_hotswap_of_an_adapter_on_the_experts_alone(arch, ids, tmp_path):
    """Issue 15 row 3: no StopIteration, the swapped adapter equals its merged reference, and a merged one is refused."""
    folders, expected = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = S2FTConfig(task_type="CAUSAL_LM", target_modules=["down_proj"], init_weights=False, seed=seed)
        get_peft_model(build(arch), config).save_pretrained(tmp_path / str(seed))
        folders.append(str(tmp_path / str(seed)))
        with torch.no_grad():
            expected.append(PeftModel.from_pretrained(build(arch), folders[-1]).merge_and_unload()(ids).logits)
    with torch.no_grad():
        base = build(arch)(ids).logits
    model = PeftModel.from_pretrained(build(arch), folders[0])
    assert not any(isinstance(module, S2FTLayer) and not isinstance(module, Experts) for module in model.modules())
    s2ft_plugin.hotswap_adapter(model, folders[1])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected[1], rtol=1e-4, atol=1e-5)
    model.merge_adapter()
    for device in (None, "cpu"):
        with pytest.raises(ValueError, match="while it is merged"):
            s2ft_plugin.hotswap_adapter(model, folders[0], torch_device=device)
    model.unmerge_adapter()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base, rtol=1e-4, atol=1e-5)


def test_mixed_batches_on_moe_models(ids):
    """Issue 15 row 4: rows of adapters that leave the experts alone mix exactly; an adapter on the experts is refused
    by name, before anything runs."""
    model = get_peft_model(build("mixtral"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False))  # o_proj + experts
    model.add_adapter("attention", S2FTConfig(task_type="CAUSAL_LM", target_modules=["o_proj"], init_weights=False,
                                              seed=3))
    model.eval()
    with pytest.raises(ValueError, match=r"\['default'\] adapt MoE experts"):
        model(ids, adapter_names=["default", "attention"])
    with torch.no_grad():
        mixed = model(ids, adapter_names=["attention", "__base__"]).logits
        model.base_model.set_adapter("attention")
        alone = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    assert (alone[0] - base[0]).abs().max() > 1e-3  # the adapter changes its row
