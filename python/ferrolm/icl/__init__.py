"""In-context learning toolkit (语境学习).

- :class:`LM` — one adapter over ferrolm's GPT / LSTM LM and transformers causal LMs for the
  scoring requests (``loglikelihood`` with a shared-prefix cache, ``loglikelihood_rolling``).
- :mod:`~ferrolm.icl.prompts` — :class:`Example`, :func:`load_examples`, :class:`Template`.
- :mod:`~ferrolm.icl.retrieve` — random, fixed, BM25 (Rust), top-k embedding, MMR and vote-k retrievers.
- :mod:`~ferrolm.icl.evaluate` — k-shot classification (optionally calibrated) and exact match,
  and sweeps over k and seeds.
- :mod:`~ferrolm.icl.tasks` — a task suite built from data shipped in packages (:func:`load_task`).
- :mod:`ferrolm.icl.lm_eval_backend` — ``--model ferrolm`` for lm-evaluation-harness (imported
  on demand: it needs ``lm-eval``).
"""

from .evaluate import (
    ClassificationResult,
    SweepResult,
    evaluate_classification,
    evaluate_exact_match,
    evaluate_task,
    kshot_sweep,
    task_sweep,
)
from .lm import LM, LogLikelihood
from .prompts import Example, Template, load_examples
from .retrieve import (
    BM25Retriever,
    FixedRetriever,
    RandomRetriever,
    TopKRetriever,
    VoteKRetriever,
    model_embedder,
    order_demos,
)
from .tasks import Task, load_task, task_names

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
    "VoteKRetriever",
    "model_embedder",
    "order_demos",
    "evaluate_classification",
    "evaluate_exact_match",
    "evaluate_task",
    "kshot_sweep",
    "task_sweep",
    "Task",
    "load_task",
    "task_names",
    "ClassificationResult",
    "SweepResult",
]
