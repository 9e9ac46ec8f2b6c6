"""CIFAR-10 / CIFAR-100 from the official "python version" pickles, never downloaded.

Layouts (the tarballs ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` unpacked)::

    cifar-10-batches-py/   data_batch_1 … data_batch_5, test_batch
                           (dicts with b"data": uint8 (N, 3072), b"labels": list[int])
    cifar-100-python/      train, test
                           (dicts with b"data", b"fine_labels", b"coarse_labels")

``data_dir`` may be that folder itself or its parent. Each row of ``b"data"`` is the
1024 red, then green, then blue values of a 32×32 image in row-major order.

Also here: :func:`to_cifar_shape`, the adapter that lets the CIFAR networks run on
28×28 single-channel data (Fashion-MNIST from the Debian package
``dataset-fashion-mnist``, this project's default image data on machines without CIFAR),
and :func:`fashion_mnist_as_cifar` that loads it in that shape.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anact.experiments.data.idx import DataError, ImageData, load_image_dataset

__all__ = [
    "CIFAR_LAYOUTS",
    "channel_stats",
    "fashion_mnist_as_cifar",
    "find_cifar_dir",
    "load_cifar",
    "read_cifar_split",
    "standardize",
    "to_cifar_shape",
]

CIFAR_LAYOUTS: dict[str, dict[str, object]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "num_classes": 100,
    },
}

_HINT = (
    "CIFAR is not packaged for Debian or PyPI here: download cifar-10-python.tar.gz / "
    "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it "
    "and pass its folder (or the parent) as data_dir"
)


def _layout_text(name: str) -> str:
    info = CIFAR_LAYOUTS[name]
    files = ", ".join([*info["train"], *info["test"]])  # type: ignore[misc]
    return f"expected {info['folder']}/ with {files}"


def find_cifar_dir(name: str, data_dir: str | os.PathLike[str]) -> Path:
    """The folder holding the batch files of ``name`` ("cifar10" or "cifar100").

    ``data_dir`` may be the ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its
    parent. Raises :class:`DataError` naming the expected layout when neither holds it.
    """
    if name not in CIFAR_LAYOUTS:
        raise DataError(f"unknown CIFAR variant {name!r}; choose cifar10 or cifar100")
    info = CIFAR_LAYOUTS[name]
    data_dir = Path(data_dir)
    first = info["test"][0]  # type: ignore[index]
    for cand in (data_dir, data_dir / str(info["folder"])):
        if (cand / first).is_file():
            return cand
    raise DataError(f"{name}: no {first} in {data_dir}; {_layout_text(name)}; {_HINT}")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError as e:
        raise DataError(f"missing CIFAR batch file {path}") from e
    except Exception as e:  # unpickling garbage raises many types
        raise DataError(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: expected a dict with b'data' and {label_key!r}, got keys {keys}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{path}: {labels.shape[0]} labels for {data.shape[0]} images (expected equal)"
        )
    return data, labels


def read_cifar_split(
    name: str,
    data_dir: str | os.PathLike[str],
    split: Literal["train", "test"],
    *,
    label_mode: Literal["fine", "coarse"] = "fine",
) -> tuple[Tensor, Tensor]:
    """The raw images uint8 (N, 3, 32, 32) and labels int64 (N,) of one split.

    ``label_mode`` picks CIFAR-100's 100 fine or 20 coarse labels (ignored for CIFAR-10).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_cifar_dir(name, data_dir)
    if name == "cifar10":
        key = b"labels"
    elif label_mode in ("fine", "coarse"):
        key = f"{label_mode}_labels".encode()
    else:
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    parts = [_read_batch(folder / f, key) for f in CIFAR_LAYOUTS[name][split]]  # type: ignore[union-attr]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std, each (C,), of images (N, C, H, W)."""
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6)


def standardize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x − mean) / std per channel; x (N, C, H, W), mean and std (C,)."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def load_cifar(
    name: Literal["cifar10", "cifar100"] = "cifar100",
    data_dir: str | os.PathLike[str] = ".",
    *,
    device: torch.device | str = "cpu",
    train_subset: int | None = None,
    label_mode: Literal["fine", "coarse"] = "fine",
    standardized: bool = True,
) -> ImageData:
    """CIFAR-10 or CIFAR-100 as an :class:`ImageData` on ``device``.

    ``train_x``/``val_x``: float32 (N, 3, 32, 32), in [0, 1] and, when
    ``standardized`` (default), standardised per channel with the training mean and std
    (of the full training split). ``val`` is the official test split.
    ``train_subset`` keeps the first N training images (fixed, seed-independent).
    """
    tx, ty = read_cifar_split(name, data_dir, "train", label_mode=label_mode)
    vx, vy = read_cifar_split(name, data_dir, "test", label_mode=label_mode)
    tx = tx.to(device=device, dtype=torch.float32).div_(255)
    vx = vx.to(device=device, dtype=torch.float32).div_(255)
    if standardized:
        mean, std = channel_stats(tx)
        tx, vx = standardize(tx, mean, std), standardize(vx, mean, std)
    if train_subset is not None:
        if train_subset < 1:
            raise ValueError(f"train_subset must be a positive number, got {train_subset}")
        tx, ty = tx[:train_subset], ty[:train_subset]
    num_classes = (
        20
        if (name == "cifar100" and label_mode == "coarse")
        else int(
            CIFAR_LAYOUTS[name]["num_classes"]  # type: ignore[call-overload]
        )
    )
    return ImageData(
        name=name,
        train_x=tx,
        train_y=ty.to(device),
        val_x=vx,
        val_y=vy.to(device),
        num_classes=num_classes,
    )


def to_cifar_shape(
    images: Tensor,
    *,
    size: int = 32,
    channels: int = 3,
    mode: Literal["pad", "resize"] = "pad",
    pad_value: float | None = None,
) -> Tensor:
    """Bring (N, H, W) or (N, 1, H, W) images to (N, channels, size, size), float32.

    ``mode="pad"`` centres the image on a ``size``×``size`` canvas filled with
    ``pad_value`` (default: the minimum of ``images``, i.e. the background of raw or
    standardised MNIST-like data; 28 → 32 pads 2 pixels each side); ``"resize"``
    interpolates bilinearly. uint8 input is scaled to [0, 1] first. The single
    channel is repeated ``channels`` times (3 for the CIFAR networks).
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected (N, H, W) or (N, 1, H, W) images, got shape {tuple(images.shape)}"
        )
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    h, w = x.shape[-2:]
    if mode == "pad":
        if h > size or w > size:
            raise ValueError(f"cannot pad {h}×{w} images to {size}×{size}; use mode='resize'")
        value = float(x.min()) if pad_value is None else float(pad_value)
        top, left = (size - h) // 2, (size - w) // 2
        x = F.pad(x, (left, size - w - left, top, size - h - top), value=value)
    elif mode == "resize":
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")
    return x.expand(-1, channels, -1, -1).contiguous()


def fashion_mnist_as_cifar(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    train_subset: int | None = None,
    channels: int = 3,
) -> ImageData:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``) standardised and padded to
    (N, ``channels``, 32, 32): the image studies' default data on this machine."""
    d = load_image_dataset("fashion-mnist", data_dir, device=device, train_subset=train_subset)
    pad = float(d.train_x.min())  # the standardised background value
    return ImageData(
        name="fashion-mnist-32",
        train_x=to_cifar_shape(d.train_x, channels=channels, pad_value=pad),
        train_y=d.train_y,
        val_x=to_cifar_shape(d.val_x, channels=channels, pad_value=pad),
        val_y=d.val_y,
        num_classes=d.num_classes,
    )
