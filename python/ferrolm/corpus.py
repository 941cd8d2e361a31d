"""The embedded default corpus: the running interpreter's standard library sources (real code
and English prose, present on every machine, nothing downloaded) plus Chinese prose shipped
with the package.
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

__all__ = ["stdlib_files", "stdlib_texts", "chinese_text", "default_corpus"]


def stdlib_files() -> List[Path]:
    """Returns the standard library's ``.py`` files, sorted by path (site-packages excluded).

    Example:
        >>> files = stdlib_files()
        >>> files[0].suffix
        '.py'
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_texts(max_bytes: Optional[int] = None) -> List[str]:
    """Returns the standard library sources as strings, in a fixed order.

    Args:
        max_bytes: stop once this many UTF-8 bytes are collected (None: all, ~30 MB).

    Returns:
        One string per file; files that are not valid UTF-8 are skipped.
    """
    out: List[str] = []
    total = 0
    for p in stdlib_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    return out


@lru_cache(maxsize=1)
def chinese_text() -> str:
    """Returns the Chinese prose shipped with ferrolm (simplified and traditional, with
    full-width digits, punctuation, mixed code and emoji)."""
    return (Path(__file__).parent / "_assets" / "zh.txt").read_text(encoding="utf-8")


def default_corpus(max_bytes: Optional[int] = None) -> List[str]:
    """Returns the default corpus: the Chinese text, then the standard library sources.

    Example:
        >>> docs = default_corpus(max_bytes=100_000)
        >>> len(docs) > 1
        True
    """
    return [chinese_text()] + stdlib_texts(max_bytes)
