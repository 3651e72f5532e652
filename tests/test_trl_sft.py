"""S²FT as TRL's `SFTTrainer(..., peft_config=S2FTConfig(...))`: train, checkpoint, resume exactly, save, reload."""

import os

import pytest
import torch
from datasets import Dataset
from helpers import reference_model
from peft import PeftModel
from safetensors.torch import load_file, save_file
from trl import SFTConfig, SFTTrainer

from s2ft_plugin import S2FTConfig, initialize_s2ft_selection
from s2ft_plugin.tiny import build_model, build_tokenizer

PAIRS = [("What is two plus three?", "Five."), ("What is the capital of France?", "Paris."),
         ("What does S2FT train?", "A few heads and channels of every block, nothing else."), ("Hi", "Hello.")]


def chat_dataset(repeat=1):
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in PAIRS]
    return Dataset.from_dict({"messages": rows * repeat})


def trainer(output_dir, dataset, selection="random", **args):
    tokenizer = build_tokenizer()
    model = build_model("llama", vocab_size=len(tokenizer))
    options = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
                   logging_strategy="no", save_strategy="no", max_length=48, seed=0, data_seed=0)
    options.update(args)
    config = S2FTConfig(task_type="CAUSAL_LM", selection=selection, head_ratio=0.25, channel_ratio=0.1)
    return SFTTrainer(model, args=SFTConfig(**options), train_dataset=dataset, processing_class=tokenizer,
                      peft_config=config)


def s2ft_tensors(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if ".s2ft_" in name}


def adam_state(optimizer):
    return [{key: value.clone() for key, value in optimizer.state[param].items()}
            for group in optimizer.param_groups for param in group["params"]]


def test_resume_restores_selection_deltas_and_optimizer_exactly(tmp_path):
    dataset = chat_dataset(repeat=4)
    args = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps", save_steps=2)
    # uninterrupted run; the weight-magnitude selection is computed before training
    full = trainer(tmp_path / "full", dataset, selection="weight", **args)
    initialize_s2ft_selection(full.model, show_progress_bar=False)
    full.train()
    assert os.path.isdir(tmp_path / "full" / "checkpoint-2")
    expected, expected_state = s2ft_tensors(full.model), adam_state(full.optimizer)

    # a fresh run holds a placeholder selection until the checkpoint's selection is loaded
    resumed = trainer(tmp_path / "resumed", dataset, selection="weight", **args)
    placeholder = s2ft_tensors(resumed.model)
    indices = [name for name in expected if ".s2ft_indices." in name]
    assert any(not torch.equal(placeholder[name], expected[name]) for name in indices)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    restored = s2ft_tensors(resumed.model)
    assert restored.keys() == expected.keys()
    for name in expected:
        assert torch.equal(restored[name], expected[name]), name
    assert any(tensor.abs().sum() > 0 for name, tensor in expected.items() if ".s2ft_delta." in name)
    restored_state = adam_state(resumed.optimizer)
    assert len(restored_state) == len(expected_state) > 0
    for got, want in zip(restored_state, expected_state):
        assert got.keys() == want.keys() and {"exp_avg", "exp_avg_sq"} <= set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # the co-permuted base weights follow the restored selection: both models compute the same function
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(resumed.model.eval()(ids).logits, full.model.eval()(ids).logits, rtol=0, atol=0)


def test_saved_adapter_reloads_and_matches_a_dense_reference(tmp_path):
    run = trainer(tmp_path / "run", chat_dataset(repeat=2), max_steps=3, per_device_train_batch_size=2,
                  learning_rate=5e-2)
    run.train()
    run.save_model(str(tmp_path / "adapter"))
    vocab = len(build_tokenizer())
    reloaded = PeftModel.from_pretrained(build_model("llama", vocab_size=vocab), str(tmp_path / "adapter"))
    assert reloaded.peft_config["default"].peft_type == "S2FT"
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = run.model.eval()(ids).logits
        base = build_model("llama", vocab_size=vocab)(ids).logits
        torch.testing.assert_close(reloaded.eval()(ids).logits, trained, rtol=1e-5, atol=1e-5)
        dense = reference_model("llama", [str(tmp_path / "adapter")], vocab_size=vocab)(ids).logits
        torch.testing.assert_close(trained, dense, rtol=1e-4, atol=1e-5)
    assert (trained - base).abs().max() > 1e-3  # training changed the model


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """One SGD step from zero deltas (lr 1, no clipping) leaves delta = -gradient: 2 x 2 accumulated = 1 x 4."""
    sgd = dict(max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
               weight_decay=0.0)
    full = trainer(tmp_path / "full", chat_dataset(), per_device_train_batch_size=4, **sgd)
    full.train()
    accumulated = trainer(tmp_path / "accumulated", chat_dataset(), per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, **sgd)
    accumulated.train()
    expected, got = s2ft_tensors(full.model), s2ft_tensors(accumulated.model)
    for name in expected:
        if ".s2ft_delta." in name:
            assert expected[name].abs().max() > 1e-5, name
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(got[name], expected[name])


def _duplicate_indices(tensors):
    key = next(key for key in tensors if key.endswith("down_proj.s2ft_indices"))
    tensors[key][1] = tensors[key][0]


def _infinite_delta(tensors):
    key = next(key for key in tensors if key.endswith("o_proj.s2ft_delta"))
    tensors[key][0, 0] = float("inf")


@pytest.mark.parametrize("damage,message", [(_duplicate_indices, "duplicates"), (_infinite_delta, "NaN or infinite")])
def test_refused_resume_leaves_the_trainers_adapter_in_place(damage, message, tmp_path):
    dataset = chat_dataset(repeat=2)
    args = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps", save_steps=2)
    trainer(tmp_path / "first", dataset, **args).train()
    checkpoint = tmp_path / "first" / "checkpoint-2"
    tensors = load_file(checkpoint / "adapter_model.safetensors")
    damage(tensors)
    save_file(tensors, checkpoint / "adapter_model.safetensors")

    resumed = trainer(tmp_path / "resumed", dataset, **args)
    before = s2ft_tensors(resumed.model)
    with pytest.raises(ValueError, match=message):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert s2ft_tensors(resumed.model).keys() == before.keys()
    resumed.train()  # trains what get_peft_model made
    after = s2ft_tensors(resumed.model)
    assert any(not torch.equal(after[name], before[name]) for name in before if ".s2ft_delta." in name)
    resumed.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(before) > 0
