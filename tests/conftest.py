import pytest
import torch

import s2ft_plugin  # noqa: F401  registers the PEFT type


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 384, (2, 12), generator=generator)



@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models, which gain nothing from threads: on a busy machine a waiting thread slows each op
    10-20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
