"""In-context learning toolkit (语境学习): scoring requests against any causal LM with
shared-prefix reuse (:class:`LM`). Prompts, retrievers, metrics and k-shot evaluation build on
it (in progress; see the issue tracker)."""

from .lm import LM, LogLikelihood

__all__ = ["LM", "LogLikelihood"]
