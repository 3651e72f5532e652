"""Every decoder family S2FT covers, built tiny from its transformers config: the default config works, and the
deltas' gradients on every projection equal full fine-tuning gradients restricted to the selected rows or columns."""

import copy

import pytest
import torch
from helpers import dense_merge, saved_adapter, selected_grad
from peft import PeftModel, get_peft_model

from s2ft_plugin import S2FTConfig, S2FTLayer
from s2ft_plugin.tiny import ARCHITECTURES, build_model

FAMILIES = sorted(ARCHITECTURES)
# every projection name of every family above (PEFT matches the ones a model has)
EVERY_PROJECTION = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
                    "down_proj", "out_proj", "fc1", "fc2", "fc_in", "fc_out", "dense", "dense_h_to_4h",
                    "dense_4h_to_h", "query_key_value", "c_attn", "c_proj", "c_fc"]


def token_ids(seed=0):
    return torch.randint(3, 384, (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_default_config(family, tmp_path):
    ids = token_ids()
    original = build_model(family)
    state = {name: tensor.clone() for name, tensor in original.state_dict().items()}
    base = logits(original, ids)
    model = get_peft_model(original, S2FTConfig(task_type="CAUSAL_LM"))
    assert any(isinstance(module, S2FTLayer) for module in model.modules())
    torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=1e-5)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    trained = logits(model, ids)
    assert (trained - base).abs().max() > 1e-4

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_model(family), tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), trained, atol=1e-5, rtol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), trained, atol=1e-4, rtol=1e-4)
    unloaded = model.unload()
    assert all(torch.equal(unloaded.state_dict()[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_on_every_projection_equal_a_dense_masked_reference(family, tmp_path):
    ids = token_ids(1)
    torch.manual_seed(0)
    model = get_peft_model(build_model(family), S2FTConfig(  # MoE experts: tests/test_moe.py
        target_modules=EVERY_PROJECTION, exclude_modules=r".*\.experts", num_heads=2, num_channels=24,
        init_weights=False, seed=5))
    model.save_pretrained(tmp_path)
    model(ids, labels=ids).loss.backward()
    adapters = saved_adapter(tmp_path)
    dense = dense_merge(build_model(family), adapters, requires_grad=True)
    dense(ids, labels=ids).loss.backward()
    layers = {path.removeprefix("base_model.model."): module for path, module in model.named_modules()
              if isinstance(module, S2FTLayer)}
    assert layers.keys() == adapters.keys() and len(layers) >= 4
    for path, (indices, _) in adapters.items():
        torch.testing.assert_close(layers[path].s2ft_delta["default"].grad, selected_grad(dense, path, indices),
                                   atol=1e-5, rtol=1e-4, msg=path)
