"""Corpus BLEU (Papineni et al. 2002), self-contained and SacreBLEU-compatible.

:func:`corpus_bleu` computes BLEU the way SacreBLEU's ``corpus_bleu`` does with its
defaults: n-gram counts (n = 1..4) clipped by the maximum count in any reference and
summed over the corpus, the closest reference length per sentence (ties → the
shorter), brevity penalty exp(1 − r/c) when c < r, the geometric mean of the
precisions, "exp" smoothing (an order with no match gets 1/(2^k · total), the k-th
such order), the "13a" tokenisation of mteval-v13a (or ``"none"``: split on
whitespace). Score in [0, 100].

:func:`sacrebleu_score` calls SacreBLEU (``pip install sacrebleu``, optional) when
installed; :func:`bleu` uses it when available and falls back to this implementation.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BLEUResult",
    "bleu",
    "corpus_bleu",
    "sacrebleu_available",
    "sacrebleu_score",
    "tokenize_13a",
]

_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenisation (SacreBLEU's default "13a"): punctuation split off,
    periods and commas split unless between digits; returns space-joined tokens."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&")
        line = line.replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


@dataclass(frozen=True)
class BLEUResult:
    """``score`` in [0, 100]; ``precisions`` (%) per order; brevity penalty ``bp``;
    ``sys_len``/``ref_len`` in tokens; matched ``counts`` and ``totals`` per order."""

    score: float
    precisions: tuple[float, ...]
    bp: float
    sys_len: int
    ref_len: int
    counts: tuple[int, ...]
    totals: tuple[int, ...]


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)
    )


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: Literal["13a", "none"] = "13a",
    lowercase: bool = False,
    smooth: Literal["exp", "none"] = "exp",
    max_n: int = 4,
) -> BLEUResult:
    """Corpus BLEU of ``hypotheses`` against ``references``.

    ``references`` is one reference per hypothesis (a list of strings) or several
    reference streams (a list of lists, each as long as ``hypotheses``, as in
    SacreBLEU). Raises ``ValueError`` on mismatched lengths.
    """
    if references and isinstance(references[0], str):
        streams: list[Sequence[str]] = [references]  # type: ignore[list-item]
    else:
        streams = [list(s) for s in references]  # type: ignore[arg-type]
    for s in streams:
        if len(s) != len(hypotheses):
            raise ValueError(
                f"{len(hypotheses)} hypotheses but a reference stream of {len(s)} sentences"
            )
    if smooth not in ("exp", "none"):
        raise ValueError(f"smooth must be 'exp' or 'none', got {smooth!r}")
    if tokenize not in ("13a", "none"):
        raise ValueError(f"tokenize must be '13a' or 'none', got {tokenize!r}")

    def prep(s: str) -> list[str]:
        s = s.lower() if lowercase else s
        s = s.rstrip()
        return (tokenize_13a(s) if tokenize == "13a" else s).split()

    correct, total = [0] * max_n, [0] * max_n
    sys_len = ref_len = 0
    for i, hyp in enumerate(hypotheses):
        h = prep(hyp)
        refs = [prep(s[i]) for s in streams]
        h_counts = _ngrams(h, max_n)
        max_ref: Counter = Counter()
        for r in refs:
            max_ref |= _ngrams(r, max_n)  # element-wise max
        # closest reference length, ties → the shorter (SacreBLEU, mteval)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in refs)[1]
        sys_len += len(h)
        for gram, c in h_counts.items():
            n = len(gram)
            total[n - 1] += c
            correct[n - 1] += min(c, max_ref[gram])

    # brevity penalty: exp(1 − r/c) if c < r
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    precisions = [0.0] * max_n
    if not any(correct):
        return BLEUResult(
            0.0, tuple(precisions), bp, sys_len, ref_len, tuple(correct), tuple(total)
        )
    log_sum, k = 0.0, 1.0
    for n in range(max_n):
        if total[n] == 0:
            break  # as SacreBLEU: this and higher orders keep precision 0 (score 0)
        if correct[n] == 0:
            if smooth == "exp":
                k *= 2
                precisions[n] = 100.0 / (k * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    for p in precisions:
        log_sum += math.log(p) if p > 0 else -9999999999.0
    score = bp * math.exp(log_sum / max_n)
    return BLEUResult(score, tuple(precisions), bp, sys_len, ref_len, tuple(correct), tuple(total))


def sacrebleu_available() -> bool:
    """Whether SacreBLEU is importable (checked without importing it)."""
    return importlib.util.find_spec("sacrebleu") is not None


def sacrebleu_score(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> float:
    """SacreBLEU's corpus BLEU (``pip install sacrebleu``); raises ``ImportError`` if absent."""
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError("sacrebleu_score needs SacreBLEU: pip install sacrebleu") from e
    if references and isinstance(references[0], str):
        references = [list(references)]  # type: ignore[list-item]
    result = sacrebleu.corpus_bleu(
        list(hypotheses),
        [list(r) for r in references],
        tokenize=tokenize,
        lowercase=lowercase,
        force=tokenize == "none",  # pre-tokenised input on purpose: no "detokenize" warning
    )
    return float(result.score)


def bleu(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: Literal["13a", "none"] = "13a",
    lowercase: bool = False,
    backend: Literal["auto", "sacrebleu", "anact"] = "auto",
) -> float:
    """Corpus BLEU score in [0, 100]: SacreBLEU when installed (``backend="auto"``),
    else :func:`corpus_bleu` (the same number, see the tests)."""
    if backend not in ("auto", "sacrebleu", "anact"):
        raise ValueError(f"backend must be 'auto', 'sacrebleu' or 'anact', got {backend!r}")
    if backend == "sacrebleu" or (backend == "auto" and sacrebleu_available()):
        return sacrebleu_score(hypotheses, references, tokenize=tokenize, lowercase=lowercase)
    return corpus_bleu(hypotheses, references, tokenize=tokenize, lowercase=lowercase).score
