"""trans-de-en dictionary parsing (file written here in its format), IWSLT files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anact.experiments.data.idx import DataError
from anact.experiments.data.translation import (
    BOS,
    EOS,
    TRANS_DE_EN,
    clean_dictionary_text,
    load_iwslt,
    load_trans_de_en,
    load_translation_dataset,
    read_parallel,
)

DICT = """\
# Version :: devel 2023-01-30
# License :: GPL Version 2 or later; GNU General Public License
Aal {m} [cook.] | Aale {pl} :: eel | eels
Wasser {n} | Das Wasser riecht komisch. :: water | The water smells funny.
Das sei ihm gegönnt. [ugs.] :: I don’t (be)grudge him that.
Einbrecher waren da.; Da waren Einbrecher (am Werk). :: Burglars have broken in.
Es ist im nationalen/öffentlichen Interesse. :: It is in the national/public interest.
Wir werden über … nachdenken. :: We will think about …
Den wievielten haben wir heute? :: What's the date today?
Hören Sie nicht auf ihn! :: Don’t listen to him!
kurz :: Too short.
Das Wasser riecht komisch. :: A duplicate German side is dropped.
Er ging. | Er ging nach Hause. :: He left. :: broken
Eins | Zwei Drei Vier. :: only one part
"""


def test_clean_dictionary_text() -> None:
    assert clean_dictionary_text("Das sei ihm gegönnt. [ugs.]") == "Das sei ihm gegönnt."
    assert clean_dictionary_text("I don’t (be)grudge him that.") == "I don't grudge him that."
    assert clean_dictionary_text("Aal {m} (auf der (Speise)karte) [cook.] <Aale>") == "Aal"
    assert (
        clean_dictionary_text("Einbrecher waren da.; Da waren Einbrecher (am Werk).")
        == "Einbrecher waren da."
    )
    assert clean_dictionary_text("Lachen hallte (herüber) .") == "Lachen hallte."


def test_trans_de_en_sentence_pairs(tmp_path: Path) -> None:
    p = tmp_path / "de-en"
    p.write_text(DICT, encoding="utf-8")
    pairs = load_trans_de_en(p)
    assert pairs == [
        ("Das Wasser riecht komisch.", "The water smells funny."),
        ("Das sei ihm gegönnt.", "I don't grudge him that."),
        ("Einbrecher waren da.", "Burglars have broken in."),
        ("Den wievielten haben wir heute?", "What's the date today?"),
        ("Hören Sie nicht auf ihn!", "Don't listen to him!"),
    ]


def test_trans_de_en_missing_file_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install trans-de-en"):
        load_trans_de_en(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("# header only\n")
    with pytest.raises(DataError, match="no sentence pairs"):
        load_trans_de_en(empty)


@pytest.mark.skipif(not Path(TRANS_DE_EN).is_file(), reason="Debian trans-de-en not installed")
def test_debian_trans_de_en_has_thousands_of_clean_pairs() -> None:
    pairs = load_trans_de_en()
    assert len(pairs) > 10_000
    for de, en in pairs[:: len(pairs) // 200]:
        for s in (de, en):
            assert s[-1] in ".!?\"'" and not any(c in s for c in "{}[]<>()/…"), s


def _iwslt(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    words_de = ["ich", "du", "wir", "sie"]
    words_en = ["i", "you", "we", "they"]
    for name in ("train", "dev", "test"):  # "dev" stands for valid
        de = [f"{words_de[i % 4]} gehe nach hause ." for i in range(n)]
        en = [f"{words_en[i % 4]} go home ." for i in range(n)]
        (root / f"{name}.de").write_text("\n".join(de) + "\n")
        (root / f"{name}.en").write_text("\n".join(en) + "\n")
    return root


def test_iwslt_reader_and_prepared_tensors(tmp_path: Path) -> None:
    root = _iwslt(tmp_path / "iwslt")
    splits = load_iwslt(root)
    assert set(splits) == {"train", "valid", "test"} and len(splits["valid"]) == 12
    d = load_translation_dataset("iwslt", root)
    assert d.src_vocab.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    src, tgt = d.train.src, d.train.tgt
    assert src.ids.shape == (12, 5) and tgt.ids.shape == (12, 6)  # 4 words + "." (+bos/eos)
    assert (tgt.ids[:, 0] == BOS).all() and (tgt.ids[:, -1] == EOS).all()
    assert d.src_vocab.decode(src.ids[1].tolist()) == ["du", "gehe", "nach", "hause", "."]
    assert d.detokenize(tgt.ids[3, 1:]) == "they go home ." == d.train.refs[3]
    (root / "test.en").write_text("one line\n")
    with pytest.raises(DataError, match="line-aligned"):
        read_parallel(root / "test.de", root / "test.en")
    with pytest.raises(DataError, match="train.de"):
        load_iwslt(tmp_path / "empty")


def test_trans_de_en_dataset_split_is_fixed(tmp_path: Path) -> None:
    lines = [f"Satz Nummer {i} ist hier. :: Sentence number {i} is here." for i in range(60)]
    p = tmp_path / "de-en"
    p.write_text("\n".join(lines) + "\n")
    a = load_translation_dataset("trans-de-en", p, max_len=50)
    b = load_translation_dataset("trans-de-en", p, max_len=50)
    assert (len(a.train), len(a.valid), len(a.test)) == (54, 3, 3)
    assert torch.equal(a.test.src.ids, b.test.src.ids) and a.test.refs == b.test.refs
    # pairs stay aligned through the split: the number on both sides matches
    for i in range(len(a.train)):
        de_num = a.src_vocab.itos[int(a.train.src.ids[i, 2])]
        assert a.train.refs[i].split()[2] == de_num
    with pytest.raises(DataError, match="no training pairs left"):  # all have 6 tokens
        load_translation_dataset("trans-de-en", p, max_len=5)


def test_iwslt_blank_validation_files_are_a_data_error(tmp_path: Path) -> None:
    root = _iwslt(tmp_path / "iwslt")
    (root / "valid.de").write_text("\n\n  \n")
    (root / "valid.en").write_text("\n\n\n")
    with pytest.raises(DataError, match=r"no validation sentence pairs in .*valid\.de"):
        load_translation_dataset("iwslt", root)


def test_iwslt_file_not_utf8_is_named(tmp_path: Path) -> None:
    root = _iwslt(tmp_path / "iwslt")
    (root / "train.de").write_bytes("Grüße\n".encode("latin-1") * 12)
    with pytest.raises(DataError, match=r"train\.de is not UTF-8 text .*iconv"):
        load_iwslt(root)
