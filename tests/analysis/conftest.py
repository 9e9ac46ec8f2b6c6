import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # the test machine is shared; analysis tests are tiny and need no parallelism.
    # Restored after each test so that other test folders keep torch's setting.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
