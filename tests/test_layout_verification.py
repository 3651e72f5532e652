"""Co-permutation is verified: a block whose heads are coupled in code (where no tensor shows it) or through per-head
modules is left in place (``permute=None``) or refused (``permute=True``), and the model computes what it did."""

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

import s2ft_plugin
from s2ft_plugin import S2FTConfig, S2FTLayer
from s2ft_plugin.tiny import build_model

IDS = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))
HEADS_ONLY = dict(task_type="CAUSAL_LM", num_heads=1, target_modules=["q_proj", "o_proj"])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def pretrained_like(model, seed=0):
    """Norm weights that differ from head to head, as after pretraining (a fresh model's are all ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "lambda" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def tiny(model_type, **overrides):
    settings = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=384, max_position_embeddings=256, pad_token_id=0)
    settings.update(overrides)
    torch.manual_seed(0)
    return pretrained_like(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval())


class RolledHeadsAttention(LlamaAttention):
    """Llama attention that mixes each head's output with its neighbour's before o_proj: a coupling of heads that
    lives in code only (the weights have exactly Llama's shapes)."""

    def forward(self, hidden_states, *args, **kwargs):
        original = self.o_proj.forward

        def o_proj(x):  # x: (batch, tokens, heads * head_dim)
            heads = x.unflatten(-1, (-1, self.head_dim))
            return original((heads + 0.5 * heads.roll(1, dims=-2)).flatten(-2))

        self.o_proj.forward = o_proj
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            del self.o_proj.forward


def rolled_heads_llama():
    model = build_model("llama")
    for layer in model.model.layers:
        layer.self_attn.__class__ = RolledHeadsAttention
    return model


HIDDEN_COUPLINGS = {
    "diffllama": lambda: tiny("diffllama", num_attention_heads=8, num_key_value_heads=2),
    "rolled_heads": rolled_heads_llama,
}


def moved(model):
    return model.base_model.s2ft_layout.orders


@pytest.mark.parametrize("family", sorted(HIDDEN_COUPLINGS))
def test_hidden_head_coupling_is_found_and_the_block_left_in_place(family):
    build = HIDDEN_COUPLINGS[family]
    expected = logits(build())
    # the selection would move heads (a plain Llama-shaped check passes every shape rule)
    for seed in range(20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = get_peft_model(build(), S2FTConfig(**HEADS_ONLY, seed=seed))
        units = model.base_model.adapter_units("default")
        if any(not torch.equal(block_units, torch.arange(len(block_units))) for block_units in units.values()):
            break
    messages = [str(w.message) for w in caught if "original layout" in str(w.message)]
    assert len(messages) == 1 and "'model.layers.0.self_attn'" in messages[0] and "does not see" in messages[0]
    assert not moved(model)
    assert set(model.base_model.s2ft_layout.refused) == {f"model.layers.{i}.self_attn:heads" for i in range(2)}
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    # the left-in-place block still trains, exactly as the merged model computes
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, S2FTLayer):
                module.s2ft_delta["default"].normal_(0, 0.05)
    adapted = logits(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(HIDDEN_COUPLINGS))
def test_permute_true_refuses_a_hidden_coupling_and_leaves_the_model_as_it_was(family):
    model = HIDDEN_COUPLINGS[family]()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot honour permute=True: 'model\.layers\.\d\.self_attn': co-permuting"):
        get_peft_model(model, S2FTConfig(**{**HEADS_ONLY, "num_heads": 2}, seed=1, permute=True))
    assert not any(isinstance(module, S2FTLayer) for module in model.modules())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[key], value) for key, value in before.items())


def test_stablelm_per_head_norms_block_co_permutation():
    """Row 1 of issue 15: StableLM's q/k LayerNorms are one module per head (a ModuleList)."""
    build = lambda: tiny("stablelm", qk_layernorm=True, num_key_value_heads=2)  # noqa: E731
    expected = logits(build())
    model = get_peft_model(build(), S2FTConfig(**{**HEADS_ONLY, "num_heads": 2}, seed=1))
    assert not moved(model)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"q_layernorm\.norms', one module per head"):
        get_peft_model(build(), S2FTConfig(**{**HEADS_ONLY, "num_heads": 2}, seed=1, permute=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_accepts_what_only_reorders_float_sums(dtype):
    """No false refusal: blocks that co-permute correctly pass in float32 and bfloat16 (and do move)."""
    base = build_model("qwen3").to(dtype)  # q/k norms shared by the heads, grouped key/value heads
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = get_peft_model(base, S2FTConfig(task_type="CAUSAL_LM", num_heads=1, num_channels=24, seed=1,
                                                target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                                                permute=True))
    assert len(moved(model)) == 4 and not model.base_model.s2ft_layout.refused


def test_layouts_made_after_creation_are_verified(tmp_path):
    """Calibration and hotswap re-lay out the blocks: both verify, and a loaded adapter stays exact."""
    build = HIDDEN_COUPLINGS["rolled_heads"]
    config = S2FTConfig(**{**HEADS_ONLY, "num_heads": 2}, selection="weight", init_weights=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model = get_peft_model(build(), config)
        s2ft_plugin.initialize_s2ft_selection(model, show_progress_bar=False)
    assert not moved(model) and model.base_model.s2ft_layout.refused
    adapted = logits(model)
    model.save_pretrained(tmp_path / "a")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(build(), tmp_path / "a")
        torch.testing.assert_close(logits(loaded), adapted, rtol=1e-5, atol=1e-5)
        other = get_peft_model(build(), S2FTConfig(**{**HEADS_ONLY, "num_heads": 2}, seed=7, init_weights=False))
        other.save_pretrained(tmp_path / "b")
        s2ft_plugin.hotswap_adapter(loaded, str(tmp_path / "b"))
    assert not moved(loaded)
    torch.testing.assert_close(logits(loaded), logits(other), rtol=1e-5, atol=1e-5)
