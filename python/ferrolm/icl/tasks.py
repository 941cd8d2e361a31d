"""The embedded default ICL task, built from data present on every machine: which standard-
library package a short source snippet comes from (``email``, ``json``, ``asyncio``, ...).

Snippets are lines of real code and docstrings cut from the running interpreter's standard
library; the choice of files, positions and the pool/test split is a pure function of the seed,
so the task is the same on every run of the same Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .prompts import Example, Template

__all__ = ["stdlib_package_task", "DEFAULT_PACKAGES"]

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
