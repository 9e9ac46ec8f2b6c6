"""Tiny ImageNet layout with tiny JPEGs written here (needs Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anact.experiments.data.idx import DataError
from anact.experiments.data.tiny_imagenet import load_tiny_imagenet, read_tiny_imagenet_split

Image = pytest.importorskip("PIL.Image")

# a flat colour per class survives JPEG compression to within a few levels
COLOURS = {"n02": (200, 30, 30), "n01": (20, 180, 40), "n03": (30, 40, 220)}


def write_tiny(root: Path, per_class: int = 3, n_val: int = 2) -> Path:
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    # unsorted on purpose: class index = position in sorted(wnids)
    (base / "wnids.txt").write_text("n02\nn01\nn03\n")
    ann = []
    for w, rgb in COLOURS.items():
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), rgb).save(folder / f"{w}_{i}.JPEG", quality=95)
        for i in range(n_val):
            name = f"val_{w}_{i}.JPEG"
            Image.new("RGB", (64, 64), rgb).save(base / "val" / "images" / name, quality=95)
            ann.append(f"{name}\t{w}\t0\t0\t63\t63")
    # a grey-scale image must be converted to RGB
    Image.new("L", (64, 64), 128).save(base / "train" / "n03" / "images" / "n03_grey.JPEG")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


def test_train_split_labels_and_colours(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    x, y, wnids = read_tiny_imagenet_split(tmp_path, "train")
    assert wnids == ["n01", "n02", "n03"]
    assert x.shape == (10, 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    for img, label in zip(x, y, strict=True):
        mean = img.double().mean(dim=(1, 2)).numpy()
        if label == 2 and abs(mean[0] - mean[1]) < 3:  # the grey image
            assert np.allclose(mean, 128, atol=3)
            continue
        assert np.allclose(mean, COLOURS[wnids[label]], atol=4)


def test_val_split_uses_annotations_and_per_class(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    x, y, _ = read_tiny_imagenet_split(tmp_path / "tiny-imagenet-200", "val")
    assert x.shape == (6, 3, 64, 64) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    red = x[y == 1].double().mean(dim=(0, 2, 3)).numpy()
    assert np.allclose(red, COLOURS["n02"], atol=4)
    x1, y1, _ = read_tiny_imagenet_split(tmp_path, "val", per_class=1)
    assert sorted(y1.tolist()) == [0, 1, 2]


def test_load_tiny_imagenet_standardizes(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    d = load_tiny_imagenet(tmp_path, per_class=2)
    assert d.train_x.shape == (6, 3, 64, 64) and d.num_classes == 3
    m = d.train_x.mean(dim=(0, 2, 3))
    s = d.train_x.std(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(3), atol=1e-5)
    assert torch.allclose(s, torch.ones(3), atol=1e-4)


def test_errors_name_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="wnids.txt.*tiny-imagenet-200"):
        read_tiny_imagenet_split(tmp_path, "train")
    write_tiny(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    (base / "val" / "val_annotations.txt").write_text("a.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n99|wnid"):
        read_tiny_imagenet_split(tmp_path, "val")
    (base / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode.*n01_0.JPEG"):
        read_tiny_imagenet_split(tmp_path, "train")
