"""ICL tasks built from real data that ships inside packages, offline.

- :func:`load_task` / :data:`TASKS`: the suite of the ICL literature's kinds (number words,
  country facts, inflection, articles, letters, arithmetic; exact match or classification with
  natural label words), each with a fixed pool/test split and a one-line description. Their data
  come from `num2words <https://pypi.org/project/num2words/>`_, `babel
  <https://pypi.org/project/babel/>`_ (the Unicode CLDR: country names, currencies, languages, time
  zones, unit names) and `inflect <https://pypi.org/project/inflect/>`_ (``pip install
  "ferrolm[tasks]"``); a task whose package is missing raises ModuleNotFoundError naming it.
- :func:`stdlib_package_task`: the default task of ``ferrolm icl eval``, from data present on every
  machine: which standard-library package a short source snippet comes from (``email``, ``json``,
  ``asyncio``, ...). Snippets are lines of real code and docstrings cut from the running
  interpreter's standard library; the choice of files, positions and the pool/test split is a pure
  function of the seed, so the task is the same on every run of the same Python version.
"""

from __future__ import annotations

import importlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .prompts import Example, Template

__all__ = ["Task", "TASKS", "load_task", "task_names", "stdlib_package_task", "DEFAULT_PACKAGES"]

DEFAULT_PACKAGES = ("asyncio", "email", "json", "unittest", "xml", "http")


def _snippets(files: List[Path], n: int, rng: np.random.Generator, lines: int = 3, max_chars: int = 160) -> List[str]:
    out: List[str] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        f = files[int(rng.integers(len(files)))]
        try:
            text = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        body = [ln.strip() for ln in text if ln.strip() and not ln.strip().startswith("#")]
        if len(body) < lines:
            continue
        i = int(rng.integers(len(body) - lines + 1))
        snippet = " ".join(body[i : i + lines])[:max_chars]
        if len(snippet) >= 20 and snippet not in out:
            out.append(snippet)
    return out


def stdlib_package_task(
    packages: Sequence[str] = DEFAULT_PACKAGES, per_class: int = 40, test_per_class: int = 10, seed: int = 0
) -> Tuple[List[Example], List[Example], Template]:
    """``(pool, test, template)`` for classifying a snippet by its standard-library package.

    Args:
        packages: package folders of the standard library (the labels; their names are the
            label words). per_class: pool examples per package. test_per_class: test
            examples per package (disjoint from the pool).

    Raises:
        ValueError: a package that this Python's standard library lacks.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(seed)
    pool: List[Example] = []
    test: List[Example] = []
    for pkg in packages:
        files = sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []
        files = [f for f in files if "test" not in f.relative_to(root).parts[1:]]
        if not files:
            raise ValueError(f"the standard library here has no package {pkg!r} (at {root / pkg})")
        snips = _snippets(files, per_class + test_per_class, rng)
        if len(snips) < per_class + test_per_class:
            raise ValueError(f"package {pkg!r} gave only {len(snips)} snippets; lower per_class")
        pool += [Example(s, pkg) for s in snips[:per_class]]
        test += [Example(s, pkg) for s in snips[per_class:]]
    order = rng.permutation(len(pool))
    pool = [pool[i] for i in order]
    words: Dict[str, str] = {p: " " + p for p in packages}
    template = Template(
        demo="Code: {input}\nPackage:{label}", query="Code: {input}\nPackage:", separator="\n\n", label_words=words
    )
    return pool, test, template


# --------------------------------------------------------------------------- the task suite


@dataclass(frozen=True)
class Task:
    """One ICL task: demonstrations are drawn from ``pool``, ``test`` are the queries.

    ``scoring`` is ``"classification"`` (the template's ``label_words`` are the choices, scored by
    likelihood) or ``"exact_match"`` (greedy generation up to the end of the line, compared with
    ``output`` or any of the example's ``fields["answers"]``).
    """

    name: str
    description: str
    source: str
    scoring: str
    pool: List[Example]
    test: List[Example]
    template: Template

    def answers(self, ex: Example) -> List[str]:
        """Every accepted answer of an exact-match example."""
        return [str(ex.output)] + [str(a) for a in ex.fields.get("answers", ())]


QA = dict(demo="Q: {input}\nA: {output}", query="Q: {input}\nA:", separator="\n\n")
QA_LABEL = dict(demo="Q: {input}\nA:{label}", query="Q: {input}\nA:", separator="\n\n")


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(
            f"this task's data comes from the {package} package, which is not installed: "
            f'pip install {package}  (or pip install "ferrolm[tasks]")',
            name=module,
        ) from None


def _split(items: List[Tuple[str, str, dict]], n_test: int, max_pool: int, seed: int = 0):
    """Deterministic pool/test split of (input, output, fields) items: sorted, then shuffled
    with a fixed seed; the first ``n_test`` are the test set, up to ``max_pool`` of the rest the pool."""
    items = sorted(set((i, o, tuple(sorted(f.items()))) for i, o, f in items))
    n_test = min(n_test, len(items) // 3)
    order = np.random.default_rng(seed).permutation(len(items))
    ex = [Example(items[j][0], items[j][1], dict(items[j][2])) for j in order]
    return ex[n_test : n_test + max_pool], ex[:n_test]


def _countries() -> Dict[str, str]:
    """ISO 3166 alpha-2 code -> English short name, from the CLDR (babel)."""
    babel = _need("babel", "babel")
    names = babel.Locale("en").territories
    zones = babel.core.get_global("territory_zones")
    return {c: names[c] for c in sorted(zones) if len(c) == 2 and c.isalpha() and c in names}


def _number_words(lang: str):
    num2words = _need("num2words", "num2words")

    def items(n_max: int = 1000):
        return [(str(n), num2words.num2words(n, lang=lang), {}) for n in range(n_max)]

    return items()


def _country_currency():
    babel = _need("babel", "babel")
    from babel.numbers import get_currency_name, get_territory_currencies

    out = []
    for code, name in _countries().items():
        cur = get_territory_currencies(code)
        if cur:
            out.append((name, get_currency_name(cur[0], locale="en"), {}))
    del babel
    return out


def _country_language():
    babel = _need("babel", "babel")
    langs = babel.Locale("en").languages
    table = babel.core.get_global("territory_languages")
    out = []
    for code, name in _countries().items():
        spoken = [
            (info.get("population_percent") or 0.0, lang)
            for lang, info in table.get(code, {}).items()
            if info.get("official_status") in ("official", "de_facto_official") and lang in langs
        ]
        if spoken:
            out.append((name, langs[max(spoken)[1]], {}))
    return out


def _country_french():
    babel = _need("babel", "babel")
    fr = babel.Locale("fr").territories
    return [(name, fr[code], {}) for code, name in _countries().items() if code in fr and fr[code] != name]


CONTINENTS = {"Europe": "Europe", "Africa": "Africa", "Asia": "Asia", "America": "America", "Australia": "Oceania"}
CONTINENTS["Pacific"] = "Oceania"


def _country_continent():
    babel = _need("babel", "babel")
    zones = babel.core.get_global("territory_zones")
    out = []
    for code, name in _countries().items():
        regions = {CONTINENTS.get(z.split("/")[0]) for z in zones.get(code, ())}
        if len(regions) == 1 and None not in regions:
            out.append((name, regions.pop(), {}))
    return out


def _plural():
    babel = _need("babel", "babel")
    inflect = _need("inflect", "inflect")
    out = []
    for key, forms in babel.Locale("en")._data["unit_patterns"].items():
        long = forms.get("long") if "long" in forms else None
        one, other = (long.get("one"), long.get("other")) if long is not None else (None, None)
        if not (one and other and one.startswith("{0} ") and other.startswith("{0} ")):
            continue
        a, b = one[4:], other[4:]
        if a.isalpha() and b.isalpha() and a.islower() and b.islower():
            out.append((a, b, {}))
    for a, b in inflect.pl_sb_irregular.items():
        if a.isalpha() and a.islower():
            first, *rest = b.split("|")
            out.append((a, first, {"answers": tuple(rest)} if rest else {}))
    seen, unique = set(), []
    for a, b, f in sorted(out, key=lambda t: (t[0], -len(t[2]))):
        if a not in seen:
            seen.add(a)
            unique.append((a, b, f))
    return unique


def _article():
    inflect = _need("inflect", "inflect")
    babel = _need("babel", "babel")
    p = inflect.engine()
    words = {w for w, _, _ in _plural()}
    words |= {n for n in babel.Locale("en").languages.values() if n.isalpha()}
    words |= {n for n in _countries().values() if n.isalpha()}
    tagged = [(w, p.a(w).split(" ", 1)[0].lower(), {}) for w in sorted(words)]
    # As many "a" words as "an" words (a fixed draw), so that always answering "a" scores 50%.
    an = [t for t in tagged if t[1] == "an"]
    a = [t for t in tagged if t[1] == "a"]
    keep = np.random.default_rng(7).permutation(len(a))[: len(an)]
    return an + [a[i] for i in sorted(keep)]


def _first_letter():
    return [(name, name[0], {}) for name in _countries().values() if name[:1].isalpha()]


def _addition():
    rng = np.random.default_rng(12345)
    pairs = {(int(a), int(b)) for a, b in rng.integers(10, 100, size=(1500, 2))}
    return [(f"{a} + {b}", str(a + b), {}) for a, b in sorted(pairs)]


def _parity():
    rng = np.random.default_rng(54321)
    nums = sorted({int(n) for n in rng.integers(100, 10000, size=800)})
    return [(str(n), "even" if n % 2 == 0 else "odd", {}) for n in nums]


@dataclass(frozen=True)
class _Spec:
    description: str
    source: str
    scoring: str
    items: Callable[[], List[Tuple[str, str, dict]]]
    labels: Optional[Tuple[str, ...]] = None


#: name -> how the task is built; :func:`load_task` builds it.
TASKS: Dict[str, _Spec] = {
    "number_french": _Spec(
        "a number written in digits -> the number in French words (42 -> quarante-deux)",
        "num2words",
        "exact_match",
        lambda: _number_words("fr"),
    ),
    "number_english": _Spec(
        "a number written in digits -> the number in English words (42 -> forty-two)",
        "num2words",
        "exact_match",
        lambda: _number_words("en"),
    ),
    "country_currency": _Spec(
        "a country -> the name of its currency (Japan -> Japanese Yen)",
        "babel (CLDR)",
        "exact_match",
        _country_currency,
    ),
    "country_language": _Spec(
        "a country -> its most spoken official language (Brazil -> Portuguese)",
        "babel (CLDR)",
        "exact_match",
        _country_language,
    ),
    "country_french": _Spec(
        "a country's English name -> its French name (Germany -> Allemagne)",
        "babel (CLDR)",
        "exact_match",
        _country_french,
    ),
    "country_continent": _Spec(
        "a country -> its continent, 5 classes (Kenya -> Africa)",
        "babel (CLDR time zones)",
        "classification",
        _country_continent,
        ("Africa", "America", "Asia", "Europe", "Oceania"),
    ),
    "plural": _Spec(
        "an English noun -> its plural (child -> children, century -> centuries)",
        "babel (CLDR unit names), inflect",
        "exact_match",
        _plural,
    ),
    "article": _Spec(
        "a word -> the indefinite article it takes, 2 classes (hour -> an, unicorn -> a)",
        "inflect",
        "classification",
        _article,
        ("a", "an"),
    ),
    "first_letter": _Spec(
        "a country's name -> its first letter (Peru -> P)", "babel (CLDR)", "exact_match", _first_letter
    ),
    "addition": _Spec(
        "the sum of two two-digit numbers (23 + 58 -> 81)", "generated (fixed seed)", "exact_match", _addition
    ),
    "parity": _Spec(
        "a number -> even or odd, 2 classes (347 -> odd)",
        "generated (fixed seed)",
        "classification",
        _parity,
        ("even", "odd"),
    ),
}


def task_names() -> List[str]:
    """The names of the task suite, sorted."""
    return sorted(TASKS)


def load_task(name: str, n_test: int = 100, max_pool: int = 400) -> Task:
    """The task ``name`` of the suite (see :data:`TASKS`), with a fixed pool/test split.

    Args:
        n_test: test examples (the first of a fixed shuffle, the same for every call; a third of
            the task's examples when it has fewer than ``3 * n_test``).
        max_pool: at most this many pool examples (the rest of the shuffle).

    Raises:
        ValueError: an unknown name (the message lists the names).
        ModuleNotFoundError: the package holding the task's data is not installed.

    Example:
        >>> t = load_task("addition", n_test=20)
        >>> t.scoring, len(t.test), t.template.render([t.pool[0]], t.test[0]).count("Q:")
        ('exact_match', 20, 2)
    """
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown ICL task {name!r}; the tasks are: {', '.join(task_names())}")
    items = spec.items()
    pool, test = _split(items, n_test, max_pool)
    if spec.labels is not None:
        template = Template(**QA_LABEL, label_words={lab: " " + lab for lab in spec.labels})
    else:
        template = Template(**QA)
    return Task(name, spec.description, spec.source, spec.scoring, pool, test, template)
