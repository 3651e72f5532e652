import pytest
import torch

import s2ft_plugin  # noqa: F401  registers the PEFT type


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 384, (2, 12), generator=generator)

