"""Offline vLLM (``LLM``) serving S2FT adapters through the plugin, against the HF model with each adapter merged."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from vllm_support import (
    LORA_ADAPTERS,
    MAX_K,
    MAX_LORA_RANK,
    S2FT_ADAPTERS,
    assert_matches,
    build_checkpoints,
    expected,
    generate,
    reference,
)

from vllm_ext.convert import convert_s2ft_to_lora

# fewer slots than adapters, so later batches overwrite slots (LoRA <-> S2FT) and reload evicted adapters from disk
MAX_LORAS = 10
# one batch: 8 S2FT adapters (k from 8 to 1024, input and output side), 2 LoRA adapters and base requests
MIXED = ["inputs", None, "down1024", "lora8", "outputs", "gate_up700", None, "both", "down600", "lora16",
         "attention", "ffn520", None, "inputs"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One in-process engine for the module, the adapters it serves and their references."""
    from vllm import LLM

    root = tmp_path_factory.mktemp("vllm_engine")
    base_dir, adapters = build_checkpoints(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setenv("VLLM_S2FT_MAX_K", str(MAX_K))  # k of the S2FT buffers, independent of max_lora_rank
        llm = LLM(model=base_dir, dtype="float32", max_model_len=128, max_num_seqs=16, max_num_batched_tokens=256,
                  kv_cache_memory_bytes=1 << 28, enable_lora=True, max_loras=MAX_LORAS,
                  max_lora_rank=MAX_LORA_RANK, seed=0)
        references = {name: reference(base_dir, path) for name, path in adapters.items()}
        references[None] = reference(base_dir)
        yield llm, root, base_dir, adapters, references
    llm.llm_engine.engine_core.shutdown()
    del llm


_IDS: dict = {}


def lora_request(name, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, _IDS.setdefault(name, len(_IDS) + 1), path)


def requests_for(adapters, names):
    return [lora_request(name, adapters[name]) if name else None for name in names]


def slot_contents(llm):
    """The adapter id in each slot of the engine (None: empty)."""
    return llm.llm_engine.apply_model(lambda model: list(model.lora_manager.lora_index_to_id))[0]


def test_adapters_change_the_base_model(served):
    *_, references = served
    for name in [*S2FT_ADAPTERS, *LORA_ADAPTERS]:
        assert references[name] != references[None], f"adapter {name} leaves the outputs unchanged"


def test_one_batch_mixes_s2ft_lora_and_base_requests(served):
    llm, _, _, adapters, references = served
    assert len({n for n in MIXED if n in S2FT_ADAPTERS}) >= 8 and len({n for n in MIXED if n in LORA_ADAPTERS}) == 2
    assert_matches(generate(llm, requests_for(adapters, MIXED)), expected(references, MIXED))


def test_slots_are_reused_after_unload_and_load(served):
    llm, _, _, adapters, references = served
    generate(llm, requests_for(adapters, MIXED), max_tokens=1)
    before = slot_contents(llm)
    # the two S2FT adapters not in MIXED evict two of its adapters; then every adapter, more than there are slots
    names = ["down8", "wide", None, "lora8", "inputs", "down8"]
    assert_matches(generate(llm, requests_for(adapters, names)), expected(references, names))
    assert slot_contents(llm) != before
    names = [*S2FT_ADAPTERS, None, *LORA_ADAPTERS]
    assert len(names) - 1 > MAX_LORAS
    assert_matches(generate(llm, requests_for(adapters, names)), expected(references, names))
    assert_matches(generate(llm, requests_for(adapters, MIXED)), expected(references, MIXED))


def test_s2ft_modules_reach_the_layers_as_indices_in_buffers_of_their_own(served):
    llm, _, _, adapters, _ = served
    generate(llm, requests_for(adapters, ["both", "down1024"]), max_tokens=1)

    def inspect(model):
        layers = {(type(m).__name__, tuple((s.projection, s.k) for s in m.s2ft_slices if s is not None))
                  for m in model.modules() if hasattr(m, "s2ft_slices")}
        pairs = set()
        for lora_id in (_IDS["both"], _IDS["down1024"]):
            for weights in model.lora_manager.get_adapter(lora_id).loras.values():
                packed = isinstance(weights.lora_a, list)
                pairs_a, pairs_b = (weights.lora_a, weights.lora_b) if packed else ([weights.lora_a], [weights.lora_b])
                for a, b in zip(pairs_a, pairs_b):
                    if a is not None:
                        pairs.add((a.dim(), a.is_floating_point(), b.dim(), b.is_floating_point()))
        lora_ranks = {m.lora_a_stacked[0].shape[2] for m in model.modules() if hasattr(m, "s2ft_slices")}
        return layers, pairs, lora_ranks

    layers, pairs, lora_ranks = llm.llm_engine.apply_model(inspect)[0]
    # k is capped by each projection's size: 4 heads x 32 rows/columns, 1024 FFN channels
    assert layers == {
        ("S2FTRowParallelLinearWithLoRA", (("o_proj", 128),)),
        ("S2FTRowParallelLinearWithLoRA", (("down_proj", 1024),)),
        ("S2FTMergedColumnParallelLinearWithLoRA", (("gate_proj", 1024), ("up_proj", 1024))),
        ("S2FTMergedQKVParallelLinearWithLoRA", (("q_proj", 128), ("k_proj", 128), ("v_proj", 128))),
    }
    # each module holds its delta and the indices of the one-hot factor, never the dense one-hot matrix
    assert pairs == {(1, False, 2, True), (2, True, 1, False)}
    assert lora_ranks == {MAX_LORA_RANK}  # LoRA's buffers keep --max-lora-rank, far below k = 1024


def test_converted_lora_adapters_give_the_same_results(served):
    llm, root, _, adapters, references = served
    names = ["down8", None]  # k = 8 <= max_lora_rank: the converter pads k to a LoRA rank
    converted = {n: convert_s2ft_to_lora(adapters[n], str(root / f"lora_{n}")) for n in names if n}
    got = generate(llm, [lora_request(f"converted-{n}", converted[n]) if n else None for n in names])
    assert_matches(got, expected(references, names))


def _break(root, source, name, edit):
    target = root / name
    shutil.copytree(source, target)
    tensors = load_file(target / "adapter_model.safetensors")
    config = json.loads((target / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, target / "adapter_model.safetensors")
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def _out_of_range(tensors, config):
    key = next(k for k in tensors if k.endswith("down_proj.s2ft_indices"))
    tensors[key] = tensors[key] + 10_000


def _missing_delta(tensors, config):
    del tensors[next(k for k in tensors if k.endswith("o_proj.s2ft_delta"))]


def _deeper_model(tensors, config):
    """Modules of a layer the served 2-layer model lacks."""
    for key in [k for k in tensors if ".layers.1." in k]:
        tensors[key.replace(".layers.1.", ".layers.5.")] = tensors.pop(key)


MALFORMED = [
    ("out_of_range", _out_of_range, r"indices must lie in \[0, 1024\)"),
    ("missing_delta", _missing_delta, "has no delta; the adapter was saved for other target modules or is incomplete"),
    ("deeper_model", _deeper_model, "has no indices; the adapter was saved for other target modules or is incomplete"),
]


@pytest.mark.parametrize("name,edit,message", MALFORMED)
def test_malformed_adapter_is_refused_and_engine_keeps_serving(served, name, edit, message, monkeypatch):
    llm, root, _, adapters, references = served
    bad = _break(root, adapters["inputs"], name, edit)
    with pytest.raises(ValueError, match=message):
        llm.llm_engine.add_lora(lora_request(name, str(bad)))
    monkeypatch.setenv("HOME", str(root))  # a request naming ~/<folder>: checked where vLLM's worker would load it
    for path in (str(bad), f"~/{name}"):
        with pytest.raises(ValueError, match=message):
            generate(llm, [lora_request(f"{name}-{path}", path)])
    names = ["inputs", None]
    assert_matches(generate(llm, requests_for(adapters, names)), expected(references, names))


def test_k_above_the_engines_s2ft_buffers_is_refused_naming_the_setting(served, tmp_path, monkeypatch):
    from vllm_ext.capacity import SETTING

    llm, _, _, adapters, references = served
    monkeypatch.setenv(SETTING, "o_proj=128,down_proj=512")  # as if the engine had started with smaller buffers
    request = lora_request("down600-small", adapters["down600"])
    message = f"selects 600 columns .* k <= 512 for down_proj; restart it with {SETTING}='o_proj=128,down_proj=600'"
    with pytest.raises(ValueError, match=message):
        llm.llm_engine.add_lora(request)
    with pytest.raises(ValueError, match=message):
        generate(llm, [request])
    monkeypatch.undo()
    names = ["down600", None]
    assert_matches(generate(llm, requests_for(adapters, names)), expected(references, names))
