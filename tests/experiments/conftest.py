"""Shared fixtures: small IDX data sets written by the tests themselves."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file, independently of the loader."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28×28 images: class k lights a 6×6 block at a class-specific place."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        r, c = 3 + 7 * (k // 4), 3 + 7 * (k % 4)
        x[i, r : r + 6, c : c + 6] = 200
    return x, y


def write_dataset(
    root: Path, n_train: int = 512, n_test: int = 256, gz: bool = False
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tx, ty = make_images(n_train, 0)
    vx, vy = make_images(n_test, 1)
    write_idx(root / "train-images-idx3-ubyte", tx, gz=gz)
    write_idx(root / "train-labels-idx1-ubyte", ty, gz=gz)
    write_idx(root / "t10k-images-idx3-ubyte", vx, gz=gz)
    write_idx(root / "t10k-labels-idx1-ubyte", vy, gz=gz)
    return root


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a tiny learnable MNIST-like data set (raw IDX files)."""
    return write_dataset(tmp_path_factory.mktemp("fake-mnist"))
