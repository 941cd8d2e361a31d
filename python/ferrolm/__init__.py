"""ferrolm: language models on ordinary CPUs, with the hot paths in Rust.

The public API: :class:`Tokenizer` (byte-level BPE), the embedded default corpus
(:mod:`ferrolm.corpus`), batching (:mod:`ferrolm.data`) and the exceptions in
:mod:`ferrolm.errors`; with torch installed also :mod:`ferrolm.nn`, :mod:`ferrolm.ops`,
:mod:`ferrolm.models`, :mod:`ferrolm.train`, :mod:`ferrolm.generate` and
:mod:`ferrolm.reference` (imported on use, so the tokenizer works without torch).
"""

from . import corpus, data
from ._core import __version__
from .errors import FormatError, UnknownTokenError
from .tokenizer import CL100K_PATTERN, GPT2_PATTERN, PATTERNS, Tokenizer

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
]
