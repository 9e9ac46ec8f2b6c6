import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # the machine is shared; these tests are small
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
