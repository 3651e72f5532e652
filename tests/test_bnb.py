"""S²FT on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, checked against dense models holding the dequantized weights.

bitsandbytes 0.50 runs 4-bit and 8-bit layers on CPU. Outputs are compared in train mode: in eval mode bitsandbytes
repacks 4-bit weights for its CPU inference kernel (bf16) and runs 8-bit layers through int8 activations, which are
separate approximations of the same weights.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from helpers import ALL_PROJECTIONS, dense_merge, saved_adapter, selected_grad  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import s2ft_plugin  # noqa: E402
from s2ft_plugin import S2FTConfig, S2FTLayer  # noqa: E402
from s2ft_plugin import bnb as s2ft_bnb  # noqa: E402
from s2ft_plugin.tiny import build_model, build_tokenizer, save_checkpoint  # noqa: E402

F = bnb.functional
VOCAB = len(build_tokenizer())
QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")


def quantized(checkpoint, kind, **options):
    config = BitsAndBytesConfig(**{**QUANTIZATIONS[kind], **options})
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=torch.float32)


def dequantize(layer):
    """The float weight a bitsandbytes layer computes with, read straight from its quantized storage."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return F.dequantize_4bit(weight.data, weight.quant_state)
    scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
    return weight.data.float() * (scales.float()[:, None] / 127)


def requantize(weight, like):
    """What bitsandbytes stores for ``weight`` when quantized the way ``like`` was, dequantized again."""
    if isinstance(like, bnb.nn.Linear4bit):
        state = like.weight.quant_state
        data, new_state = F.quantize_4bit(weight, blocksize=state.blocksize, quant_type=state.quant_type,
                                          compress_statistics=state.nested)
        return F.dequantize_4bit(data, new_state)
    codes, scales, _ = F.int8_vectorwise_quant(weight.half())
    return codes.float() * (scales.float()[:, None] / 127)


def quantized_layers(model):
    return {path: module for path, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def dense_copy(model):
    """A float model with the quantized model's dequantized weights (the other weights are the checkpoint's)."""
    dense = build_model("llama", vocab_size=VOCAB)
    with torch.no_grad():
        for path, layer in quantized_layers(model).items():
            dense.get_submodule(path.removeprefix("base_model.model.")).weight.copy_(dequantize(layer))
    return dense


def s2ft(model, seed=0, scale=1.0, **options):
    options = {**dict(target_modules=ALL_PROJECTIONS, head_ratio=0.5, channel_ratio=0.1, permute=False,
                      init_weights=False), **options}
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.mul_(scale)
    return peft_model.train()


def s2ft_layers(model):
    return {path.removeprefix("base_model.model."): module for path, module in model.named_modules()
            if isinstance(module, S2FTLayer)}


def token_ids(seed=0):
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", sorted(QUANTIZATIONS))
def test_forward_and_gradients_match_a_dequantized_dense_reference(checkpoint, kind, tmp_path):
    model = quantized(checkpoint, kind)
    reference = dense_copy(model)
    peft_model = s2ft(model)
    layer_cls = s2ft_bnb.Linear4bit if kind != "int8" else s2ft_bnb.Linear8bitLt
    layers = s2ft_layers(peft_model)
    assert len(layers) == 2 * len(ALL_PROJECTIONS) and all(type(layer) is layer_cls for layer in layers.values())
    for layer in layers.values():
        assert layer.s2ft_delta["default"].dtype == torch.float32 and layer.s2ft_delta["default"].requires_grad
        assert not layer.get_base_layer().weight.requires_grad and not layer.get_base_layer().weight.dtype.is_floating_point
    peft_model.save_pretrained(str(tmp_path))
    adapters = saved_adapter(str(tmp_path))
    dense_merge(reference, adapters, requires_grad=True)

    ids = token_ids()
    loss = peft_model(ids, labels=ids).loss
    expected = reference(ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    expected.backward()
    for path, (indices, _) in adapters.items():
        torch.testing.assert_close(layers[path].s2ft_delta["default"].grad, selected_grad(reference, path, indices),
                                   rtol=1e-4, atol=1e-6)
        assert layers[path].get_base_layer().weight.grad is None

    # the saved adapter loads back onto a freshly quantized base
    reloaded = PeftModel.from_pretrained(quantized(checkpoint, kind), str(tmp_path)).train()
    torch.testing.assert_close(logits(reloaded, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_partial_backprop_saves_only_the_selected_activations(checkpoint):
    layer = s2ft_layers(s2ft(quantized(checkpoint, "nf4")))["model.layers.0.self_attn.o_proj"]
    columns = layer.s2ft_indices["default"].numel()
    x = torch.randn(24, layer.in_features, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    activations = [tensor for tensor in saved if tensor.is_floating_point() and tensor.dim() == 2
                   and tensor.shape[0] == x.shape[0]]
    assert [tuple(tensor.shape) for tensor in activations] == [(24, columns)]
    assert columns < layer.in_features
    out.square().sum().backward()
    assert x.grad is not None and layer.s2ft_delta["default"].grad is not None


@pytest.mark.parametrize("kind", sorted(QUANTIZATIONS))
def test_merge_dequantizes_adds_and_requantizes(checkpoint, kind):
    fp32_logits = logits(build_model("llama", vocab_size=VOCAB).train(), token_ids())
    model = quantized(checkpoint, kind)
    base_logits = logits(model.train(), token_ids())
    peft_model = s2ft(model, scale=0.1)  # deltas about the size of the weights (std 0.02)
    layers = s2ft_layers(peft_model)
    before = {path: dequantize(layer.get_base_layer()) for path, layer in layers.items()}
    expected = {}
    for path, layer in layers.items():
        dim = 1 if layer.side == "input" else 0
        summed = before[path].index_add(dim, layer.s2ft_indices["default"], layer.s2ft_delta["default"].detach())
        expected[path] = requantize(summed, layer.get_base_layer())
    unmerged_logits = logits(peft_model, token_ids())

    with pytest.warns(UserWarning, match="rounding"):
        peft_model.merge_adapter()
    for path, layer in layers.items():
        assert layer.merged
        merged = dequantize(layer.get_base_layer())
        assert not torch.equal(merged, before[path])
        torch.testing.assert_close(merged, expected[path], rtol=0, atol=1e-6)
    merged_logits = logits(peft_model, token_ids())
    # requantizing the touched blocks/rows costs about one more quantization of the base, and keeps the adapter
    tolerance = 2 * (base_logits - fp32_logits).abs().max()
    merge_error = (merged_logits - unmerged_logits).abs().max()
    assert merge_error <= tolerance
    assert merge_error < 0.5 * (unmerged_logits - base_logits).abs().max()

    with pytest.warns(UserWarning, match="rounding"):
        peft_model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    assert (logits(peft_model, token_ids()) - unmerged_logits).abs().max() <= tolerance
    with peft_model.disable_adapter():
        assert (logits(peft_model, token_ids()) - base_logits).abs().max() <= tolerance

    with pytest.warns(UserWarning, match="rounding"):
        unloaded = peft_model.merge_and_unload()
    assert not any(isinstance(module, S2FTLayer) for module in unloaded.modules())
    assert len(quantized_layers(unloaded)) == len(layers)  # still a quantized model
    assert (logits(unloaded, token_ids()) - unmerged_logits).abs().max() <= tolerance


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_safe_merge_refuses_non_finite_weights_and_leaves_the_base_alone(checkpoint, kind):
    layer = s2ft_layers(s2ft(quantized(checkpoint, kind), scale=0.02))["model.layers.1.mlp.down_proj"]
    base = layer.get_base_layer()
    stored = base.weight.data.clone()
    with torch.no_grad():
        layer.s2ft_delta["default"][0, 0] = float("inf")
    with pytest.warns(UserWarning, match="rounding"), pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert not layer.merged and layer.get_base_layer() is base and torch.equal(base.weight.data, stored)


@pytest.mark.parametrize("nested", [False, True])
def test_merge_after_cpu_inference_repacking(checkpoint, nested):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel (AVX512-BF16); merging must read that layout."""
    peft_model = s2ft(quantized(checkpoint, "nf4", bnb_4bit_use_double_quant=nested), scale=0.1)
    layers = s2ft_layers(peft_model)
    standard = {path: dequantize(layer.get_base_layer()) for path, layer in layers.items()}
    peft_model.eval()
    with peft_model.disable_adapter():
        base = logits(peft_model, token_ids())
    unmerged = logits(peft_model, token_ids())
    if not all(layer.get_base_layer().weight.quant_state.packing_format_for_cpu for layer in layers.values()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the standard 4-bit layout")
    for path, layer in layers.items():  # the repacked kernel keeps absmax in bf16: a relative error of ~2**-8
        weight = layer.dequantized_weight()
        assert (weight - standard[path]).abs().max() <= 2**-7 * standard[path].abs().max()
    with pytest.warns(UserWarning, match="rounding"):
        peft_model.merge_adapter()
    merged = logits(peft_model, token_ids())
    assert (merged - unmerged).abs().max() < 0.5 * (unmerged - base).abs().max()


@pytest.mark.parametrize("nested", [False, True])
def test_saves_and_hotswaps_leave_repacked_4bit_layers_exact(checkpoint, nested, tmp_path):
    """bitsandbytes 0.50's own state_dict() undoes the CPU repacking with a faulty inverse (absmax left transposed):
    the layers then compute ~0.3 logits off. The state dicts S2FT takes (save_pretrained, hotswap) restore the
    standard layout first, for every 4-bit layer of the model."""
    peft_model = s2ft(quantized(checkpoint, "nf4", bnb_4bit_use_double_quant=nested), scale=0.1).eval()
    before = logits(peft_model, token_ids())
    if not any(getattr(module.weight.quant_state, "packing_format_for_cpu", False)
               for module in peft_model.modules() if isinstance(module, bnb.nn.Linear4bit)):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the standard 4-bit layout")
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model, token_ids()), before, rtol=0, atol=0)
    state = peft_model.state_dict()  # the standard 4-bit format, as a fresh model's state dict has it
    fresh = quantized(checkpoint, "nf4", bnb_4bit_use_double_quant=nested).state_dict()
    key = next(key for key in fresh if key.endswith("layers.0.self_attn.q_proj.weight"))
    assert state["base_model.model." + key.replace("q_proj.", "q_proj.base_layer.")].shape == fresh[key].shape
    torch.testing.assert_close(logits(peft_model, token_ids()), before, rtol=0, atol=0)
    s2ft_plugin.hotswap_adapter(peft_model, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(peft_model, token_ids()), before, rtol=0, atol=0)
    plain = quantized(checkpoint, "nf4", bnb_4bit_use_double_quant=nested).eval()  # the upstream fault, unpatched
    expected = logits(plain, token_ids())
    plain.state_dict()
    assert nested or (logits(plain, token_ids()) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(checkpoint, use_reentrant):
    grads = []
    for checkpointing in (False, True):
        peft_model = s2ft(quantized(checkpoint, "nf4"))
        if checkpointing:
            peft_model.get_base_model().gradient_checkpointing_enable({"use_reentrant": use_reentrant})
            peft_model.enable_input_require_grads()  # what TRL does for PEFT models with checkpointing
            assert peft_model.get_base_model().is_gradient_checkpointing
        ids = token_ids()
        peft_model(ids, labels=ids).loss.backward()
        grads.append({name: param.grad for name, param in peft_model.named_parameters() if param.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("targets", [["o_proj", "down_proj"], ["q_proj", "up_proj"]])
def test_bf16_autocast_trains_with_float32_deltas(checkpoint, targets):
    grads, losses = [], []
    for autocast in (False, True):
        peft_model = s2ft(quantized(checkpoint, "nf4"), target_modules=targets)
        ids = token_ids()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = peft_model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({name: param.grad for name, param in peft_model.named_parameters() if param.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)
    assert grads[1].keys() == grads[0].keys() and grads[0]
    for name, expected in grads[0].items():
        got = grads[1][name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got - expected).norm() <= 0.05 * expected.norm(), name


@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_quantized_bases_cannot_be_co_permuted(checkpoint, storage):
    options = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    model = quantized(checkpoint, "nf4", **options)
    with pytest.raises(ValueError, match="quantized weight .*permute=False"):
        get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", permute=True))
    assert not any(isinstance(module, S2FTLayer) for module in model.modules())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("permute", [None, True])
def test_adapters_trained_co_permuted_load_onto_quantized_bases(checkpoint, kind, permute, tmp_path):
    """Indices are saved in original coordinates, so co-permutation is an optimisation a quantized base skips."""
    torch.manual_seed(0)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), S2FTConfig(
        task_type="CAUSAL_LM", target_modules=ALL_PROJECTIONS, num_heads=2, num_channels=16, init_weights=False,
        permute=permute))
    assert trained.base_model.s2ft_layout.orders
    trained.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(quantized(checkpoint, kind), str(tmp_path)).train()
    assert not loaded.base_model.s2ft_layout.orders
    reference = dense_merge(dense_copy(quantized(checkpoint, kind)), saved_adapter(str(tmp_path)))
    ids = token_ids()
    torch.testing.assert_close(loaded(ids, labels=ids).loss, reference(ids, labels=ids).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_weight_selection_scores_the_dequantized_weights(checkpoint, kind):
    from s2ft_plugin import initialize_s2ft_selection

    model = quantized(checkpoint, kind)
    dense = dense_copy(model)
    peft_model = s2ft(model, selection="weight", target_modules=["o_proj", "down_proj"], num_channels=9, num_heads=1)
    initialize_s2ft_selection(peft_model, show_progress_bar=False)
    for path, layer in peft_model.get_base_model().named_modules():
        if isinstance(layer, S2FTLayer):
            scores = dense.get_submodule(path).weight.abs().sum(0).view(-1, layer.unit_size).sum(1)
            units = torch.sort(torch.topk(scores, layer.s2ft_indices["default"].numel() // layer.unit_size).indices).values
            assert torch.equal(layer.s2ft_indices["default"][:: layer.unit_size] // layer.unit_size, units), path
