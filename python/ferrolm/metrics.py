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
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

__all__ = ["accuracy", "macro_f1", "exact_match", "perplexity", "bits_per_byte", "mean_ci", "corpus_bleu", "tokenize_13a"]


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


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a", lowercase: bool = False,
                max_order: int = 4) -> float:
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
        raise TypeError("hypotheses must be a list of strings and references a list of reference streams (lists of strings)")
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
    half = _t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile by bisection on the CDF (regularised incomplete beta)."""
    def cdf(t: float) -> float:
        x = df / (df + t * t)
        tail = 0.5 * _betainc(df / 2, 0.5, x)
        return 1 - tail if t > 0 else tail

    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + num / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0) / a
