"""The GPU formulation of vllm_ext on CPU: vLLM's Triton LoRA kernels under Triton's interpreter
(tests/punica_interpreted.py), and the refusal of dtypes those kernels cannot run, checked as on a GPU platform."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.path.join(ROOT, "tests", "punica_interpreted.py")


def test_gpu_formulation_under_the_triton_interpreter():
    """A process of its own: TRITON_INTERPRET must be set before triton is first imported, and vLLM's LoRA kernels
    imported after vLLM is shown the real triton, while this process has imported both long ago."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", INTERPRETED], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(("model_dtype", "lora_dtype", "refusal"), [
    (torch.float32, torch.float32, "start the engine with --dtype bfloat16"),
    (torch.float16, torch.bfloat16, "leave --lora-dtype at auto"),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float16, None),
])
def test_dtypes_the_triton_kernels_cannot_run_are_refused(model_dtype, lora_dtype, refusal):
    from vllm_ext.dtypes import TRITON_PUNICA_WRAPPER, check_lora_dtypes

    check_lora_dtypes("vllm_ext.punica.S2FTPunicaWrapperCPU", model_dtype, lora_dtype)  # CPU: torch ops, any dtype
    if refusal is None:
        check_lora_dtypes(TRITON_PUNICA_WRAPPER, model_dtype, lora_dtype)
    else:
        with pytest.raises(ValueError, match=refusal):
            check_lora_dtypes(TRITON_PUNICA_WRAPPER, model_dtype, lora_dtype)


def test_engine_start_refuses_float32_where_the_triton_kernels_run(tmp_path, monkeypatch):
    """The engine's config, built as `LLM(...)` and `vllm serve` build it, on a platform whose punica wrapper is
    vLLM's Triton one; the CPU platform serves float32."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from s2ft_plugin.tiny import save_checkpoint
    from vllm_ext.dtypes import TRITON_PUNICA_WRAPPER

    model = save_checkpoint(str(tmp_path / "base"), "llama", hidden_size=128, intermediate_size=256)

    def engine_config(dtype, **options):
        args = EngineArgs(model=model, dtype=dtype, enable_lora=True, max_model_len=128, **options)
        return args.create_engine_config()

    assert engine_config("float32").lora_config.lora_dtype == torch.float32  # CPU (the plugin is now registered)
    monkeypatch.setattr(type(current_platform), "get_punica_wrapper", classmethod(lambda cls: TRITON_PUNICA_WRAPPER))
    with pytest.raises(ValueError, match="Triton LoRA kernels need float16 or bfloat16.*--dtype bfloat16"):
        engine_config("float32")
    with pytest.raises(ValueError, match="--lora-dtype"):
        engine_config("float16", lora_dtype="bfloat16")
    assert engine_config("bfloat16").lora_config.lora_dtype == torch.bfloat16
