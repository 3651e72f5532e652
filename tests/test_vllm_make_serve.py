"""`make serve`, as a new user runs it after `make demo`: vLLM's OpenAI server on 127.0.0.1 serving the demo's tiny
Llama with its S2FT adapter answers the curl the target prints, with the greedy tokens of the HF model with the adapter
merged by PEFT."""

import ipaddress
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_support import free_port, request, server_environment, stop_group

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 400  # make runs the demo first (training ~15 s), then vLLM starts (~1 min on 2 cores)


def _healthy(port) -> bool:
    try:
        return request(f"http://127.0.0.1:{port}/health", timeout=5)[0] == 200
    except OSError:
        return False


def _listening_addresses(port) -> set[str]:
    """The IPv4 and IPv6 addresses with a socket listening on `port`, from the kernel's tables (not the server's log,
    whose wording and colours depend on the environment)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(str(ipaddress.ip_address(words)))
    return addresses


@torch.no_grad()
def _greedy(demo, prompt_ids, max_tokens, adapter=True):
    model = AutoModelForCausalLM.from_pretrained(demo / "tiny-llama", dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, demo / "s2ft-adapter").merge_and_unload()
    output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                            pad_token_id=model.config.pad_token_id)
    tokens = output[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_make_serve_answers_the_curl_it_prints(tmp_path):
    demo, port, log_path = tmp_path / "demo", free_port(), tmp_path / "serve.log"
    # the target itself; -o: never (re)install the venv from a test, PY: the interpreter running the tests
    command = ["make", "-C", str(ROOT), "-s", "-o", ".venv/.installed", "serve", f"PY={sys.executable}",
               f"DEMO={demo}", f"PORT={port}"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=server_environment())
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(port):
            tail = log_path.read_text()[-4000:]
            assert process.poll() is None, f"make serve exited with {process.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"no server after {STARTUP_TIMEOUT_S}s:\n{tail}"
            time.sleep(2)
        curl = next(line.strip() for line in log_path.read_text().splitlines() if line.strip().startswith("curl "))
        answer = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True,
                                           timeout=120).stdout)
        # the same request, asking vLLM for the token ids too
        words = shlex.split(curl)
        printed = json.loads(words[words.index("-d") + 1])
        url = next(word for word in words if word.startswith("http://127.0.0.1:"))
        status, detailed = request(url, {**printed, "return_token_ids": True})
        assert status == 200, detailed
        log = log_path.read_text()
        listening = _listening_addresses(port)
    finally:
        stop_group(process)

    tokenizer = AutoTokenizer.from_pretrained(demo / "tiny-llama")
    prompt_ids = tokenizer(printed["prompt"]).input_ids
    choice = detailed["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids
    want = _greedy(demo, prompt_ids, printed["max_tokens"])
    assert want != _greedy(demo, prompt_ids, printed["max_tokens"], adapter=False)  # the adapter changes the answer
    assert choice["token_ids"] == want
    assert answer["choices"][0]["text"] == choice["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert listening == {"127.0.0.1"}  # bound to the loopback interface only
    assert not re.search(r"DeprecationWarning|Traceback", log)
    # vLLM's notice about adapters' own tokenizers comes with any adapter: this one has no tokenizer files
    assert "different tokenizers for different LoRAs" in log
    assert not any(path.name.startswith("tokenizer") for path in (demo / "s2ft-adapter").iterdir())
