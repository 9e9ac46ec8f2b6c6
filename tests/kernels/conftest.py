import pytest

import anact.kernels as K


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile (seconds per kernel)")


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = K.get_backend()
    yield
    K.set_backend(previous)
