"""Refuses at engine start a LoRA engine whose dtypes vLLM's Triton LoRA kernels cannot run.

Where vLLM runs LoRA through ``PunicaWrapperGPU`` (CUDA, ROCm, XPU with ``XPU_USE_TRITON_KERNEL=1``), its kernels
(``lora_shrink``, ``lora_expand``) take float16 or bfloat16 activations and LoRA weights of one dtype, and S²FT slots
run on the same kernels (``vllm_ext.sparse``). vLLM 0.32 does not check this when it builds the engine: a float32
model fails with an AssertionError inside a kernel, while capturing CUDA graphs at start-up or, with
``--enforce-eager``, at the first adapter request, which stops the engine. The plugin makes the check where vLLM
resolves the LoRA dtype (``LoRAConfig.verify_with_model_config``, when the engine's config is built, before any
worker starts), for every LoRA engine: vLLM's own LoRA adapters fail there alike. The CPU platform runs LoRA with
torch ops and serves float32.
"""

from __future__ import annotations

import torch

TRITON_PUNICA_WRAPPER = "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def check_lora_dtypes(punica_wrapper: str, model_dtype: torch.dtype, lora_dtype: torch.dtype) -> None:
    """Refuse dtypes the platform's punica wrapper (its qualified name) cannot run, naming the option that fixes it."""
    if punica_wrapper != TRITON_PUNICA_WRAPPER:
        return
    if model_dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"vLLM's Triton LoRA kernels need float16 or bfloat16, and the model runs in {_name(model_dtype)}: "
            "start the engine with --dtype bfloat16 (or --dtype float16; LoRA and S2FT weights take the model's dtype)."
        )
    if lora_dtype != model_dtype:
        raise ValueError(
            f"vLLM's Triton LoRA kernels need the LoRA weights in the model's dtype ({_name(model_dtype)}), and "
            f"--lora-dtype is {_name(lora_dtype)}: leave --lora-dtype at auto."
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
