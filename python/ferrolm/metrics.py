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
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple

__all__ = ["accuracy", "macro_f1", "exact_match", "perplexity", "bits_per_byte", "mean_ci"]


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
