"""Unit selection: counts from the config, GQA groups, contiguity, and the paper's score-based strategies."""

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

from s2ft_plugin import S2FTConfig, initialize_s2ft_selection
from s2ft_plugin.selection import random_scores, select_units
from s2ft_plugin.structure import Block
from s2ft_plugin.tiny import build_model


def heads_block(num_heads=8, group_size=2, head_dim=4):
    return Block(name="layers.0.self_attn", kind="heads", num_units=num_heads, unit_size=head_dim,
                 group_size=group_size, projections={})


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_gqa_selection_is_group_aligned_and_co_permutes_contiguously(count, group_size):
    block = heads_block(group_size=group_size)
    units = select_units(block, count, random_scores(block, seed=count))
    assert units.numel() == count and torch.equal(units, torch.sort(units).values)
    groups = units // group_size
    partial = [g for g in groups.unique() if (groups == g).sum() < group_size]
    assert len(partial) <= 1  # whole key/value groups plus at most one remainder group
    order = block.contiguous_order(units)
    assert torch.equal(torch.sort(order).values, torch.arange(block.num_units))
    # group preserving: every run of group_size positions holds one key/value group
    assert torch.equal((order.view(-1, group_size) // group_size).min(1).values, (order.view(-1, group_size) // group_size).max(1).values)
    assert torch.equal(torch.sort(order[:count]).values, units)


def test_order_large_and_small_follow_scores():
    block = heads_block(num_heads=6, group_size=1, head_dim=1)
    scores = torch.tensor([0.5, 3.0, 1.0, 4.0, 0.1, 2.0])
    assert select_units(block, 2, scores, "large").tolist() == [1, 3]
    assert select_units(block, 2, scores, "small").tolist() == [0, 4]
    grouped = heads_block(num_heads=6, group_size=2, head_dim=1)
    # group sums 3.5, 5.0, 2.1: the whole group is (2, 3); the remainder is the best head of another group (1)
    assert select_units(grouped, 3, scores, "large").tolist() == [1, 2, 3]


def test_counts_come_from_the_config():
    config = S2FTConfig(head_ratio=0.3, channel_ratio=0.01)
    assert config.unit_count("heads", 32) == 10 and config.unit_count("channels", 256) == 3
    assert S2FTConfig(num_heads=3, num_channels=7).unit_count("heads", 32) == 3
    assert S2FTConfig(channel_ratio=1e-6).unit_count("channels", 100) == 1
    with pytest.raises(ValueError, match="only 4"):
        S2FTConfig(num_heads=5).unit_count("heads", 4)


def test_random_selection_is_reproducible_from_the_seed():
    first = get_peft_model(build_model("mistral"), S2FTConfig(seed=3))
    second = get_peft_model(build_model("mistral"), S2FTConfig(seed=3))
    other = get_peft_model(build_model("mistral"), S2FTConfig(seed=4))
    indices = [
        {n: b.clone() for n, b in m.named_buffers() if "s2ft_indices" in n} for m in (first, second, other)
    ]
    assert indices[0] and all(torch.equal(indices[0][n], indices[1][n]) for n in indices[0])
    assert any(not torch.equal(indices[0][n], indices[2][n]) for n in indices[0])


def calibration_loader(batches=3):
    generator = torch.Generator().manual_seed(1)
    return DataLoader([{"input_ids": torch.randint(3, 384, (10,), generator=generator)} for _ in range(2 * batches)], batch_size=2)


def column_statistics(model, selection):
    """Independent per-column scores of each block's o_proj/down_proj on the base model."""
    stats = {}
    inputs = {}
    gradient_sums = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: inputs.setdefault(name, []).append(i[0].detach()))
        for name, module in model.named_modules() if name.endswith(("o_proj", "down_proj"))
    ]
    for batch in calibration_loader():
        ids = batch["input_ids"]
        if selection == "gradient":
            for name, module in model.named_modules():
                if name.endswith(("o_proj", "down_proj")):
                    module.weight.requires_grad_(True)
            model.zero_grad()
            model(ids, labels=ids).loss.backward()
            for name, module in model.named_modules():
                if name.endswith(("o_proj", "down_proj")):
                    gradient_sums[name] = gradient_sums.get(name, 0) + module.weight.grad.abs().sum(0)
        else:
            with torch.no_grad():
                model(ids)
    for hook in hooks:
        hook.remove()
    for name, module in model.named_modules():
        if not name.endswith(("o_proj", "down_proj")):
            continue
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
        weight = module.weight.detach()
        stats[name] = {
            "weight": weight.abs().sum(0),
            "activation": x.abs().sum(0),
            "weight_activation": weight.abs().sum(0) * x.norm(dim=0),
            "gradient": gradient_sums.get(name),
        }[selection]
    return stats


@pytest.mark.parametrize("selection", ["weight", "activation", "weight_activation", "gradient"])
@pytest.mark.parametrize("order", ["large", "small"])
def test_score_based_selection_picks_the_extreme_units(selection, order):
    head_dim, heads, channels = 32, 1, 13
    config = S2FTConfig(task_type="CAUSAL_LM", selection=selection, selection_order=order, num_heads=heads, num_channels=channels)
    model = get_peft_model(build_model("llama"), config)
    model.train()
    with pytest.raises(RuntimeError, match="initialize_s2ft_selection"):
        model(torch.ones(1, 4, dtype=torch.long))
    initialize_s2ft_selection(model, calibration_loader(), show_progress_bar=False)
    model(torch.ones(1, 4, dtype=torch.long))  # calibrated: training is allowed

    stats = column_statistics(build_model("llama"), selection)
    pick = torch.topk if order == "large" else (lambda s, k: torch.topk(-s, k))
    for name, scores in stats.items():
        layer = model.get_base_model().get_submodule(name)
        chosen = layer.s2ft_indices["default"]
        if name.endswith("o_proj"):
            expected_heads = pick(scores.view(-1, head_dim).sum(1), heads).indices
            expected = (expected_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        else:
            expected = pick(scores, channels).indices
        assert torch.equal(chosen, torch.sort(expected).values), name


def test_calibrated_selection_survives_save_and_load(tmp_path):
    """Loading rebuilds layers from the config (a placeholder selection), then re-permutes for the saved indices."""
    config = S2FTConfig(task_type="CAUSAL_LM", selection="activation", head_ratio=0.5, init_weights=False)
    model = get_peft_model(build_model("mistral"), config)
    initialize_s2ft_selection(model, calibration_loader(), show_progress_bar=False)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(2))
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(build_model("mistral"), tmp_path, is_trainable=True)
    for name, buffer in model.named_buffers():
        if "s2ft_indices" in name:
            assert torch.equal(loaded.get_buffer(name), buffer)
    for _, _, layer in loaded.base_model.s2ft_layers():
        assert layer.s2ft_start["default"] is not None  # contiguous for the loaded selection, not the placeholder
    loaded.train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_gradient_selection_does_not_score_padding():
    """The default loss leaves padding out (labels -100 where attention_mask is 0), as a data collator does."""
    ids = torch.randint(3, 384, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    model = get_peft_model(build_model("llama"), S2FTConfig(selection="gradient", num_heads=1, num_channels=13))
    initialize_s2ft_selection(model, [{"input_ids": ids, "attention_mask": mask}], show_progress_bar=False)

    reference = build_model("llama")
    reference.requires_grad_(False)
    for layer in reference.model.layers:
        layer.mlp.down_proj.weight.requires_grad_(True)
    reference(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for index, layer in enumerate(reference.model.layers):
        want = torch.sort(torch.topk(layer.mlp.down_proj.weight.grad.abs().sum(0), 13).indices).values
        chosen = model.get_base_model().model.layers[index].mlp.down_proj.s2ft_indices["default"]
        assert torch.equal(chosen, want), index
