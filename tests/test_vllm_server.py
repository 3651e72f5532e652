"""vLLM's OpenAI server on 127.0.0.1 serving S2FT adapters by model name (--lora-modules and runtime loading); bad
adapters are refused without taking the engine down."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from vllm_support import (KV_CACHE_BYTES, MAX_LORA_RANK, assert_matches, build_checkpoints, complete, openai_server,
                          prompt_ids, reference, request)

MAX_K = 512  # VLLM_S2FT_MAX_K of the server: the "down600" adapter selects more


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_server")
    base_dir, adapters = build_checkpoints(root, ["inputs", "outputs", "both", "down600"])
    arguments = ["--model", base_dir, "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8",
                 "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
                 "--enable-lora", "--max-loras", "2", "--max-lora-rank", str(MAX_LORA_RANK),
                 "--lora-modules", f"math={adapters['inputs']}", f"qa={adapters['outputs']}"]
    # HOME: requests may name adapters as ~/<folder> under root
    env = dict(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_S2FT_MAX_K=str(MAX_K), HOME=str(root))
    with openai_server(arguments, root / "server.log", env) as url:
        yield url, root, base_dir, adapters


def test_lists_and_serves_adapters_by_model_name(server):
    url, root, base_dir, adapters = server
    status, models = request(f"{url}/v1/models")
    assert status == 200
    assert {"math", "qa", base_dir} <= {model["id"] for model in models["data"]}
    assert_matches(complete(url, "math"), reference(base_dir, adapters["inputs"]))
    assert_matches(complete(url, "qa"), reference(base_dir, adapters["outputs"]))
    assert_matches(complete(url, base_dir), reference(base_dir))
    assert "Unknown vLLM environment variable detected: VLLM_S2FT_MAX_K" not in (root / "server.log").read_text()


def test_runtime_load_refuses_a_malformed_folder_and_keeps_serving(server):
    url, root, base_dir, adapters = server
    bad = root / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "S2FT"}))
    status, body = request(f"{url}/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
    assert status == 400 and "adapter_model.safetensors is missing" in body["error"]["message"], (status, body)

    status, body = request(f"{url}/v1/load_lora_adapter", {"lora_name": "both", "lora_path": adapters["both"]})
    assert status == 200, body
    assert_matches(complete(url, "both"), reference(base_dir, adapters["both"]))
    assert_matches(complete(url, "math"), reference(base_dir, adapters["inputs"]))


def _replace_folder(target, source, edit=None):
    """Put a copy of ``source`` (its tensors changed by ``edit``) where ``target`` was."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    if edit is not None:
        tensors = load_file(target / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, target / "adapter_model.safetensors")


def _deeper_model(tensors):
    for key in [k for k in tensors if ".layers.1." in k]:
        tensors[key.replace(".layers.1.", ".layers.5.")] = tensors.pop(key)


def _nan_delta(tensors):
    key = next(k for k in tensors if k.endswith("down_proj.s2ft_delta"))
    tensors[key] = tensors[key] * float("nan")


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(server):
    url, root, base_dir, adapters = server
    want = {name: reference(base_dir, adapters[name]) for name in ("inputs", "outputs", "both")}
    # an adapter named ~/swap loads, then leaves the worker's cache (2 slots) while its folder goes bad: the request
    # is refused before it is queued, not by a worker in the middle of a batch
    _replace_folder(root / "swap", adapters["both"])
    status, body = request(f"{url}/v1/load_lora_adapter", {"lora_name": "home", "lora_path": "~/swap"})
    assert status == 200, body
    assert_matches(complete(url, "home"), want["both"])
    for edit, message in ((_deeper_model, "is incomplete"), (_nan_delta, "NaN")):
        assert_matches(complete(url, "math"), want["inputs"])
        assert_matches(complete(url, "qa"), want["outputs"])
        _replace_folder(root / "swap", adapters["both"], edit)
        status, body = request(f"{url}/v1/completions", {"model": "home", "prompt": prompt_ids()[0], "max_tokens": 2})
        assert 400 <= status < 500 and message in json.dumps(body), (status, body)
        assert_matches(complete(url, "math"), want["inputs"])
        assert_matches(complete(url, base_dir), reference(base_dir))


def _truncated(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.fixture(scope="module")
def unfit(server):
    """name -> (an S2FT folder the server cannot serve, what its refusal says)."""
    _, root, _, adapters = server
    _, other = build_checkpoints(root / "other", ["inputs"], hidden_size=256)  # trained on a wider model
    _, deeper = build_checkpoints(root / "deeper", ["both"], num_hidden_layers=4)  # on a 4-layer model (serving 2)
    folders = {}
    for name, edit in (("nan", _nan_delta), ("unknown_tensor", lambda t: t.update({"base_model.model.lm_head.weight":
                                                                                    t[next(iter(t))].clone()}))):
        _replace_folder(root / name, adapters["inputs"], edit)
    _replace_folder(root / "truncated", adapters["inputs"])
    _truncated(root / "truncated")
    return {
        "other_model": (other["inputs"], "or on another model"),
        "deeper_model": (deeper["both"], "holds 'model.layers.2."),
        "k_over_buffers": (adapters["down600"], "selects 600 columns but the engine's S2FT buffers hold k <= 512 for "
                                                "down_proj; restart it with VLLM_S2FT_MAX_K="),
        "nan": (str(root / "nan"), "has a delta holding NaN or infinite values"),
        "truncated": (str(root / "truncated"), "adapter_model.safetensors is not a readable safetensors file"),
        "unknown_tensor": (str(root / "unknown_tensor"), "unexpected tensor 'base_model.model.lm_head.weight'"),
    }


@pytest.mark.parametrize("case", ["other_model", "deeper_model", "k_over_buffers", "nan", "truncated",
                                  "unknown_tensor"])
def test_runtime_load_of_an_unfit_s2ft_adapter_is_a_client_error(server, unfit, case):
    url, root, base_dir, adapters = server
    path, message = unfit[case]
    status, body = request(f"{url}/v1/load_lora_adapter", {"lora_name": case, "lora_path": path})
    assert status == 400 and body["error"]["type"] == "BadRequestError", (status, body)
    assert message in body["error"]["message"], body
    assert "add_lora method failed" not in (root / "server.log").read_text()  # refused before any worker saw it
    assert case not in {model["id"] for model in request(f"{url}/v1/models")[1]["data"]}
    assert_matches(complete(url, "math"), reference(base_dir, adapters["inputs"]))
