"""The real-model recipes (recipes/) on the tiny offline model and tiny local datasets built here: answer extraction,
evaluation of a model whose generations are known, training, the result files a comparison reads, and reloading."""

import json
import os
from fractions import Fraction

import pytest
from datasets import Dataset
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from recipes.commonsense import run as commonsense_run
from recipes.commonsense import tasks as commonsense_tasks
from recipes.generation import generate
from recipes.method_comparison import answers, compare, data
from recipes.method_comparison import run as method_run
from s2ft_plugin.tiny import build_tokenizer, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "recipes", "method_comparison", "experiments")
S2FT_EXPERIMENT = os.path.join(EXPERIMENTS, "s2ft", "llama-3.2-3B-down_proj-ch107-lr_0.001")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


class ScriptedModel:
    """Generates a fixed completion per prompt, so the evaluation's score is known in advance."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, completions: dict[str, str]):
        self.tokenizer, self.completions = tokenizer, completions

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            completion = self.tokenizer(self.completions[self.tokenizer.decode(ids[mask.bool()])])["input_ids"]
            rows.append(ids.tolist() + completion[:max_new_tokens] + [eos_token_id])
        width = max(len(row) for row in rows)
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


# ---------------------------------------------------------------------------------------------- GSM8K answers
@pytest.mark.parametrize("text, expected", [
    ("So 2 + 2 = 4.\nThe answer is: 4", Fraction(4)),
    ("$4^2 = \\boxed{16}$.The answer is: 16", Fraction(16)),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", Fraction(72)),
    ("The answer is: 1,250.", Fraction(1250)),
    ("The answer is: $18.00", Fraction(18)),
    ("The answer is: 50%", Fraction(50)),
    ("The answer is -3", Fraction(-3)),
    ("The answer is: 20/14", Fraction(10, 7)),
    ("The final answer is 0.5", Fraction(1, 2)),
    ("The answer is: 5\n\nQuestion: what is 6? The answer is: 6", Fraction(6)),  # the last statement counts
    ("The answer is: 7\nSome rambling with 99 in it", Fraction(7)),  # only the marker's own line
    ("It is probably 42.", None),  # no marker
    ("The answer is: forty-two", None),  # no number
    ("The answer is: 3/0", None),
])
def test_answer_value_from_hand_made_solutions(text, expected):
    assert answers.answer_value(text) == expected


def test_accuracy_counts_equal_numbers_and_refuses_a_reference_without_an_answer():
    references = ["... #### 18", "... #### 3", "... #### 1000", "... #### 7"]
    predictions = ["The answer is: 18.0", "The answer is: 4", "The answer is: 1,000", "I think it is 7"]
    assert answers.accuracy(predictions, references) == 0.5
    with pytest.raises(ValueError, match="without a final answer"):
        answers.accuracy(["The answer is 1"], ["no marker here"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        answers.accuracy(["a", "b"], ["#### 1"])


def test_gsm8k_generation_scores_a_model_whose_completions_are_known():
    """Left padding over batches of unequal prompts, new tokens only (a prompt quoting its answer does not count)."""
    tokenizer = build_tokenizer()
    template = "Question: {query} Think step by step.\nAnswer:"
    questions = ["What is 2 plus 3?", "Tom has 4 apples and eats 1. How many are left?",
                 "A quiz says 'The answer is: 12'. What is 5 times 2?", "What is 10 minus 4?", "What is 7?"]
    references = ["#### 5", "#### 3", "#### 12", "#### 6", "#### 7"]
    completions = [" 2 + 3 = 5. The answer is: 5", " 4 - 1 = 3.\nThe answer is: 3", " I do not know.",
                   " The answer is: 7", " The answer is: 7"]
    prompts = data.tokenize_prompts(Dataset.from_dict({"query": questions}), tokenizer, template, 256)
    model = ScriptedModel(tokenizer, {template.format(query=q): c for q, c in zip(questions, completions)})
    generated = generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=64)
    assert generated == completions
    assert answers.accuracy(generated, references) == 3 / 5  # the third quotes 12 in its prompt only
    # max_length caps prompt + completion: the longest prompt of a batch leaves room for 3 new tokens
    longest = max(len(p) for p in prompts[:2])
    cut = generate(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=64, max_length=longest + 3)
    assert cut == [tokenizer.decode(tokenizer(c)["input_ids"][:3]) for c in completions[:2]]


# ------------------------------------------------------------------------------------- experiment folders
def test_lora_baseline_config_has_the_published_runs_parameter_count():
    """Our LoRA r=32 folder on a Llama-3.2-3B-shaped model (meta device, no weights) trains what PEFT published."""
    with open(os.path.join(ROOT, "recipes", "method_comparison", "published_results.json")) as handle:
        published = json.load(handle)["results"]["lora/llama-3.2-3B-rank32"]
    shapes = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shapes)
    model = get_peft_model(model, PeftConfig.from_pretrained(os.path.join(EXPERIMENTS, "lora", "llama-3.2-3B-rank32")))
    assert model.get_nb_trainable_parameters() == (published["num_trainable_params"], published["num_total_params"])
    # the parameter-matched S2FT folder: 107 down_proj columns of 3072 in each of 28 layers, within 0.5% of LoRA's
    s2ft = PeftConfig.from_pretrained(S2FT_EXPERIMENT)
    assert abs(s2ft.num_channels * 3072 * 28 / published["num_trainable_params"] - 1) < 0.005


def test_experiment_folders_are_validated(tmp_path):
    with pytest.raises(ValueError, match="experiments/<method>/<name>"):
        method_run.Experiment.load(str(tmp_path), {})
    with pytest.raises(ValueError, match=r"Unknown training parameters \['max_step'\]"):
        method_run.Experiment.load(S2FT_EXPERIMENT, {"max_step": 3})
    with pytest.raises(ValueError, match="eval_steps=10"):
        method_run.Experiment.load(S2FT_EXPERIMENT, {"max_steps": 5, "eval_steps": 10})
    experiment = method_run.Experiment.load(S2FT_EXPERIMENT, {})
    assert experiment.name == "s2ft/llama-3.2-3B-down_proj-ch107-lr_0.001"
    assert experiment.train_config.optimizer_kwargs == {"lr": 1e-3, "weight_decay": 0.0}  # the folder's own
    assert experiment.train_config.max_steps == 5000 and experiment.peft_config.num_channels == 107  # the defaults'


# ---------------------------------------------------------------------------- the method comparison, end to end
@pytest.fixture(scope="module")
def method_comparison(tmp_path_factory):
    """The S2FT experiment folder, trained for 12 steps on a tiny Llama and tiny local MetaMathQA/GSM8K files."""
    root = tmp_path_factory.mktemp("method_comparison")
    model_path = save_checkpoint(str(root / "tiny"))
    facts = [(a, b) for a in range(1, 5) for b in range(1, 5)]
    files = {
        "metamath": write_jsonl(root / "metamath.jsonl", [
            {"query": f"What is {a} plus {b}?", "response": f" {a} + {b} = {a + b}. The answer is: {a + b}"}
            for a, b in facts]),
        "gsm8k-train": write_jsonl(root / "gsm8k_train.jsonl", [
            {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in facts]),
        "gsm8k-test": write_jsonl(root / "gsm8k_test.jsonl", [
            {"question": f"What is {a} plus {a}?", "answer": f"#### {2 * a}"} for a in range(1, 7)]),
        "forgetting-texts": write_jsonl(root / "wiki.jsonl", [{"text": line} for line in (
            "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.")]),
    }
    argv = [S2FT_EXPERIMENT, "--model", model_path, "--results-dir", str(root / "results"), "--valid-size", "4",
            "--set", "dtype=float32", "--set", "max_steps=12", "--set", "eval_steps=4", "--set", "batch_size_eval=4",
            "--set", 'generation_kwargs={"max_new_tokens": 12, "max_length": 200}']
    for flag, path in files.items():
        argv += [f"--{flag}", path]
    experiment, sources, results_dir, _ = method_run.parse_args(argv)
    result, model = method_run.run(experiment, sources, results_dir)
    stem = os.path.join(results_dir, "s2ft--llama-3.2-3B-down_proj-ch107-lr_0.001")
    return {"result": result, "model": model, "stem": stem, "model_path": model_path}


def test_method_comparison_trains_and_writes_what_a_comparison_reads(method_comparison):
    result, stem = method_comparison["result"], method_comparison["stem"]
    with open(f"{stem}.json") as handle:
        assert json.load(handle) == json.loads(json.dumps(result))
    run_info, train_info = result["run_info"], result["train_info"]
    assert run_info["experiment_name"] == "s2ft/llama-3.2-3B-down_proj-ch107-lr_0.001"
    assert run_info["train_config"]["model_id"] == method_comparison["model_path"]
    assert run_info["peft_config"]["peft_type"] == "S2FT" and run_info["peft_config"]["num_channels"] == 107
    assert train_info["status"] == "success" and train_info["train_time"] > 0
    assert {"accelerator_memory_max", "accelerator_memory_reserved_avg", "accelerator_memory_reserved_99th"} <= set(
        train_info)  # None on CPU
    assert train_info["num_trainable_params"] == 107 * 128 * 2  # down_proj columns x hidden size x layers
    assert train_info["file_size"] == os.path.getsize(os.path.join(stem, "adapter_model.safetensors"))
    *valid, final = train_info["metrics"]
    assert [entry["step"] for entry in valid] == [4, 8, 12]
    assert valid[-1]["train loss"] < valid[0]["train loss"]  # lr 1e-3 on a few heads' worth of channels
    assert final["train samples"] == 12 * 4 and final["train total tokens"] > 0
    assert isinstance(final["forgetting"], float)
    with open(f"{stem}.predictions.jsonl") as handle:
        predictions = [json.loads(line)["prediction"] for line in handle]
    assert final["test accuracy"] == answers.accuracy(predictions, [f"#### {2 * a}" for a in range(1, 7)])
    table = compare.table([f"{stem}.json"])
    assert "| lora/llama-3.2-3B-rank32 | PEFT 5d602fd | 0.4784 |" in table
    assert f"| s2ft/llama-3.2-3B-down_proj-ch107-lr_0.001 | this run | {final['test accuracy']:.4f} |" in table


def test_method_comparison_adapter_reloads_identically(method_comparison):
    base = AutoModelForCausalLM.from_pretrained(method_comparison["model_path"])
    tokens = torch.tensor([[5, 17, 42, 99, 7, 200]])
    with torch.no_grad():
        base_logits = base(tokens).logits
        reloaded = PeftModel.from_pretrained(base, method_comparison["stem"]).eval()
        trained_logits = method_comparison["model"].eval()(tokens).logits
        assert torch.equal(reloaded(tokens).logits, trained_logits)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)  # training changed the model


# ------------------------------------------------------------------------------------------ commonsense recipe
def boolq_example(question, answer):
    return {"instruction": f"Please answer the following question with true or false, question: {question}?\n\n"
                           "Answer format: true/false", "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def piqa_example(goal, answer):
    return {"instruction": f"Please choose the correct solution to the question: {goal}\n\nSolution1: a\n\n"
                           "Solution2: b\n\nAnswer format: solution1/solution2", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


@pytest.mark.parametrize("task, generation, expected", [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "True.", "true"),
    ("piqa", "Solution2 is better than solution1", "solution2"),  # the first label named
    ("winogrande", "the correct answer is option 1", None),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("ARC-Challenge", "I cannot tell", None),
])
def test_commonsense_label_is_the_first_one_named(task, generation, expected):
    assert commonsense_tasks.extract_label(task, generation) == expected


def test_commonsense_evaluation_scores_a_model_whose_completions_are_known():
    """Exact match of the first label named in the new tokens: every BoolQ prompt names "true" before "false"."""
    tokenizer = build_tokenizer()
    examples = [boolq_example("is the sky blue", "true"), boolq_example("is fire cold", "false"),
                boolq_example("is ice hot", "false"), boolq_example("is water wet", "true"),
                boolq_example("do fish fly", "false")]
    completions = ["the correct answer is true", "the correct answer is false", "the correct answer is true",
                   "I am not sure", "False, since fish swim"]
    model = ScriptedModel(tokenizer, {commonsense_tasks.prompt(ex): c for ex, c in zip(examples, completions)})
    accuracy, predicted = commonsense_tasks.evaluate(model, tokenizer, "boolq", examples, batch_size=2,
                                                     max_new_tokens=32, num_beams=4)
    assert predicted == ["true", "false", "true", None, "false"]
    assert accuracy == 3 / 5


def test_reported_commonsense_averages_match_their_per_task_numbers():
    """The transcribed per-task accuracies average to the reported averages (a check on the transcription)."""
    with open(commonsense_run.REPORTED) as handle:
        models = json.load(handle)["models"]
    for rows in models.values():
        for row in rows.values():
            assert set(row["accuracy"]) == set(commonsense_tasks.TASK_LABELS)
            assert abs(sum(row["accuracy"].values()) / 8 - row["average"]) <= 0.05
    halves = {task: 0.5 for task in commonsense_tasks.TASK_LABELS}
    table = commonsense_run.comparison_table("meta-llama/Meta-Llama-3-8B", halves)
    assert "| this run | 50.0 |" in table and "| LoRA r=32 (DoRA repo) | 70.8 |" in table and "| 80.8 |" in table


@pytest.fixture(scope="module")
def commonsense(tmp_path_factory):
    """The Llama-3-8B YAML, on a tiny Llama and a few BoolQ/PIQA-style examples, 12 steps."""
    root = tmp_path_factory.mktemp("commonsense")
    model_path = save_checkpoint(str(root / "tiny"))
    train = [boolq_example(q, a) for q, a in (("is the sky blue", "true"), ("is fire cold", "false"))]
    train += [piqa_example(g, a) for g, a in (("open a jar", "solution1"), ("dry a towel", "solution2"))]
    tests = {"boolq": [boolq_example(q, a) for q, a in (("is ice cold", "true"), ("is the sun dark", "false"))] * 2,
             "piqa": [piqa_example(g, a) for g, a in (("cut bread", "solution1"), ("boil water", "solution2"))] * 2}
    for relative, rows in [("ft-training_set/commonsense_170k.json", train * 3)] + [
            (f"dataset/{task}/test.json", rows) for task, rows in tests.items()]:
        os.makedirs(os.path.dirname(root / relative), exist_ok=True)
        (root / relative).write_text(json.dumps(rows))
    argv = ["--config", os.path.join(ROOT, "recipes", "commonsense", "llama3_8b.yaml"), "--model_name_or_path",
            model_path, "--data_dir", str(root), "--output_dir", str(root / "run"), "--use_cpu", "--bf16", "false",
            "--dtype", "float32", "--max_steps", "12", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--logging_steps", "1", "--val_set_size", "2", "--eval_tasks", "boolq", "piqa",
            "--eval_limit", "3", "--eval_max_new_tokens", "6", "--eval_batch_size", "2", "--disable_tqdm", "true"]
    trainer, results = commonsense_run.main(argv)
    return {"trainer": trainer, "results": results, "model_path": model_path, "output_dir": str(root / "run")}


def test_commonsense_recipe_trains_the_yamls_s2ft_and_scores_each_task(commonsense):
    trainer, results, output_dir = commonsense["trainer"], commonsense["results"], commonsense["output_dir"]
    config = trainer.model.peft_config["default"]
    assert set(config.target_modules) == {"down_proj"} and config.channel_ratio == 0.03  # from the YAML
    assert (trainer.args.lr_scheduler_type, trainer.args.adam_beta2, trainer.args.weight_decay) == ("linear", 0.95, 0)
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    assert trainable == round(0.03 * 256) * 128 * 2  # channels x hidden size x layers of the tiny Llama
    losses = results["train_loss"]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    with open(os.path.join(output_dir, commonsense_run.RESULTS_NAME)) as handle:
        assert json.load(handle) == results
    assert set(results["accuracy"]) == {"boolq", "piqa"}
    for task, accuracy in results["accuracy"].items():
        with open(os.path.join(output_dir, "predictions", f"{task}.jsonl")) as handle:
            rows = [json.loads(line) for line in handle]
        assert len(rows) == 3 and accuracy == sum(row["predicted"] == row["answer"] for row in rows) / 3
    assert results["average"] == sum(results["accuracy"].values()) / 2


def test_commonsense_adapter_reloads_identically(commonsense):
    base = AutoModelForCausalLM.from_pretrained(commonsense["model_path"])
    tokens = torch.tensor([[5, 17, 42, 99, 7, 200]])
    with torch.no_grad():
        base_logits = base(tokens).logits
        reloaded = PeftModel.from_pretrained(base, commonsense["output_dir"]).eval()
        trained_logits = commonsense["trainer"].model.eval()(tokens).logits
        assert torch.equal(reloaded(tokens).logits, trained_logits)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)
