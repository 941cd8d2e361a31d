"""Exceptions raised by ferrolm.

Every error names what was wrong, what was received and what was expected. The classes derive
from the builtin exceptions users already catch.
"""

from __future__ import annotations

__all__ = ["FormatError", "UnknownTokenError"]


class FormatError(ValueError):
    """A file or buffer does not follow its format (corrupt, truncated or unsupported)."""


class UnknownTokenError(KeyError, ValueError):
    """A token id or token string that the vocabulary does not have.

    It is both a ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad argument value), so
    either ``except`` clause catches it.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
