"""Shared fixtures: small IDX data sets written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from experiments_helpers import write_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a tiny learnable MNIST-like data set (raw IDX files)."""
    return write_dataset(tmp_path_factory.mktemp("fake-mnist"))
