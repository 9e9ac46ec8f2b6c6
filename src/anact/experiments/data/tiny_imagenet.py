"""Tiny ImageNet (200 classes, 64×64) from its unpacked zip, never downloaded.

Layout (``tiny-imagenet-200.zip`` from http://cs231n.stanford.edu/ unpacked)::

    tiny-imagenet-200/
        wnids.txt                          one WordNet id per line (200 lines)
        train/<wnid>/images/*.JPEG         500 per class
        val/images/*.JPEG                  10,000 images
        val/val_annotations.txt            "<file>\t<wnid>\t<x0>\t<y0>\t<x1>\t<y1>"

``data_dir`` may be ``tiny-imagenet-200`` itself or its parent. The test split has no
labels, so the validation split serves as the test set (as in the paper's Table 5).
Class index = position of the wnid in ``sorted(wnids.txt)``. JPEG decoding needs
Pillow (``pip install pillow``, optional dependency); grey-scale images are converted
to RGB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from anact.experiments.data.cifar import channel_stats, standardize
from anact.experiments.data.idx import DataError, ImageData

__all__ = ["load_tiny_imagenet", "read_tiny_imagenet_split", "find_tiny_imagenet_dir"]

_LAYOUT = (
    "expected tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, "
    "val/images/*.JPEG and val/val_annotations.txt (unpack tiny-imagenet-200.zip from "
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip and pass its folder or parent as data_dir)"
)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading Tiny ImageNet JPEGs needs Pillow: pip install pillow") from e
    return Image


def find_tiny_imagenet_dir(data_dir: str | os.PathLike[str]) -> Path:
    """The ``tiny-imagenet-200`` folder in or at ``data_dir`` (has ``wnids.txt``)."""
    data_dir = Path(data_dir)
    for cand in (data_dir, data_dir / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file():
            return cand
    raise DataError(f"Tiny ImageNet: no wnids.txt in {data_dir}; {_LAYOUT}")


def _decode(path: Path, size: int) -> np.ndarray:
    image_cls = _pil()
    try:
        with image_cls.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), image_cls.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot decode image {path}: {e}") from e


def read_tiny_imagenet_split(
    data_dir: str | os.PathLike[str],
    split: Literal["train", "val"],
    *,
    per_class: int | None = None,
    size: int = 64,
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode one split: images uint8 (N, 3, size, size), labels int64 (N,), sorted wnids.

    ``per_class`` keeps the first N images of each class (files in sorted order), a
    fixed subset for quick runs. Raises :class:`DataError` for a missing class folder,
    an annotation naming an unknown wnid, or an undecodable image.
    """
    root = find_tiny_imagenet_dir(data_dir)
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    if not wnids:
        raise DataError(f"{root / 'wnids.txt'} is empty; {_LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    files: list[tuple[Path, int]] = []
    if split == "train":
        for w in wnids:
            folder = root / "train" / w / "images"
            if not folder.is_dir():
                raise DataError(f"Tiny ImageNet: missing {folder}; {_LAYOUT}")
            names = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
            files += [(p, index[w]) for p in names[:per_class]]
    elif split == "val":
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataError(f"Tiny ImageNet: missing {ann}; {_LAYOUT}")
        counts = dict.fromkeys(wnids, 0)
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(
                    f"{ann}:{n}: expected '<file>\\t<wnid>\\t…' with a wnid of wnids.txt, "
                    f"got {line!r}"
                )
            if per_class is not None and counts[parts[1]] >= per_class:
                continue
            counts[parts[1]] += 1
            files.append((root / "val" / "images" / parts[0], index[parts[1]]))
        files.sort(key=lambda f: f[0].name)
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not files:
        raise DataError(f"Tiny ImageNet {split}: no images found under {root}; {_LAYOUT}")
    images = np.stack([_decode(p, size) for p, _ in files])
    labels = torch.tensor([y for _, y in files], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, wnids


def load_tiny_imagenet(
    data_dir: str | os.PathLike[str] = ".",
    *,
    device: torch.device | str = "cpu",
    per_class: int | None = None,
    val_per_class: int | None = None,
    standardized: bool = True,
) -> ImageData:
    """Tiny ImageNet as an :class:`ImageData`: float32 (N, 3, 64, 64), labels int64.

    Standardised per channel with the mean and std of the (possibly subset) training
    images when ``standardized``; otherwise in [0, 1]. The full training set takes
    100,000 × 3 × 64 × 64 float32 ≈ 4.9 GB: use ``per_class`` for small runs.
    """
    tx, ty, wnids = read_tiny_imagenet_split(data_dir, "train", per_class=per_class)
    vx, vy, _ = read_tiny_imagenet_split(data_dir, "val", per_class=val_per_class)
    tx = tx.to(device=device, dtype=torch.float32).div_(255)
    vx = vx.to(device=device, dtype=torch.float32).div_(255)
    if standardized:
        mean, std = channel_stats(tx)
        tx, vx = standardize(tx, mean, std), standardize(vx, mean, std)
    return ImageData(
        name="tiny-imagenet",
        train_x=tx,
        train_y=ty.to(device),
        val_x=vx,
        val_y=vy.to(device),
        num_classes=len(wnids),
    )
