import pytest
import torch

import s2ft_plugin  # noqa: F401  registers the PEFT type
from s2ft_plugin.tiny import build_model


@pytest.fixture
def tiny_model():
    """Builds a fresh tiny causal LM of the given family each call (identical weights for identical arguments)."""
    return build_model


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 384, (2, 12), generator=generator)
