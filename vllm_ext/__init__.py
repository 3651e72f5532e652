"""Serve S²FT adapters with vLLM's LoRA API (vLLM 0.32.x).

- ``vllm_ext.plugin:register``: the ``vllm.general_plugins`` entry point (S²FT folders load like LoRA folders).
- ``vllm_ext.layers``: vLLM's LoRA layers with S²FT buffers of their own; ``vllm_ext.sparse``: how a batch of S²FT
  slots is applied (punica kernels on GPUs, CUDA-graph safe; grouped GEMMs on CPU).
- ``vllm_ext.capacity``: how those buffers are sized (from the adapters a server starts with, or ``VLLM_S2FT_MAX_K``).
- ``vllm_ext.moe``: S²FT on fused MoE experts in vLLM's CPU engine (beside vLLM's CPU experts kernel);
  ``vllm_ext.experts``: what an adapter holds for them and the checks PEFT makes on them.
- ``vllm_ext.convert``: export to an exact PEFT LoRA folder, ``python -m vllm_ext.convert SRC DST``.

Nothing is imported here, so ``python -m vllm_ext.convert`` and vLLM's plugin loader import only what they use.
"""
