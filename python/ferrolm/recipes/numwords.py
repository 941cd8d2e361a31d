"""Whole numbers 0..999,999 written in English and French words, by rule.

The embedded translation task (:mod:`ferrolm.recipes.translation`) maps one to the other. English is
written the American way, with no "and" and no commas (``"three hundred forty-five thousand
six hundred seventy-eight"``); French in the traditional spelling (before the 1990
rectifications), which is what ``num2words(n, lang="fr")`` writes and what the tests compare
against: ``vingt et un``, ``soixante et onze``, ``quatre-vingts`` but ``quatre-vingt-un`` and
``quatre-vingt mille``, ``deux cents`` but ``deux cent un`` and ``deux cent mille``, ``mille``
(never ``un mille``).

Example:
    >>> english(345678)
    'three hundred forty-five thousand six hundred seventy-eight'
    >>> french(280080)
    'deux cent quatre-vingt mille quatre-vingts'
"""

from __future__ import annotations

__all__ = ["english", "french", "MAX_NUMBER", "LANGUAGES"]

MAX_NUMBER = 999_999

_EN_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

_FR_UNITS = "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize".split()
_FR_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}


def _check(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"expected an int, got {type(n).__name__}")
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number {n} is outside [0, {MAX_NUMBER}]")
    return n


def _en_below_1000(n: int) -> str:
    h, r = divmod(n, 100)
    parts = [f"{_EN_UNITS[h]} hundred"] if h else []
    if r or not h:
        if r < 20:
            parts.append(_EN_UNITS[r])
        else:
            t, u = divmod(r, 10)
            parts.append(_EN_TENS[t] + (f"-{_EN_UNITS[u]}" if u else ""))
    return " ".join(parts)


def english(n: int) -> str:
    """``n`` (0..999,999) in English words, American style (no "and", no commas)."""
    th, r = divmod(_check(n), 1000)
    if not th:
        return _en_below_1000(r)
    return f"{_en_below_1000(th)} thousand" + (f" {_en_below_1000(r)}" if r else "")


def _fr_below_100(n: int, final: bool) -> str:
    """``final``: nothing follows (``quatre-vingts`` keeps its s only then)."""
    if n < 17:
        return _FR_UNITS[n]
    if n < 20:
        return "dix-" + _FR_UNITS[n - 10]
    t, u = divmod(n, 10)
    if t <= 6:
        base = _FR_TENS[t]
        return base if u == 0 else base + (" et un" if u == 1 else "-" + _FR_UNITS[u])
    if t == 7:  # 70..79 = soixante + 10..19
        return "soixante et onze" if u == 1 else "soixante-" + _fr_below_100(10 + u, final)
    if t == 8:
        return ("quatre-vingts" if final else "quatre-vingt") if u == 0 else "quatre-vingt-" + _FR_UNITS[u]
    return "quatre-vingt-" + _fr_below_100(10 + u, final)  # 90..99


def _fr_below_1000(n: int, final: bool) -> str:
    h, r = divmod(n, 100)
    if not h:
        return _fr_below_100(r, final)
    hundreds = "cent" if h == 1 else f"{_FR_UNITS[h]} cent"
    if r == 0:
        return hundreds + ("s" if h > 1 and final else "")
    return f"{hundreds} {_fr_below_100(r, final)}"


def french(n: int) -> str:
    """``n`` (0..999,999) in French words, traditional spelling (as ``num2words(n, lang="fr")``)."""
    th, r = divmod(_check(n), 1000)
    if not th:
        return _fr_below_1000(r, True)
    thousands = "mille" if th == 1 else f"{_fr_below_1000(th, False)} mille"
    return thousands + (f" {_fr_below_1000(r, True)}" if r else "")


LANGUAGES = {"en": english, "fr": french}
