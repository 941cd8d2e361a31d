"""In-context learning toolkit (语境学习).

- :class:`LM` — one adapter over ferrolm's GPT / LSTM LM and transformers causal LMs for the
  scoring requests (``loglikelihood`` with a shared-prefix cache, ``loglikelihood_rolling``).
- :mod:`~ferrolm.icl.prompts` — :class:`Example`, :func:`load_examples`, :class:`Template`.
- :mod:`~ferrolm.icl.retrieve` — random, fixed, BM25 (Rust), top-k embedding and MMR retrievers.
- :mod:`~ferrolm.icl.evaluate` — k-shot classification and sweeps over k and seeds.
"""

from .evaluate import ClassificationResult, SweepResult, evaluate_classification, kshot_sweep
from .lm import LM, LogLikelihood
from .prompts import Example, Template, load_examples
from .retrieve import BM25Retriever, FixedRetriever, RandomRetriever, TopKRetriever, model_embedder, order_demos

__all__ = [
    "LM",
    "LogLikelihood",
    "Example",
    "Template",
    "load_examples",
    "RandomRetriever",
    "FixedRetriever",
    "BM25Retriever",
    "TopKRetriever",
    "model_embedder",
    "order_demos",
    "evaluate_classification",
    "kshot_sweep",
    "ClassificationResult",
    "SweepResult",
]
