"""Serve S²FT adapters with vLLM's LoRA API.

- ``vllm_ext.plugin:register``: the ``vllm.general_plugins`` entry point (S²FT folders load like LoRA folders).
- ``vllm_ext.convert``: exact S²FT -> PEFT LoRA conversion, ``python -m vllm_ext.convert SRC DST``.
- ``vllm_ext.layers``: the gather path vLLM's LoRA layers use for S²FT slots.

Nothing is imported here, so ``python -m vllm_ext.convert`` and vLLM's plugin loader import only what they use.
"""
