"""More adapters than slots and than vLLM's CPU cache on one server, and S2FT buffers sized from the adapters the
server starts with: vLLM's OpenAI server on 127.0.0.1, started with q/k/v/gate/up S2FT adapters in --lora-modules and
no VLLM_S2FT_MAX_K, against the HF model with each adapter merged by PEFT."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from vllm_support import (
    ALL,
    KV_CACHE_BYTES,
    MAX_LORA_RANK,
    assert_matches,
    build_checkpoints,
    complete,
    openai_server,
    prompt_ids,
    reference,
    request,
)

MAX_LORAS, MAX_CPU_LORAS = 2, 3
# given at start-up: every output-side projection (q/k/v: one head of 32 rows, gate/up: 102 and 700 channels), none
# of which the default buffers (o_proj and down_proj only) hold
STARTUP = {"qa": "outputs", "wide-ffn": "gate_up700"}
# loaded at run time: the default targets (o_proj/down_proj, within the default 512) and every projection within what
# the start-up adapters sized
LATER = {
    "inputs2": dict(seed=21),
    "outputs2": dict(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], num_heads=1,
                     channel_ratio=0.1, seed=22),
    "both2": dict(target_modules=ALL, num_heads=2, num_channels=16, permute=False, seed=23),
}
STREAM_ADAPTERS = [*STARTUP, "inputs", "both", "down8", *LATER, None]  # None: the base model
ROUNDS, CONCURRENCY = 3, 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_many_adapters")
    names = [*STARTUP.values(), "inputs", "both", "down8", "attention", "lora8", *LATER]
    base_dir, adapters = build_checkpoints(root, names, s2ft_adapters=LATER)
    arguments = ["--model", base_dir, "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8",
                 "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
                 "--enable-lora", "--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(MAX_CPU_LORAS),
                 "--max-lora-rank", str(MAX_LORA_RANK),
                 "--lora-modules", *(f"{name}={adapters[folder]}" for name, folder in STARTUP.items())]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("VLLM_S2FT_MAX_K", raising=False)  # the server inherits this environment
        with openai_server(arguments, root / "server.log", dict(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")) as url:
            yield url, root, base_dir, adapters


def test_sizes_from_the_startup_adapters_round_up_and_keep_the_default(served):
    from vllm_ext.capacity import sized_from_adapters

    _, root, _, adapters = served
    # q/k/v: 32 rows -> 64; gate/up: 700 channels -> 704; o/down: the default 512 for adapters loaded later;
    # LoRA folders and folders that are missing or unreadable size nothing
    sized = sized_from_adapters([adapters["outputs"], adapters["gate_up700"], adapters["lora8"], str(root / "none")])
    assert sized == "q_proj=64,k_proj=64,v_proj=64,gate_proj=704,up_proj=704,o_proj=512,down_proj=512"
    assert sized_from_adapters([adapters["lora8"]]) is None


def test_startup_adapters_on_every_output_projection_are_served_without_the_setting(served):
    url, _, base_dir, adapters = served
    for name, folder in STARTUP.items():
        assert_matches(complete(url, name), reference(base_dir, adapters[folder]))


def test_an_adapter_over_the_sized_buffers_is_refused_naming_the_setting(served):
    url, _, base_dir, adapters = served
    body = {"lora_name": "wide-q", "lora_path": adapters["attention"]}
    status, body = request(f"{url}/v1/load_lora_adapter", body)
    assert status == 400, body
    message = body["error"]["message"]
    assert ("selects 128 rows but the engine's S2FT buffers hold k <= 64 for q_proj; restart it with VLLM_S2FT_MAX_K="
            "'q_proj=128,k_proj=64,v_proj=64,gate_proj=704,up_proj=704,o_proj=512,down_proj=512' (or more)") in message
    assert "sized from the S2FT adapters given at start-up (--lora-modules)" in message
    assert_matches(complete(url, "qa"), reference(base_dir, adapters["outputs"]))


def test_a_stream_over_more_adapters_than_slots_and_cache_is_exact(served):
    url, _, base_dir, adapters = served
    folders = {**{name: adapters[folder] for name, folder in STARTUP.items()},
               **{name: adapters[name] for name in ["inputs", "both", "down8", *LATER]}}
    for name in STREAM_ADAPTERS[len(STARTUP):]:
        if name is not None:
            status, body = request(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": folders[name]})
            assert status == 200, body
    references = {name: reference(base_dir, folders[name] if name else None) for name in STREAM_ADAPTERS}
    # each adapter comes back after every other one: with more adapters than the CPU cache holds (and than the
    # requests in flight), LRU evicts it in between, so it is read from disk again
    assert len(STREAM_ADAPTERS) - 1 > MAX_CPU_LORAS + CONCURRENCY
    stream = [(STREAM_ADAPTERS[i % len(STREAM_ADAPTERS)], i % len(prompt_ids()))
              for i in range(ROUNDS * len(STREAM_ADAPTERS))]

    def ask(request):
        name, prompt = request
        return complete(url, name or base_dir, [prompt_ids()[prompt]])[0]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        got = list(pool.map(ask, stream))
    assert_matches(got, [references[name][prompt] for name, prompt in stream])
