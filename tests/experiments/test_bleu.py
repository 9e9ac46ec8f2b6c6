"""Corpus BLEU: hand-computed examples and agreement with SacreBLEU (if installed)."""

from __future__ import annotations

import math
import random

import pytest

from anact.experiments.bleu import bleu, corpus_bleu, sacrebleu_available, tokenize_13a


def test_hand_computed_example_with_exp_smoothing() -> None:
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat":
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4: no match of 3 → exp smoothing 1/(2·3); BP = 1
    r = corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"])
    assert r.counts == (5, 3, 1, 0) and r.totals == (6, 5, 4, 3)
    expect = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert r.score == pytest.approx(expect, rel=1e-12)
    assert r.bp == 1.0
    # without smoothing a zero precision makes BLEU 0
    assert (
        corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"], smooth="none").score
        < 1e-12
    )


def test_hand_computed_brevity_penalty_over_a_corpus() -> None:
    hyps = ["a b c d e", "x y z w"]
    refs = ["a b c d e f g h", "x y z w"]
    r = corpus_bleu(hyps, refs, tokenize="none")
    # all n-grams match; c = 9, r = 12 → BP = exp(1 − 12/9)
    assert r.precisions == (100.0, 100.0, 100.0, 100.0)
    assert (r.sys_len, r.ref_len) == (9, 12)
    assert r.score == pytest.approx(100 * math.exp(1 - 12 / 9), rel=1e-12)


def test_multiple_references_clip_by_max_and_closest_length() -> None:
    # "the the the the": each reference holds "the" at most twice → p1 = 2/4
    r = corpus_bleu(["the the the the"], [["the the cat"], ["the the dog sat on"]], tokenize="none")
    assert r.counts[0] == 2
    # hyp length 4; refs 3 and 5 are equally close → the shorter (3) counts
    assert r.ref_len == 3
    with pytest.raises(ValueError, match="reference stream"):
        corpus_bleu(["a", "b"], ["a"])


def test_13a_tokenization() -> None:
    assert tokenize_13a("Hello, world.") == "Hello , world ."
    assert tokenize_13a("It costs $3.50, i.e. 1,000 (approx.)!") == (
        "It costs $ 3.50 , i . e . 1,000 ( approx . ) !"
    )
    assert tokenize_13a("1990-2000 well-known &amp; co") == "1990 - 2000 well-known & co"


def _random_corpus(seed: int, n: int, n_refs: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = "the a cat dog sat on mat is was big small 3.5 1,000 well-known it's".split()
    punct = [",", ".", "!", "?", ""]

    def sent(base: list[str] | None = None) -> str:
        if base is not None:  # a noisy copy, so that higher-order n-grams match too
            toks = [w if rng.random() < 0.7 else rng.choice(words) for w in base]
            if rng.random() < 0.3:
                toks = toks[: rng.randint(1, len(toks))]
        else:
            toks = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        s = " ".join(toks) + rng.choice(punct)
        return s.capitalize() if rng.random() < 0.5 else s

    refs0 = [sent() for _ in range(n)]
    hyps = [sent(r.split()) for r in refs0]
    refs = [refs0] + [[sent(r.split()) for r in refs0] for _ in range(n_refs - 1)]
    return hyps, refs


@pytest.mark.skipif(not sacrebleu_available(), reason="sacrebleu not installed")
@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_sacrebleu(seed: int) -> None:
    import sacrebleu

    n_refs = 1 + seed % 3
    hyps, refs = _random_corpus(seed, n=5 + 7 * seed, n_refs=n_refs)
    for tok in ("13a", "none"):
        for lc in (False, True):
            ours = corpus_bleu(hyps, refs, tokenize=tok, lowercase=lc)
            theirs = sacrebleu.corpus_bleu(hyps, refs, tokenize=tok, lowercase=lc)
            assert ours.score == pytest.approx(theirs.score, rel=1e-9, abs=1e-9)
            assert list(ours.counts) == list(theirs.counts)
            assert list(ours.totals) == list(theirs.totals)
            assert (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    # edge cases: a 4-gram-free corpus (smoothing), no match at all, an empty hypothesis
    for h, r in (
        (["a b c"], ["a b d"]),
        (["x y"], ["a b"]),
        (["", "a b c d"], ["a b", "a b c d"]),
    ):
        assert corpus_bleu(h, r).score == pytest.approx(sacrebleu.corpus_bleu(h, [r]).score)
    assert bleu(hyps, refs) == pytest.approx(bleu(hyps, refs, backend="anact"), rel=1e-9)


def test_bleu_backend_validation() -> None:
    with pytest.raises(ValueError, match="backend"):
        bleu(["a"], ["a"], backend="nltk")  # type: ignore[arg-type]
    assert bleu(["a b c d"], ["a b c d"], backend="anact") == pytest.approx(100.0)


@pytest.mark.skipif(not sacrebleu_available(), reason="sacrebleu not installed")
def test_pretokenized_input_gives_no_detokenize_warning(caplog: pytest.LogCaptureFixture) -> None:
    hyps = ["the dog runs ."] * 120
    with caplog.at_level("WARNING"):
        assert bleu(hyps, hyps, tokenize="none") == pytest.approx(100.0)
    assert "detokenize" not in caplog.text
