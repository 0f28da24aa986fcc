"""Load-test fixtures. One torch thread per test: on a shared 2-core machine OpenMP threads spin
against other processes and make tiny models ~50x slower; restored after each module."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
