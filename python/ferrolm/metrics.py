"""Evaluation metrics: accuracy, macro-F1, exact match, perplexity, bits per byte, and a mean
with a confidence interval over seeds.

Example:
    >>> accuracy([1, 0, 1], [1, 1, 1])
    0.6666666666666666
    >>> macro_f1(["a", "b", "a"], ["a", "b", "b"])
    0.6666666666666666
"""

from __future__ import annotations

import math
import re
import string
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

__all__ = [
    "accuracy",
    "macro_f1",
    "exact_match",
    "perplexity",
    "bits_per_byte",
    "mean_ci",
    "corpus_bleu",
    "corpus_chrf",
    "tokenize_13a",
]


def _pair(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold):
        raise ValueError(f"predictions ({len(pred)}) and references ({len(gold)}) differ in length")
    if not len(gold):
        raise ValueError("no examples to score")


def accuracy(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference."""
    _pair(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def macro_f1(pred: Sequence[Hashable], gold: Sequence[Hashable], labels: Optional[Sequence[Hashable]] = None) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: every class seen in either
    list); a class with no true and no predicted example has F1 0 only if listed in ``labels``
    (as scikit-learn's ``f1_score(average="macro", zero_division=0)``)."""
    _pair(pred, gold)
    classes = list(labels) if labels is not None else sorted(set(gold) | set(pred), key=repr)
    f1s = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def _normalise_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: Sequence[str], gold: Sequence[str], normalise: bool = True) -> float:
    """Fraction of predictions equal to the reference; with ``normalise`` (SQuAD's rule)
    after lower-casing and removing punctuation, articles and extra whitespace."""
    _pair(pred, gold)
    f = _normalise_answer if normalise else (lambda x: x)
    return sum(f(p) == f(g) for p, g in zip(pred, gold)) / len(gold)


# WMT's mteval-v13a tokenisation: punctuation and symbols split off; periods and commas split
# unless between digits; a dash split after a digit.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> str:
    """The ``13a`` tokenisation that BLEU reports use by default (mteval-v13a)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for rx, repl in _13A_RULES:
        line = rx.sub(repl, line)
    return " ".join(line.split())


def _ngrams(words: Sequence[str], n_max: int) -> Dict[Tuple[str, ...], int]:
    out: Dict[Tuple[str, ...], int] = {}
    for n in range(1, n_max + 1):
        for i in range(len(words) - n + 1):
            g = tuple(words[i : i + n])
            out[g] = out.get(g, 0) + 1
    return out


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenize: str = "13a",
    lowercase: bool = False,
    max_order: int = 4,
) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults: ``13a`` tokenisation, clipped n-gram
    precisions up to 4, the closest reference length for the brevity penalty (ties: the
    shorter), and NIST's exponential smoothing of orders with no match.

    Args:
        hypotheses: one string per segment. references: reference *streams*, each with one
            string per segment (``references[j][i]`` is the j-th reference of segment i), as
            ``sacrebleu.corpus_bleu`` takes them.
        tokenize: ``"13a"`` or ``"none"`` (split on whitespace only).
    """
    if isinstance(hypotheses, str) or any(isinstance(r, str) for r in references):
        raise TypeError(
            "hypotheses must be a list of strings and references a list of reference streams (lists of strings)"
        )
    if not references or any(len(r) != len(hypotheses) for r in references):
        raise ValueError(f"every reference stream needs one string per hypothesis ({len(hypotheses)})")
    if tokenize not in ("13a", "none"):
        raise ValueError(f"tokenize must be '13a' or 'none', got {tokenize!r}")

    def prep(x: str) -> List[str]:
        x = x.lower() if lowercase else x
        return (tokenize_13a(x) if tokenize == "13a" else " ".join(x.split())).split()

    correct = [0] * max_order
    total = [0] * max_order
    sys_len = ref_len = 0
    for i, hyp in enumerate(hypotheses):
        h = prep(hyp)
        refs = [prep(r[i]) for r in references]
        sys_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in refs)[1]
        best: Dict[Tuple[str, ...], int] = {}
        for r in refs:
            for g, c in _ngrams(r, max_order).items():
                if c > best.get(g, 0):
                    best[g] = c
        for g, c in _ngrams(h, max_order).items():
            n = len(g) - 1
            total[n] += c
            correct[n] += min(c, best.get(g, 0))
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    log_sum, smooth = 0.0, 1.0
    for n in range(max_order):
        if total[n] == 0:
            return 0.0  # the hypotheses are shorter than this order: no credit (sacrebleu's behaviour)
        if correct[n] == 0:
            smooth *= 2
            p = 100.0 / (smooth * total[n])
        else:
            p = 100.0 * correct[n] / total[n]
        log_sum += math.log(p)
    return bp * math.exp(log_sum / max_order)


_CHRF_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _chrf_words(sent: str) -> List[str]:
    """Words for chrF++'s word n-grams: one punctuation mark split off a word's end (or, failing
    that, its start), as the reference chrF++ does."""
    out: List[str] = []
    for w in sent.split():
        if len(w) > 1 and w[-1] in _CHRF_PUNCT:
            out += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in _CHRF_PUNCT:
            out += [w[0], w[1:]]
        else:
            out.append(w)
    return out


def _chrf_ngrams(sent: str, char_order: int, word_order: int, whitespace: bool) -> List[Dict[str, int]]:
    line = sent if whitespace else "".join(sent.split())
    grams: List[Dict[str, int]] = []
    for n in range(1, char_order + 1):
        c: Dict[str, int] = {}
        for i in range(len(line) - n + 1):
            c[line[i : i + n]] = c.get(line[i : i + n], 0) + 1
        grams.append(c)
    words = _chrf_words(sent) if word_order else []
    for n in range(1, word_order + 1):
        c = {}
        for i in range(len(words) - n + 1):
            g = " ".join(words[i : i + n])
            c[g] = c.get(g, 0) + 1
        grams.append(c)
    return grams


def _chrf_f(stats: Sequence[int], order: int, beta: float) -> float:
    """chrF from [hyp, ref, match] counts per order: the precisions and recalls averaged over
    the orders where both sides have n-grams, then F-beta (0-100)."""
    factor = beta**2
    avg_p = avg_r = 0.0
    effective = 0
    for i in range(order):
        n_hyp, n_ref, n_match = stats[3 * i : 3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            avg_p += n_match / n_hyp
            avg_r += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    avg_p, avg_r = avg_p / effective, avg_r / effective
    if avg_p + avg_r == 0:
        return 0.0
    return 100 * (1 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)


def corpus_chrf(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
) -> float:
    """Corpus chrF (0-100) with sacrebleu's defaults (``CHRF()``): character n-grams up to 6
    with whitespace removed, F-beta with beta = 2 over precision and recall averaged across
    orders, statistics summed over the corpus; ``word_order=2`` gives chrF++. With several
    references a segment counts against the one it matches best.

    Args:
        hypotheses: one string per segment. references: reference streams, as
            :func:`corpus_bleu` takes them.
    """
    if isinstance(hypotheses, str) or any(isinstance(r, str) for r in references):
        raise TypeError(
            "hypotheses must be a list of strings and references a list of reference streams (lists of strings)"
        )
    if not references or any(len(r) != len(hypotheses) for r in references):
        raise ValueError(f"every reference stream needs one string per hypothesis ({len(hypotheses)})")
    if char_order < 0 or word_order < 0 or char_order + word_order == 0:
        raise ValueError(f"char_order and word_order must be >= 0 with a positive sum, got {char_order}, {word_order}")
    order = char_order + word_order
    total = [0] * (3 * order)
    prep = (lambda x: x.lower()) if lowercase else (lambda x: x)
    for i, hyp in enumerate(hypotheses):
        h = _chrf_ngrams(prep(hyp), char_order, word_order, whitespace)
        best: Optional[List[int]] = None
        best_f = -1.0
        for stream in references:
            r = _chrf_ngrams(prep(stream[i]), char_order, word_order, whitespace)
            stats: List[int] = []
            for hg, rg in zip(h, r):
                match = sum(min(c, rg[g]) for g, c in hg.items() if g in rg)
                stats += [sum(hg.values()) if rg else 0, sum(rg.values()), match]
            f = _chrf_f(stats, order, beta)
            if f > best_f:
                best, best_f = stats, f
        assert best is not None
        total = [a + b for a, b in zip(total, best)]
    return _chrf_f(total, order, beta)


def perplexity(total_logprob: float, n_tokens: int) -> float:
    """``exp(-total_logprob / n_tokens)`` from a natural-log likelihood."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(-total_logprob / n_tokens)


def bits_per_byte(total_logprob: float, n_bytes: int) -> float:
    """Tokenizer-independent compression: ``-total_logprob / (n_bytes * ln 2)``."""
    if n_bytes <= 0:
        raise ValueError("bits_per_byte needs at least one byte")
    return -total_logprob / (n_bytes * math.log(2))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """``(mean, low, high)``: the mean and a Student-t confidence interval over runs (seeds);
    the interval is the mean itself for a single run."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    m = sum(values) / n
    if n == 1:
        return m, m, m
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    from scipy.stats import t  # the Student-t quantile (scipy: no hand-written special functions)

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half
