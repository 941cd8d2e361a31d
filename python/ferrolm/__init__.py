"""ferrolm: language models on ordinary CPUs, with the hot paths in Rust.

Imported at once (no torch needed): :class:`Tokenizer` (byte-level BPE), the embedded default
corpus (:mod:`ferrolm.corpus`), batching (:mod:`ferrolm.data`) and the exceptions
(:mod:`ferrolm.errors`). The layers that need torch load on first use, so ``import ferrolm``
stays light: :mod:`ferrolm.kernels` (autograd Functions over the Rust kernels) ->
:mod:`ferrolm.nn` (modules) -> :mod:`ferrolm.models` (one file per architecture) ->
:mod:`ferrolm.decoding`, :mod:`ferrolm.training`, :mod:`ferrolm.icl`, :mod:`ferrolm.finetune`,
:mod:`ferrolm.metrics` -> :mod:`ferrolm.recipes` (the experiments behind ``docs/results``);
:mod:`ferrolm.testing` holds the pure-torch reference twins and :mod:`ferrolm.bench` the
benchmark suite.

Example:
    >>> import ferrolm
    >>> tok = ferrolm.Tokenizer.train(["hello world"] * 10, vocab_size=260)
    >>> tok.decode(tok.encode("hello"))
    'hello'
"""

from __future__ import annotations

import importlib
from typing import Any, List

from . import corpus, data
from ._core import __version__
from .errors import FormatError, UnknownTokenError
from .tokenizer import CL100K_PATTERN, GPT2_PATTERN, PATTERNS, Tokenizer

#: Subpackages and modules imported on first attribute access (``ferrolm.models``, ...).
_LAZY = (
    "kernels",
    "nn",
    "models",
    "decoding",
    "training",
    "finetune",
    "metrics",
    "icl",
    "recipes",
    "testing",
    "bench",
    "cli",
)

__all__ = [
    "Tokenizer",
    "FormatError",
    "UnknownTokenError",
    "GPT2_PATTERN",
    "CL100K_PATTERN",
    "PATTERNS",
    "corpus",
    "data",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'ferrolm' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
