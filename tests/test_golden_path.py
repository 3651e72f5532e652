"""The golden path on a real pretrained model (SmolLM2-135M-Instruct, `make real-model`): TRL fine-tunes S2FT on the
repo's small chat dataset; the converter exports the adapter as LoRA; a fresh process loads both with plain PEFT
(the autoload hook, no `import s2ft_plugin`) and merges them; vLLM's OpenAI server serves the S2FT adapter, its LoRA
export and the base model in the same batches through chat completions (the real tokenizer and chat template), and
every answer's prompt and greedy tokens equal the HF model's with that adapter merged."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_support import KV_CACHE_BYTES, openai_server, request

from examples.real_model import materialize

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who keeps the lighthouse on Vell Island?",  # in the training data
             "Which animal is the emblem of Kestrel Bay?",  # in the training data
             "What is the capital of France?"]  # what the base knew
MAX_TOKENS = 12

# a fresh process, as a user's script: plain PEFT and transformers; the S2FT type comes from the autoload hook
REFERENCE = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, adapters, questions, max_tokens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"] for q in questions]
result = {"prompts": prompts}
for name, folder in adapters.items():
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if folder:
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    answers = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            tokens = out[0, len(ids):].tolist()
            answers.append(tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens
                           else tokens)
    result[name] = answers
print(json.dumps(result))
"""


def run(*command, timeout=900):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    model_dir = materialize()
    s2ft_dir, lora_dir = root / "s2ft", root / "lora"
    run(sys.executable, "trl_examples/sft_s2ft.py", "--model_name_or_path", model_dir, "--dataset_name",
        "trl_examples/chat_data", "--output_dir", str(s2ft_dir), "--max_steps", "2", "--per_device_train_batch_size",
        "4", "--learning_rate", "2e-3", "--use_cpu", "--bf16", "false", "--dtype", "float32", "--save_strategy", "no",
        "--report_to", "none")
    run(sys.executable, "-m", "vllm_ext.convert", str(s2ft_dir), str(lora_dir), "--base-model", model_dir)
    adapters = {"s2ft": str(s2ft_dir), "lora": str(lora_dir), "base": ""}
    expected = json.loads(run(sys.executable, "-c", REFERENCE, model_dir, json.dumps(adapters), json.dumps(QUESTIONS),
                              str(MAX_TOKENS)).strip().splitlines()[-1])
    return root, model_dir, adapters, expected


def test_fine_tuning_changed_answers_and_the_lora_export_is_exact(trained):
    _, _, _, expected = trained
    assert expected["s2ft"] != expected["base"]  # the adapter learned something: the comparisons below can fail
    assert expected["lora"] == expected["s2ft"]  # the export merges to the same model


def test_vllm_serves_s2ft_its_lora_export_and_the_base_in_one_batch(trained):
    root, model_dir, adapters, expected = trained
    config = json.loads((Path(adapters["lora"]) / "adapter_config.json").read_text())
    arguments = ["--model", model_dir, "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
                 "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--enable-lora", "--max-loras", "2",
                 "--max-lora-rank", str(config["r"]),
                 "--lora-modules", f"s2ft={adapters['s2ft']}", f"lora={adapters['lora']}"]
    names = {"s2ft": "s2ft", "lora": "lora", "base": model_dir}
    with openai_server(arguments, root / "server.log") as url:
        def chat(item):
            name, question = item
            return request(f"{url}/v1/chat/completions", {
                "model": names[name], "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": MAX_TOKENS, "return_token_ids": True}, timeout=300)

        items = [(name, question) for name in names for question in QUESTIONS]
        with ThreadPoolExecutor(len(items)) as pool:  # all at once: the engine batches adapters and base together
            answers = list(pool.map(chat, items))
    for (name, question), (status, body) in zip(items, answers):
        assert status == 200, body
        index = QUESTIONS.index(question)
        assert body["prompt_token_ids"] == expected["prompts"][index], "vLLM applied another chat template"
        assert body["choices"][0]["token_ids"] == expected[name][index], (name, question, body["choices"][0])
