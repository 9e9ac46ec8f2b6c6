"""German→English sentence pairs as padded id tensors (word-level, no subwords).

Sources, never downloaded:

- ``trans-de-en`` (Debian package; Frank Richter's TU Chemnitz dictionary "Ding",
  one file ``/usr/share/trans/de-en``). Each line is ``German | … :: English | …``;
  the ``|``-separated sub-entries correspond one to one. Besides words, many
  sub-entries are example sentences; :func:`load_trans_de_en` keeps the pairs
  whose both sides are sentences (capital first letter, ending in ``.``, ``!`` or
  ``?``, at least ``min_words`` words) after cleaning: dictionary tags
  ``{f}``, ``[Br.]``, ``<…>`` and parenthesised notes ``(…)`` are removed, of
  ``"A.; B."`` alternatives the first is kept, typographic quotes are made ASCII,
  and pairs with ``/`` alternatives, ``…`` or ``~`` placeholders are dropped
  (about 17,000 pairs). Fixed split 90/5/5 % by a seed-0 permutation.
- IWSLT-style plain parallel text: ``<split>.<lang>`` files, one sentence per line
  (e.g. ``train.de``/``train.en``, ``valid.de`` or ``dev.de``, ``test.de``; the
  fairseq ``prepare-iwslt14.sh`` output has this layout).

Words and punctuation are tokens (:func:`anact.experiments.data.text.tokenize`,
lower-cased); each language has its own vocabulary built on the training split,
with ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3. Word-level vocabularies keep
the code free of a subword tokenizer; rare words become ``<unk>`` (``min_freq``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from anact.experiments.data.idx import DataError
from anact.experiments.data.text import Padded, Vocab, pad_sequences, split_indices, tokenize

__all__ = [
    "BOS",
    "EOS",
    "TRANS_DE_EN",
    "SPECIALS",
    "TranslationData",
    "TranslationSplit",
    "clean_dictionary_text",
    "load_iwslt",
    "load_trans_de_en",
    "load_translation_dataset",
    "prepare_translation",
    "read_parallel",
]

TRANS_DE_EN = "/usr/share/trans/de-en"
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
BOS, EOS = 2, 3

_TAGS = re.compile(r"(\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>|\([^()]*\))")
_ALTERNATIVE = re.compile(r"(?<=[.!?])\s*;\s*")
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "„": '"', "‚": "'", "\u00a0": " "})
_PUNCT = re.compile(r"[.!?]")
_SENTENCE = re.compile(r"^[\"']?[^\W\d_].*[.!?][\"']?$")


def clean_dictionary_text(text: str) -> str:
    """Strip the dictionary's annotations from one side of a ``trans-de-en`` entry.

    ``"Das sei ihm gegönnt. [ugs.]"`` → ``"Das sei ihm gegönnt."``;
    ``"Einbrecher waren da.; Da waren Einbrecher (am Werk)."`` → ``"Einbrecher waren da."``.
    """
    text = text.translate(_QUOTES)
    prev = None
    while prev != text:  # nested brackets go from the inside out
        prev, text = text, _TAGS.sub(" ", text)
    text = _ALTERNATIVE.split(text)[0]
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([.,!?;:])", r"\1", text)


def _is_sentence(text: str, min_words: int) -> bool:
    if any(c in text for c in "/…~|") or "..." in text or len(text.split()) < min_words:
        return False
    first = text.lstrip("\"'")[:1]
    return first.isupper() and bool(_SENTENCE.match(text))


def load_trans_de_en(
    path: str | os.PathLike[str] = TRANS_DE_EN, *, min_words: int = 3
) -> list[tuple[str, str]]:
    """The (German, English) example-sentence pairs of the ``trans-de-en`` dictionary,
    cleaned as described in the module docstring, duplicates (same German) dropped,
    in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} not found: install the Debian package trans-de-en "
            "(sudo apt-get install trans-de-en), which provides /usr/share/trans/de-en, "
            "or pass the path of that file"
        )
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    entries = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            entries += 1
            de, en = line.rstrip("\n").split(" :: ", 1)
            de_parts, en_parts = de.split(" | "), en.split(" | ")
            if len(de_parts) != len(en_parts):
                continue
            for d, e in zip(de_parts, en_parts, strict=True):
                if d.count(" ") < min_words - 1 or not _PUNCT.search(d):
                    continue  # a cheap pre-filter: most sub-entries are single words
                d, e = clean_dictionary_text(d), clean_dictionary_text(e)
                if d in seen or not (_is_sentence(d, min_words) and _is_sentence(e, min_words)):
                    continue
                seen.add(d)
                pairs.append((d, e))
    if not pairs:
        raise DataError(
            f"{path}: no sentence pairs found in {entries} entries; expected the trans-de-en "
            "format 'Deutsch {{n}} | … :: English | …'"
        )
    return pairs


def _read_lines(path: str | os.PathLike[str]) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


def read_parallel(
    src_path: str | os.PathLike[str], tgt_path: str | os.PathLike[str]
) -> list[tuple[str, str]]:
    """Line-aligned sentence pairs of two plain text files (UTF-8, one sentence a line);
    pairs with an empty side are dropped. Raises :class:`DataError` when the line
    counts differ or a file is not UTF-8."""
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
            "parallel files must be line-aligned"
        )
    pairs = [(s.strip(), t.strip()) for s, t in zip(src, tgt, strict=True)]
    return [(s, t) for s, t in pairs if s and t]


_IWSLT_NAMES = {"train": ("train",), "valid": ("valid", "dev"), "test": ("test", "tst")}
_SPLIT_WORDS = {"train": "training", "valid": "validation", "test": "test"}


def load_iwslt(
    data_dir: str | os.PathLike[str], src: str = "de", tgt: str = "en"
) -> dict[str, list[tuple[str, str]]]:
    """``{"train"|"valid"|"test": pairs}`` from ``train.de``/``train.en``,
    ``valid.*`` (or ``dev.*``), ``test.*`` (or ``tst.*``) in ``data_dir``."""
    data_dir = Path(data_dir)
    out: dict[str, list[tuple[str, str]]] = {}
    for split, names in _IWSLT_NAMES.items():
        for n in names:
            s, t = data_dir / f"{n}.{src}", data_dir / f"{n}.{tgt}"
            if s.is_file() and t.is_file():
                out[split] = read_parallel(s, t)
                if not out[split]:
                    raise DataError(
                        f"IWSLT: no {_SPLIT_WORDS[split]} sentence pairs in {s} and {t} "
                        "(every line pair has an empty side); expected one sentence per line"
                    )
                break
        else:
            raise DataError(
                f"IWSLT: no {names[0]}.{src}/{names[0]}.{tgt} in {data_dir}; expected plain "
                f"parallel files train.{src}, train.{tgt}, valid.{src} (or dev.*), "
                f"valid.{tgt}, test.{src}, test.{tgt}, one sentence per line "
                "(e.g. the output of fairseq's prepare-iwslt14.sh)"
            )
    return out


@dataclass
class TranslationSplit:
    """One split. ``src``: source ids (N, S) with lengths and mask; ``tgt``:
    ``<bos>`` + target ids + ``<eos>`` (N, T) — feed ``tgt.ids[:, :-1]``, predict
    ``tgt.ids[:, 1:]``; ``refs``: the tokenised target sentences joined by spaces
    (untruncated), the references for BLEU."""

    src: Padded
    tgt: Padded
    refs: list[str]

    def __len__(self) -> int:
        return len(self.refs)

    def to(self, device: torch.device | str) -> TranslationSplit:
        def mv(p: Padded) -> Padded:
            return Padded(p.ids.to(device), p.lengths.to(device), p.mask.to(device))

        return TranslationSplit(mv(self.src), mv(self.tgt), self.refs)


@dataclass
class TranslationData:
    """Splits ``train``, ``valid``, ``test`` and one vocabulary per side."""

    name: str
    train: TranslationSplit
    valid: TranslationSplit
    test: TranslationSplit
    src_vocab: Vocab
    tgt_vocab: Vocab

    def detokenize(self, ids: Tensor | Sequence[int]) -> str:
        """Target ids → space-joined tokens, stopping at ``<eos>``, without specials."""
        out = []
        for i in ids.tolist() if isinstance(ids, Tensor) else ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.tgt_vocab.itos[i])
            elif i == 1:
                out.append("<unk>")
        return " ".join(out)


def prepare_translation(
    name: str,
    splits: dict[str, list[tuple[str, str]]],
    *,
    min_freq: int = 1,
    max_size: int | None = None,
    max_len: int | None = 50,
) -> TranslationData:
    """Tokenise, build both vocabularies on train, encode and pad.

    Training pairs longer than ``max_len`` tokens on either side are dropped; in
    valid/test the source is truncated to ``max_len`` (the references stay whole).
    """
    tok = {k: [(tokenize(s), tokenize(t)) for s, t in v] for k, v in splits.items()}
    if max_len is not None:
        tok["train"] = [(s, t) for s, t in tok["train"] if len(s) <= max_len and len(t) <= max_len]
    if not tok["train"]:
        raise DataError(f"{name}: no training pairs left (max_len={max_len})")
    src_vocab = Vocab.build(
        (s for s, _ in tok["train"]), min_freq=min_freq, max_size=max_size, specials=SPECIALS
    )
    tgt_vocab = Vocab.build(
        (t for _, t in tok["train"]), min_freq=min_freq, max_size=max_size, specials=SPECIALS
    )

    def encode(pairs: list[tuple[list[str], list[str]]]) -> TranslationSplit:
        src = pad_sequences([src_vocab.encode(s) or [1] for s, _ in pairs], max_len=max_len)
        tgt = pad_sequences([[BOS, *tgt_vocab.encode(t), EOS] for _, t in pairs])
        return TranslationSplit(src, tgt, [" ".join(t) for _, t in pairs])

    for k in ("valid", "test"):
        if not tok[k]:
            raise DataError(f"{name}: no {_SPLIT_WORDS[k]} sentence pairs")
    parts = {k: encode(tok[k]) for k in ("train", "valid", "test")}
    return TranslationData(
        name, parts["train"], parts["valid"], parts["test"], src_vocab, tgt_vocab
    )


def load_translation_dataset(
    name: str = "trans-de-en",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    min_freq: int = 1,
    max_size: int | None = None,
    max_len: int | None = 50,
    train_subset: int | None = None,
    device: torch.device | str = "cpu",
) -> TranslationData:
    """``"trans-de-en"`` (the Debian dictionary file, or its path as ``data_dir``) or
    ``"iwslt"`` (``data_dir`` with ``train.de``/``train.en`` …), de → en.

    ``train_subset`` keeps the first N training pairs before the vocabularies are built.
    """
    if name == "trans-de-en":
        pairs = load_trans_de_en(data_dir or TRANS_DE_EN)
        idx = split_indices(len(pairs), (0.9, 0.05, 0.05), seed=0)
        names = ("train", "valid", "test")
        splits = {k: [pairs[i] for i in ix] for k, ix in zip(names, idx, strict=True)}
    elif name == "iwslt":
        if data_dir is None:
            raise DataError(
                "IWSLT is not packaged: pass data_dir, the folder with train.de/train.en …"
            )
        splits = load_iwslt(data_dir)
    else:
        raise DataError(f"unknown translation dataset {name!r}; choose trans-de-en or iwslt")
    if train_subset is not None:
        if train_subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {train_subset}")
        splits["train"] = splits["train"][:train_subset]
    data = prepare_translation(name, splits, min_freq=min_freq, max_size=max_size, max_len=max_len)
    for k in ("train", "valid", "test"):
        setattr(data, k, getattr(data, k).to(device))
    return data
