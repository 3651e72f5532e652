"""The GPU formulation of vllm_ext on CPU: vLLM's Triton LoRA kernels under Triton's interpreter
(tests/punica_interpreted.py)."""

import os
import subprocess
import sys


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

