"""The quality benchmark's measuring parts, checked against independent references (no training: a few seconds)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import quality  # noqa: E402
import quality_tasks as tasks  # noqa: E402

MICRO = quality.Setup(hidden=64, intermediate=256, heads=4, layers=2, facts=16, b_train=64, b_validation=16,
                      b_test=16, b_held_out=16, a_eval=16)


def symbols(tokens):
    return [token - tasks.FIRST_SYMBOL for token in tokens]


def test_b_splits_are_disjoint_and_held_out_as_described():
    splits = tasks.b_splits(train=300, validation=50, test=50, held_out=50, seed=0)
    inputs = {name: [tuple(symbols(e.prompt[2:-1])) for e in examples] for name, examples in splits.items()}
    every = [x for xs in inputs.values() for x in xs]
    assert len(every) == len(set(every))
    for name in ("train", "validation", "test"):
        assert all(max(x) < tasks.B_TRAIN_SYMBOLS and len(x) in tasks.B_TRAIN_LENGTHS for x in inputs[name])
    assert all(max(x) >= tasks.B_TRAIN_SYMBOLS and len(x) in tasks.B_TRAIN_LENGTHS for x in inputs["unseen_symbols"])
    assert all(len(x) in tasks.B_HELD_OUT_LENGTHS for x in inputs["longer"])
    for examples in splits.values():
        for example in examples:
            x = symbols(example.prompt[2:-1])
            assert symbols(example.answer[:-1]) == [(x[-1 - i] + 1) % tasks.SYMBOLS for i in range(len(x))]
            assert example.prompt[1] == tasks.REVERSE_INCREMENT and example.answer[-1] == tasks.EOS


def test_score_is_greedy_decoding_exact_match():
    """Half of the answers are what greedy generation produces, half differ in one token: exact match is 1/2."""
    model = quality.new_model(MICRO)
    model.generation_config.eos_token_id = None  # generate exactly the answer's length, as plain greedy decoding
    examples = tasks.a_evaluation_sets(tasks.fact_values(MICRO.facts, seed=0), size=4, seed=0)["reverse"]
    examples += tasks.b_splits(train=0, validation=4, test=0, held_out=0, seed=0)["validation"]
    built = []
    for index, example in enumerate(examples):
        prompt = torch.tensor([example.prompt])
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(example.answer),
                                   do_sample=False, pad_token_id=tasks.PAD)
        answer = generated[0, prompt.shape[1]:].tolist()
        assert len(answer) == len(example.answer)
        if index % 2:
            answer[-1] = (answer[-1] + 1) % model.config.vocab_size
        built.append(tasks.Example(example.prompt, answer))
    accuracy, loss = tasks.score(model, built, batch_size=3)
    assert accuracy == 0.5
    assert loss > 0


def test_every_method_gets_s2ft_default_parameter_count():
    model = quality.new_model(MICRO)
    batches = list(tasks.batches(tasks.b_splits(32, 0, 0, 0, seed=0)["train"], 16))
    counts = {}
    for method in quality.METHODS:
        adapted = quality.adapt(model, method, MICRO, seed=0, calibration=batches)
        counts[method] = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    s2ft = counts["s2ft_random"]
    assert all(counts[method] == s2ft for method in quality.S2FT_METHODS if "targets" not in quality.S2FT_METHODS[method])
    for method, fields in quality.S2FT_METHODS.items():  # the nearest whole number of channels
        assert abs(counts[method] - s2ft) / s2ft < 0.05
    assert counts["lora"] == counts["shira"]
    for method in ("lora", "lora_all_linear"):
        assert abs(counts[method] - s2ft) / s2ft < 0.25  # the nearest whole rank
    assert counts["full"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale, expected", [(1.0, 0.0), (2.0, 1.0), (0.5, 0.5)])
def test_output_change_against_scaled_weights(scale, expected):
    """A model whose projections are ``scale`` times the base's changes every output by ``|scale - 1|``."""
    base = quality.new_model(MICRO)
    tuned = quality.adapt(base, "full", MICRO, seed=0, calibration=None)
    with torch.no_grad():
        for module in tuned.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(scale)
    examples = tasks.b_splits(train=0, validation=8, test=0, held_out=0, seed=0)["validation"]
    change = quality.output_change(base, tuned, {"b": examples})
    assert change["b"] == pytest.approx(expected, abs=1e-5)


def test_output_change_of_a_fresh_adapter_is_zero():
    base = quality.new_model(MICRO)
    examples = tasks.b_splits(train=0, validation=8, test=0, held_out=0, seed=0)["validation"]
    for method in ("s2ft_random", "lora", "shira"):
        change = quality.output_change(base, quality.adapt(base, method, MICRO, seed=0, calibration=None),
                                       {"b": examples})
        assert change["b"] == 0.0
