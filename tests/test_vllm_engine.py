"""Offline vLLM (``LLM``) serving S2FT adapters through the plugin, against the HF model with each adapter merged."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm_support import ADAPTERS, MAX_LORA_RANK, MAX_TOKENS, build_checkpoints, prompt_ids, reference

from vllm_ext.convert import convert_s2ft_to_lora

MAX_LORAS = 3  # every slot is taken in the mixed batches below: vLLM's own CPU path then misroutes base requests


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One in-process engine for the module, the adapters it serves and their references."""
    from vllm import LLM

    root = tmp_path_factory.mktemp("vllm_engine")
    base_dir, adapters = build_checkpoints(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = LLM(model=base_dir, dtype="float32", max_model_len=128, max_num_seqs=16, max_num_batched_tokens=256,
                  kv_cache_memory_bytes=1 << 28,
                  enable_lora=True, max_loras=MAX_LORAS, max_lora_rank=MAX_LORA_RANK, seed=0)
    references = {name: reference(base_dir, path) for name, path in adapters.items()}
    references[None] = reference(base_dir)
    yield llm, root, base_dir, adapters, references
    llm.llm_engine.engine_core.shutdown()
    del llm


def generate(llm, requests):
    """Greedy outputs of prompt ``i % len(PROMPTS)`` for each LoRARequest (or None) in ``requests``."""
    from vllm import SamplingParams, TokensPrompt

    ids = prompt_ids()
    prompts = [TokensPrompt(prompt_token_ids=ids[i % len(ids)]) for i in range(len(requests))]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
    outputs = llm.generate(prompts, params, lora_request=list(requests), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob)
            for o in outputs]


_IDS: dict = {}


def lora_request(name, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, _IDS.setdefault(name, len(_IDS) + 1), path)


def assert_matches(got, want):
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    torch.testing.assert_close(torch.tensor([lp for _, lp in got]), torch.tensor([lp for _, lp in want]),
                               rtol=0, atol=1e-4)


def test_adapters_change_the_base_model(served):
    *_, references = served
    for name in ADAPTERS:
        assert references[name] != references[None], f"adapter {name} leaves greedy outputs unchanged"


@pytest.mark.parametrize("name", [None, *ADAPTERS])
def test_each_adapter_matches_merged_model(served, name):
    llm, _, _, adapters, references = served
    request = lora_request(name, adapters[name]) if name else None
    assert_matches(generate(llm, [request] * len(references[None])), references[name])


def test_mixed_batch_gives_each_request_its_own_result(served):
    llm, _, _, adapters, references = served
    names = ["inputs", None, "outputs", "both", None, "inputs", "both", None, "outputs", None, None, None]
    got = generate(llm, [lora_request(n, adapters[n]) if n else None for n in names])
    want = [references[n][i % len(references[None])] for i, n in enumerate(names)]
    assert_matches(got, want)


def test_s2ft_slots_use_the_gather_path(served):
    llm, _, _, adapters, _ = served
    generate(llm, [lora_request("both", adapters["both"])])

    def inspect(model):
        layers = {type(m).__name__ for m in model.modules() if hasattr(m, "s2ft_slots")}
        lora_model = model.lora_manager.get_adapter(_IDS["both"])
        pairs = set()
        for weights in lora_model.loras.values():
            packed = isinstance(weights.lora_a, list)
            for a, b in zip(*((weights.lora_a, weights.lora_b) if packed else ([weights.lora_a], [weights.lora_b]))):
                if a is not None:
                    pairs.add((a.dim(), a.is_floating_point(), b.dim(), b.is_floating_point()))
        return layers, pairs

    layers, pairs = llm.llm_engine.apply_model(inspect)[0]
    assert layers == {"S2FTRowParallelLinearWithLoRA", "S2FTMergedColumnParallelLinearWithLoRA",
                      "S2FTMergedQKVParallelLinearWithLoRA"}
    # each module holds its delta and the indices of the one-hot factor, never the dense one-hot matrix
    assert pairs == {(1, False, 2, True), (2, True, 1, False)}


def test_converted_lora_adapters_give_the_same_results(served):
    llm, root, base_dir, adapters, references = served
    converted = {n: convert_s2ft_to_lora(adapters[n], str(root / f"lora_{n}")) for n in ADAPTERS}
    names = ["outputs", None, "both", "inputs", None, None]
    got = generate(llm, [lora_request(f"lora-{n}", converted[n]) if n else None for n in names])
    assert_matches(got, [references[n][i % len(references[None])] for i, n in enumerate(names)])


def _break(root, source, name, edit):
    target = root / name
    shutil.copytree(source, target)
    tensors = load_file(target / "adapter_model.safetensors")
    config = json.loads((target / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, target / "adapter_model.safetensors")
    (target / "adapter_config.json").write_text(json.dumps(config))
    return str(target)


def _out_of_range(tensors, config):
    key = next(k for k in tensors if k.endswith("down_proj.s2ft_indices"))
    tensors[key] = tensors[key] + 10_000


def _missing_delta(tensors, config):
    del tensors[next(k for k in tensors if k.endswith("o_proj.s2ft_delta"))]


MALFORMED = [
    ("out_of_range", _out_of_range, "reach 10"),
    ("missing_delta", _missing_delta, "s2ft_delta is missing"),
]


@pytest.mark.parametrize("name,edit,message", MALFORMED)
def test_malformed_adapter_is_refused_and_engine_keeps_serving(served, name, edit, message):
    llm, root, _, adapters, references = served
    bad = lora_request(name, _break(root, adapters["inputs"], name, edit))
    with pytest.raises(ValueError, match=message):
        llm.llm_engine.add_lora(bad)
    with pytest.raises(ValueError, match=message):
        generate(llm, [bad])
    good = lora_request("inputs", adapters["inputs"])
    assert_matches(generate(llm, [good, None]), [references["inputs"][0], references[None][1]])


def test_rank_above_max_lora_rank_is_refused_with_the_rank_to_use(served, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from s2ft_plugin import S2FTConfig

    llm, _, base_dir, _, _ = served
    wide = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                          S2FTConfig(task_type="CAUSAL_LM", num_heads=3, init_weights=False))  # 96 columns of o_proj
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="--max-lora-rank 128"):
        llm.llm_engine.add_lora(lora_request("wide", str(tmp_path / "wide")))
