"""CIFAR pickles written here in the official layout; Fashion-MNIST → 32×32 adapter."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from anact.experiments.data.cifar import (
    fashion_mnist_as_cifar,
    load_cifar,
    read_cifar_split,
    to_cifar_shape,
)
from anact.experiments.data.idx import DataError


def _dump(path: Path, d: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """data_batch_1..5 + test_batch; returns the train rows and labels in file order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        _dump(folder / name, {b"batch_label": name.encode(), b"data": data, b"labels": lab})
        if name != "test_batch":
            rows.append(data)
            labels += lab
    return np.concatenate(rows), np.array(labels)


def write_cifar100(root: Path, n: int = 6) -> dict[str, dict]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name in ("train", "test"):
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"filenames": [b"x.png"] * n,
        }
        _dump(folder / name, d)
        out[name] = d
    return out


def test_cifar10_pixels_and_labels_follow_the_row_layout(tmp_path: Path) -> None:
    rows, labels = write_cifar10(tmp_path)
    x, y = read_cifar_split("cifar10", tmp_path, "train")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32×32
    i, r, c = 13, 5, 27
    for ch in range(3):
        assert int(x[i, ch, r, c]) == int(rows[i, ch * 1024 + r * 32 + c])
    assert y.tolist() == labels.tolist()
    # the parent folder and the batches folder itself are both accepted
    x2, _ = read_cifar_split("cifar10", tmp_path / "cifar-10-batches-py", "test")
    assert x2.shape == (4, 3, 32, 32)


def test_load_cifar_standardizes_per_channel_with_train_stats(tmp_path: Path) -> None:
    rows, _ = write_cifar10(tmp_path)
    d = load_cifar("cifar10", tmp_path)
    assert d.train_x.shape == (20, 3, 32, 32) and d.val_x.shape == (4, 3, 32, 32)
    assert d.num_classes == 10
    raw = torch.from_numpy(rows.reshape(-1, 3, 1024).astype(np.float64) / 255)
    mean, std = raw.mean(dim=(0, 2)), raw.std(dim=(0, 2))
    expect = (raw[3, :, 100] - mean) / std
    assert_close(d.train_x[3].reshape(3, 1024)[:, 100].double(), expect, rtol=1e-5, atol=1e-5)
    raw01 = load_cifar("cifar10", tmp_path, standardized=False, train_subset=5)
    assert raw01.train_x.shape[0] == 5
    assert_close(raw01.train_x[0].reshape(-1).double(), torch.from_numpy(rows[0] / 255.0))


def test_cifar100_fine_and_coarse_labels(tmp_path: Path) -> None:
    d = write_cifar100(tmp_path)
    _, fine = read_cifar_split("cifar100", tmp_path, "test")
    _, coarse = read_cifar_split("cifar100", tmp_path, "test", label_mode="coarse")
    assert fine.tolist() == d["test"][b"fine_labels"]
    assert coarse.tolist() == d["test"][b"coarse_labels"]
    assert load_cifar("cifar100", tmp_path).num_classes == 100
    assert load_cifar("cifar100", tmp_path, label_mode="coarse").num_classes == 20


def test_missing_and_corrupt_cifar_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py.*data_batch_1"):
        read_cifar_split("cifar10", tmp_path, "train")
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*not a CIFAR python pickle"):
        read_cifar_split("cifar10", tmp_path, "train")
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_3", {b"data": np.zeros((2, 100))})
    with pytest.raises(DataError, match="b'labels'"):
        read_cifar_split("cifar10", tmp_path, "train")
    _dump(
        tmp_path / "cifar-10-batches-py" / "data_batch_3",
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
    )
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        read_cifar_split("cifar10", tmp_path, "train")


def test_to_cifar_shape_pads_centered_and_repeats_channels() -> None:
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 28, 28) / 2000 + 0.1
    y = to_cifar_shape(x)
    assert y.shape == (2, 3, 32, 32)
    assert_close(y[:, 1, 2:30, 2:30], x)
    assert_close(y[:, 0], y[:, 2])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(y[:, :, border] == x.min())  # default pad: the background (min)
    u8 = to_cifar_shape(torch.full((1, 1, 28, 28), 255, dtype=torch.uint8), channels=1)
    assert u8.shape == (1, 1, 32, 32) and float(u8.max()) == 1.0
    r = to_cifar_shape(torch.ones(1, 28, 28), mode="resize", size=16)
    assert r.shape == (1, 3, 16, 16) and torch.allclose(r, torch.ones_like(r))
    with pytest.raises(ValueError, match="N, H, W"):
        to_cifar_shape(torch.zeros(2, 3, 28, 28))


def test_fashion_mnist_as_cifar(fake_mnist: Path) -> None:
    d = fashion_mnist_as_cifar(fake_mnist, train_subset=64)
    assert d.train_x.shape == (64, 3, 32, 32) and d.val_x.shape == (256, 3, 32, 32)
    # the pad equals the standardised background, the minimum of the padded images
    assert float(d.train_x[:, :, 0, 0].max()) == float(d.train_x.min())
    assert d.train_y.dtype == torch.int64 and d.num_classes == 10
