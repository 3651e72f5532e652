"""The real-model quality benchmark's measuring parts, checked against independent references on a tiny model with a
system turn in its chat template (HF generate, whole-sequence forward passes, PEFT's own counts): a few seconds."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import common  # noqa: E402
import quality_real as qr  # noqa: E402
import quality_real_report as report  # noqa: E402
import quality_real_tasks as tasks  # noqa: E402
from s2ft_plugin.tiny import build_model, build_tokenizer  # noqa: E402

# SmolLM2's (ChatML) with this tokenizer's tokens: a default system turn first, so every prompt shares a prefix
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<s>system\nYou are a helpful assistant.{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
SETUP = qr.Setup(train_per_skill=16, validation=4, test=4, out_of_distribution=4, batch=4, steps=4, checkpoints=(2, 4),
                 calibration_batches=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    model = build_model("llama", hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)
    model.requires_grad_(False)
    sets = tasks.splits(SETUP.train_per_skill, SETUP.validation, SETUP.test, SETUP.out_of_distribution, seed=0)
    return model, tokenizer, sets, qr.Chat(tokenizer, qr.all_texts(sets))


def reference_greedy(model, chat, text, limit):
    """HF generate on one whole templated prompt, no padding, no shared prefix."""
    ids = torch.tensor([chat.prefix + chat.prompt(text)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False,
                         eos_token_id=chat.eos, pad_token_id=chat.pad)[0, ids.shape[1]:].tolist()
    return out[: out.index(chat.eos)] if chat.eos in out else out


def test_splits_are_disjoint_deterministic_and_answered_right():
    sets = tasks.splits(train=200, validation=30, test=30, out_of_distribution=30, seed=0)
    assert sets == tasks.splits(train=200, validation=30, test=30, out_of_distribution=30, seed=0)
    for skill in tasks.SKILLS:
        inputs = {name: [e.prompt.rsplit(":", 1)[-1] if skill == "rule" else e.answer for e in examples]
                  for name, examples in sets.items() if name.startswith(skill)}
        every = [x for xs in inputs.values() for x in xs]
        assert len(inputs) == 4 and len(every) == len(set(every))
    for name, examples in sets.items():
        for e in examples:
            if e.skill == "rule":
                letters = e.prompt.removeprefix("Apply the quorp rule: ").split(" ")
                assert e.answer == " ".join(letters[::-1])
                assert len(letters) in (tasks.RULE_LONGER_LENGTHS if name == "rule_longer" else tasks.RULE_LENGTHS)
            else:
                wordings = tasks.CODE_REWORDINGS if name == "code_reworded" else tasks.CODE_WORDINGS
                wording = next(w for w in wordings if e.prompt.startswith(w.split("{}")[0]))
                words = e.prompt[len(wording.split("{}")[0]): len(e.prompt) - len(wording.split("{}")[1])].split()
                assert e.answer == " ".join(tasks.CODE[word] for word in words)
                assert len(words) in tasks.CODE_LENGTHS and len(set(words)) == len(words)


def test_chat_splits_the_template_into_shared_prefix_prompt_and_answer(tiny):
    _, tokenizer, sets, chat = tiny
    example = sets["code_test"][0]
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}],
        tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(chat.prefix).startswith("<s>system\nYou are a helpful assistant.</s>\n<s>user\n")
    parts = chat.prefix + chat.prompt(example.prompt) + chat.answer(example.prompt, example.answer)
    assert whole[: len(parts)] == parts and parts[-1] == tokenizer.eos_token_id


def test_greedy_equals_generate_one_prompt_at_a_time(tiny):
    """Batched, left-padded, with the prefix shared and rows leaving at their own limits: the same tokens as HF
    generate, on the bare model and through a PEFT adapter."""
    model, _, sets, chat = tiny
    examples = sets["rule_longer"] + sets["code_reworded"] + sets["rule_test"]
    limits = [3 + index % 5 for index in range(len(examples))]
    lora = common.adapt(model, "lora", qr.s2ft_config(SETUP), seed=0)
    for _, module in lora.named_modules():  # a LoRA that changes the outputs
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    for tuned in (model, lora):
        answers = qr.greedy(tuned, chat, [chat.prompt(e.prompt) for e in examples], limits, batch_size=5)
        assert answers == [reference_greedy(tuned, chat, e.prompt, limit) for e, limit in zip(examples, limits)]


def test_exact_match_is_greedy_decoding_exact_match(tiny):
    """After memorising some examples, each example's score is whether HF generate's answer is the expected text."""
    model, _, sets, chat = tiny
    learned = sets["rule_train"][:4] + sets["code_train"][:4]
    tuned = common.adapt(model, "full", qr.s2ft_config(SETUP), seed=0)
    optimizer = torch.optim.AdamW(tuned.parameters(), 3e-3)
    pairs = [(chat.prompt(e.prompt), chat.answer(e.prompt, e.answer)) for e in learned]
    for _ in range(80):
        qr.answer_nll(tuned, chat, pairs).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.eval()
    examples = learned + sets["rule_test"] + sets["code_test"]
    scores = qr.exact_match(tuned, chat, examples)
    expected = [chat.text(reference_greedy(tuned, chat, e.prompt, 20)).strip() == e.answer for e in examples]
    assert scores == expected
    assert any(scores) and not all(scores)


@pytest.mark.parametrize("method", ["base", "s2ft_random", "lora"])
def test_answer_nll_against_whole_sequences(tiny, method):
    """Per-token NLL with a shared prefix, right padding and the head at scored positions only, against log-softmax
    of a plain forward of each whole sequence."""
    model, _, sets, chat = tiny
    tuned = model if method == "base" else common.adapt(model, method, qr.s2ft_config(SETUP), seed=0)
    for name, param in tuned.named_parameters():  # an adapter that changes the outputs
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)
    examples = sets["rule_test"] + sets["code_reworded"]
    pairs = [(chat.prompt(e.prompt), chat.answer(e.prompt, e.answer)) for e in examples]
    with torch.no_grad():
        mine = qr.answer_nll(tuned, chat, pairs)
        direct = []
        for prompt, answer in pairs:
            ids = torch.tensor([chat.prefix + prompt + answer])
            logits = tuned(input_ids=ids).logits[0].log_softmax(-1)
            start = len(chat.prefix) + len(prompt)
            direct += [-logits[start - 1 + j, token].item() for j, token in enumerate(answer)]
    torch.testing.assert_close(mine, torch.tensor(direct), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["s2ft_random", "lora", "full"])
def test_training_loss_and_gradients_equal_whole_sequences(tiny, method):
    """The shared prefix runs once and its keys/values feed every row; the loss and every gradient equal a plain
    forward of the whole right-padded sequences with labels on the answers (transformers' own loss)."""
    model, _, sets, chat = tiny
    batch = qr.training_order(sets, SETUP, seed=0)[0]
    grads = []
    for shared in (True, False):
        tuned = common.adapt(model, method, qr.s2ft_config(SETUP), seed=0)
        if shared:
            pairs = [(chat.prompt(e.prompt), chat.answer(e.prompt, e.answer)) for e in batch]
            loss = qr.answer_nll(tuned, chat, pairs).mean()
        else:
            loss = tuned(**qr.calibration_batches(chat, [batch])[0]).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in tuned.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for mine, whole in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(mine, whole, rtol=1e-4, atol=1e-6)


def test_every_method_trains_about_the_s2ft_default_count(tiny):
    model, _, sets, chat = tiny
    counts = {}
    for method in qr.METHODS:
        adapted = qr.adapt(model, method, chat, sets, SETUP, seed=0)
        counts[method] = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    s2ft = counts["s2ft_random"]
    layer, layers = model.model.layers[0], len(model.model.layers)
    heads = round(SETUP.head_ratio * model.config.num_attention_heads)
    channels = round(SETUP.channel_ratio * model.config.intermediate_size)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert s2ft == layers * model.config.hidden_size * (heads * head_dim + channels)  # o_proj heads, down_proj channels
    assert counts["s2ft_weight_activation"] == counts["s2ft_activation_small"] == s2ft
    assert counts["s2ft_down"] == round(s2ft / (model.config.hidden_size * layers)) * model.config.hidden_size * layers
    for method, names in common.LORA_TARGETS.items():  # the whole rank nearest to S2FT's count
        per_rank = layers * sum(m.in_features + m.out_features for n, m in layer.named_modules()
                                if n.rsplit(".", 1)[-1] in names)
        assert counts[method] % per_rank == 0
        assert abs(counts[method] - s2ft) <= per_rank / 2
    assert counts["full"] == sum(p.numel() for p in model.parameters())


def test_equal_accuracy_reading_interpolates_along_each_run():
    base = dict(new_test=0.0, questions_kept=1.0, drift=0.0, out_of_distribution=0.0)
    run = dict(method="m", lr=1e-3, seed=0, points=[
        dict(step=10, new_test=0.4, questions_kept=0.8, drift=0.5, out_of_distribution=0.1),
        dict(step=20, new_test=0.8, questions_kept=0.4, drift=1.5, out_of_distribution=0.3),
    ])
    assert report.at_accuracy(run, base, "questions_kept", 0.6) == pytest.approx(0.6)
    assert report.at_accuracy(run, base, "drift", 0.2) == pytest.approx(0.25)
    assert report.at_accuracy(run, base, "drift", 0.9) is None
    gentle = dict(run, lr=1e-4, points=[dict(step=10, new_test=0.6, questions_kept=0.9, drift=0.2,
                                             out_of_distribution=0.0)])
    assert report.best_at([run, gentle], base, "questions_kept", 0.6) == pytest.approx(0.9)
    assert report.best_at([run, gentle], base, "drift", 0.6) == pytest.approx(0.2)
    assert report.best_at([run, gentle], base, "out_of_distribution", 0.6) == pytest.approx(0.2)
