"""IDX files (the MNIST / Fashion-MNIST format) read into tensors, never downloaded.

The IDX format: a 4-byte magic ``0x00 0x00 <dtype> <ndim>``, ``ndim`` big-endian
uint32 sizes, then the values in C order. Files may be gzip-compressed (``.gz``).

A data directory holds the four files of the official split (gz or raw)::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

(``train-images.idx3-ubyte`` with a dot is accepted too). Fashion-MNIST comes from
the Debian package ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``.
The validation set of every study here is the official test split (``t10k``).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS", "DataError", "ImageData", "find_idx_file", "load_image_dataset", "read_idx",
    "read_idx_dataset",
]  # fmt: skip

# IDX type code -> numpy big-endian dtype
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: per data set: its default folder, the hint when that folder is used, and the hint
#: when a folder was given (``data_dir``)
DATASETS: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "dir": "/usr/share/datasets/fashion-mnist",
        "hint": "install the Debian package dataset-fashion-mnist "
        "(sudo apt-get install dataset-fashion-mnist) or pass --data-dir",
        "hint_dir": "point --data-dir at the folder of the four IDX files, or leave it out "
        "to read /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)",
    },
    "mnist": {
        "dir": "/usr/share/datasets/mnist",
        "hint": "MNIST is not packaged: download the four IDX files yourself and pass --data-dir",
        "hint_dir": "point --data-dir at the folder of MNIST's four IDX files",
    },
}


class DataError(RuntimeError):
    """Missing or malformed data; the message says what is expected and how to get it."""


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read one IDX file (raw or ``.gz``) into a tensor of its stored shape.

    Returns uint8 for unsigned-byte files (images, labels), otherwise the stored
    dtype in native byte order. Raises :class:`DataError` on a bad magic number,
    an unknown type code, or a file shorter or longer than its header says.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'} "
            "(expected 0000 <type 08..0e> <ndim>)"
        )
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, header alone needs {header}")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes but its header (shape {shape}, {dtype.name}) "
            f"needs {expected}: the file is truncated or corrupt"
        )
    arr = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def find_idx_file(data_dir: str | os.PathLike[str], split: str, kind: str) -> Path:
    """The file for ``split`` in {"train", "t10k"} and ``kind`` in {"images", "labels"}."""
    data_dir = Path(data_dir)
    nd = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            p = data_dir / f"{split}-{kind}{sep}idx{nd}-ubyte{ext}"
            if p.is_file():
                return p
    raise DataError(f"missing {split}-{kind}-idx{nd}-ubyte[.gz] in {data_dir}")


@dataclass
class ImageData:
    """A classification data set as tensors on one device.

    ``train_x``/``val_x``: float32 (N, 1, H, W), standardised with the training
    mean and std; ``train_y``/``val_y``: int64 (N,). ``val`` is the official test split.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int


def read_idx_dataset(
    name: str = "fashion-mnist", data_dir: str | os.PathLike[str] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The raw uint8 tensors (train images (N, H, W), train labels (N,), test images,
    test labels) of MNIST or Fashion-MNIST from the four IDX files in ``data_dir``
    (default per data set), with a clear error for a missing or malformed file."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    hint = info["hint_dir"] if data_dir else info["hint"]
    data_dir = Path(data_dir or info["dir"])
    layout = (
        "expected train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
        "and t10k-labels-idx1-ubyte (each raw or .gz)"
    )
    if not data_dir.is_dir():
        raise DataError(f"{name}: data directory {data_dir} does not exist; {hint} ({layout})")
    try:
        parts = [
            read_idx(find_idx_file(data_dir, split, kind))
            for split in ("train", "t10k")
            for kind in ("images", "labels")
        ]
    except DataError as e:
        raise DataError(f"{name} in {data_dir}: {e}; {layout}; {hint}") from e
    tx, ty, vx, vy = parts
    for x, y, split in ((tx, ty, "train"), (vx, vy, "t10k")):
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{name} in {data_dir}: {split} images {tuple(x.shape)} and labels "
                f"{tuple(y.shape)} do not match (expected (N, H, W) and (N,))"
            )
    return tx, ty, vx, vy


def load_image_dataset(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    train_subset: int | None = None,
) -> ImageData:
    """Load MNIST or Fashion-MNIST from IDX files onto ``device``.

    Args:
        name: ``"fashion-mnist"`` (default) or ``"mnist"``.
        data_dir: the directory of the four IDX files; default per data set
            (``/usr/share/datasets/fashion-mnist`` from ``dataset-fashion-mnist``).
        train_subset: keep the first N training examples (a fixed, seed-independent
            subset); the validation set (official test split) is always complete.
    """
    tx, ty, vx, vy = read_idx_dataset(name, data_dir)
    if train_subset is not None:
        if not 0 < train_subset:
            raise ValueError(f"train_subset must be a positive count, got {train_subset}")
        tx, ty = tx[:train_subset], ty[:train_subset]
    tx = tx.to(device=device, dtype=torch.float32).div_(255).unsqueeze(1)
    vx = vx.to(device=device, dtype=torch.float32).div_(255).unsqueeze(1)
    mean, std = tx.mean(), tx.std().clamp_min(1e-6)
    num_classes = int(max(ty.max(), vy.max())) + 1
    return ImageData(
        name=name,
        train_x=(tx - mean) / std,
        train_y=ty.to(device=device, dtype=torch.long),
        val_x=(vx - mean) / std,
        val_y=vy.to(device=device, dtype=torch.long),
        num_classes=num_classes,
    )
