"""The engine test's exactness checks on CUDA with CUDA graphs on: S2FT slots run on vLLM's punica (Triton) kernels
inside captured graphs, decode batches padded to a captured size (``make gpu-check``; skipped without a GPU).

vLLM's LoRA kernels take float16/bfloat16 only, so the engine runs in float16 against the float32 HF reference with the
adapter merged: first-token logprobs agree within ``ATOL``, and greedy tokens agree up to the first step where the
reference's two best tokens are closer than ``MARGIN`` (there rounding may pick either). The base model is built
with larger weights than the CPU tests' so that such near-ties are rare.
"""

import pytest
import torch
from vllm_support import (
    MAX_K,
    MAX_LORA_RANK,
    MAX_TOKENS,
    S2FT_ADAPTERS,
    build_checkpoints,
    expected,
    generate,
    reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: runs under `make gpu-check`"),
]

MAX_LORAS = 10
MIXED = ["inputs", None, "down1024", "lora8", "outputs", "gate_up700", None, "both", "down600", "lora16",
         "attention", "ffn520", None, "inputs"]  # 14 decode rows: padded to a captured batch size
ATOL = 2e-2
MARGIN = 5e-2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vllm import LLM

    root = tmp_path_factory.mktemp("vllm_cuda")
    base_dir, adapters = build_checkpoints(root, initializer_range=0.2)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setenv("VLLM_S2FT_MAX_K", str(MAX_K))
        llm = LLM(model=base_dir, dtype="float16", max_model_len=128, max_num_seqs=16, max_num_batched_tokens=256,
                  kv_cache_memory_bytes=1 << 28, enable_lora=True, max_loras=MAX_LORAS,
                  max_lora_rank=MAX_LORA_RANK, enforce_eager=False, seed=0)
        references = {name: reference(base_dir, path) for name, path in adapters.items()}
        references[None] = reference(base_dir)
        yield llm, adapters, references
    llm.llm_engine.engine_core.shutdown()
    del llm


def lora_requests(adapters, names):
    from vllm.lora.request import LoRARequest

    ids = {name: i + 1 for i, name in enumerate(adapters)}
    return [LoRARequest(name, ids[name], adapters[name]) if name else None for name in names]


def assert_close_to_reference(got, want):
    for (tokens, logprob), (want_tokens, want_logprob, gaps) in zip(got, want):
        assert abs(logprob - want_logprob) <= ATOL, (logprob, want_logprob)
        decided = next((step for step, gap in enumerate(gaps) if gap < MARGIN), len(gaps))
        assert tokens[:decided + 1] == want_tokens[:decided + 1], (tokens, want_tokens, gaps)


def test_engine_runs_s2ft_on_punica_kernels_in_cuda_graphs(served):
    llm, _, _ = served
    from vllm.config import CUDAGraphMode

    assert llm.llm_engine.vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE

    def formulations(model):
        return {s.grouped for m in model.modules() if hasattr(m, "s2ft_slices") for s in m.s2ft_slices if s}

    assert llm.llm_engine.apply_model(formulations)[0] == {False}


def test_mixed_batch_matches_merged_models(served):
    llm, adapters, references = served
    assert len({n for n in MIXED if n in S2FT_ADAPTERS}) >= 8
    assert_close_to_reference(generate(llm, lora_requests(adapters, MIXED)), expected(references, MIXED))


def test_slots_are_reused_after_unload_and_load(served):
    llm, adapters, references = served
    for names in (["down8", "wide", None, "lora8", "inputs", "down8"], [*adapters, None], MIXED):
        got = generate(llm, lora_requests(adapters, names), max_tokens=MAX_TOKENS)
        assert_close_to_reference(got, expected(references, names))
