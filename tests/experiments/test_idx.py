import gzip

import numpy as np
import pytest
import torch
from experiments_helpers import make_images, write_dataset, write_idx

from anact.experiments.data import DataError, find_idx_file, load_image_dataset, read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    x, y = make_images(7, 3)
    px = write_idx(tmp_path / "train-images-idx3-ubyte", x, gz=gz)
    py = write_idx(tmp_path / "train-labels-idx1-ubyte", y, gz=gz)
    tx, ty = read_idx(px), read_idx(py)
    assert tx.dtype == torch.uint8 and tuple(tx.shape) == (7, 28, 28)
    assert torch.equal(tx, torch.from_numpy(x)) and torch.equal(ty, torch.from_numpy(y))


def test_read_idx_other_dtype(tmp_path):
    a = (np.arange(6).reshape(2, 3) - 2).astype(">i4")
    p = tmp_path / "a.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + np.array([2, 3], ">u4").tobytes() + a.tobytes())
    assert read_idx(p).tolist() == [[-2, -1, 0], [1, 2, 3]]


def test_bad_magic(tmp_path):
    x, _ = make_images(2, 0)
    p = write_idx(tmp_path / "train-images-idx3-ubyte", x)
    raw = bytearray(p.read_bytes())
    raw[0] = 0x1F
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_short_file(tmp_path, gz):
    x, _ = make_images(3, 0)
    p = write_idx(tmp_path / "train-images-idx3-ubyte", x)
    cut = p.read_bytes()[:-5]
    if gz:
        p = p.with_name(p.name + ".gz")
        p.write_bytes(gzip.compress(cut))
    else:
        p.write_bytes(cut)
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(p)


def test_find_file_variants(tmp_path):
    (tmp_path / "t10k-labels.idx1-ubyte").write_bytes(b"")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert find_idx_file(tmp_path, "t10k", "labels").name == "t10k-labels.idx1-ubyte"
    assert find_idx_file(tmp_path, "train", "images").name == "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        find_idx_file(tmp_path, "train", "labels")


@pytest.mark.parametrize("gz", [False, True])
def test_load_dataset(tmp_path, gz):
    root = write_dataset(tmp_path / "d", n_train=40, n_test=20, gz=gz)
    d = load_image_dataset("mnist", root, train_subset=30)
    x, y = make_images(40, 0)
    x = x[:30].astype(np.float64) / 255
    expected = (x - x.mean()) / x.std(ddof=1)
    assert d.train_x.shape == (30, 1, 28, 28) and d.val_x.shape == (20, 1, 28, 28)
    torch.testing.assert_close(d.train_x[:, 0].double(), torch.from_numpy(expected),
                               rtol=0, atol=1e-5)  # fmt: skip
    assert d.train_y.dtype == torch.long and d.train_y.tolist() == y[:30].tolist()
    vx, vy = make_images(20, 1)
    assert d.val_y.tolist() == vy.tolist()
    assert d.num_classes == 10


def test_missing_data_names_debian_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_image_dataset("fashion-mnist", tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_image_dataset("fashion-mnist", tmp_path / "half")


def test_mismatched_counts(tmp_path):
    root = write_dataset(tmp_path / "d", n_train=10, n_test=5)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="do not match"):
        load_image_dataset("mnist", root)


def test_unknown_dataset():
    with pytest.raises(DataError, match="fashion-mnist"):
        load_image_dataset("cifar-7")
