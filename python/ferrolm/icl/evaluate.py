"""k-shot evaluation: for each query, retrieve k demonstrations from a pool, render the prompt,
score every label word as a continuation (one shared context per query, so the choices reuse
its cache), predict the best, and report accuracy and macro-F1 — or, for an exact-match task,
generate greedily to the end of the line and compare with the answer; sweeps over k and seeds
give a mean and a confidence interval per k, as a table, JSON and a plot.

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): with ``calibrate=True`` the
label probabilities of each prompt are divided by those the same demonstrations give a
content-free input (the mean over ``"N/A"``, ``""`` and ``"[MASK]"``), which removes the
majority-label and recency biases of the prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._io import PathLike, atomic_write
from .._plot import pyplot, save_figure
from ..metrics import accuracy, macro_f1, mean_ci
from .lm import LM
from .prompts import Example, Template
from .retrieve import BM25Retriever, FixedRetriever, RandomRetriever, TopKRetriever, VoteKRetriever, order_demos

__all__ = [
    "ClassificationResult",
    "evaluate_classification",
    "evaluate_exact_match",
    "evaluate_task",
    "kshot_sweep",
    "task_sweep",
    "SweepResult",
]

RETRIEVERS = ("random", "fixed", "bm25", "topk", "mmr", "votek")
#: The content-free inputs of contextual calibration (Zhao et al. 2021).
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass
class ClassificationResult:
    """One evaluation: the metrics, each query's prediction and the demonstrations used
    (``macro_f1`` is None for an exact-match task)."""

    k: int
    seed: int
    accuracy: float
    macro_f1: Optional[float]
    predictions: List[Any] = field(default_factory=list)
    demonstrations: List[List[int]] = field(default_factory=list)
    truncated: int = 0


def _retrieve(
    kind: str,
    tokenizer,
    pool: Sequence[Example],
    queries: Sequence[Example],
    k: int,
    seed: int,
    query_pool_index,
    embed: Optional[Callable],
) -> List[List[int]]:
    if kind == "random":
        return RandomRetriever(len(pool), seed).retrieve(len(queries), k, query_pool_index)
    if kind == "fixed":
        return FixedRetriever(len(pool), RandomRetriever(len(pool), seed).retrieve(1, min(k, len(pool)))[0]).retrieve(
            len(queries), k, query_pool_index
        )
    if kind == "bm25":
        enc = tokenizer.encode_ordinary_batch
        return BM25Retriever(enc([e.input for e in pool])).retrieve(
            enc([q.input for q in queries]), k, query_pool_index
        )
    if kind == "votek":
        if embed is None:
            raise ValueError(
                "the 'votek' retriever needs embed= (for example ferrolm.icl.retrieve.model_embedder(model, tokenizer))"
            )
        return VoteKRetriever(embed=embed, pool_items=[e.input for e in pool]).retrieve(
            len(queries), k, query_pool_index
        )
    if kind in ("topk", "mmr"):
        if embed is None:
            raise ValueError(
                f"the {kind!r} retriever needs embed= "
                "(for example ferrolm.icl.retrieve.model_embedder(model, tokenizer))"
            )
        r = TopKRetriever(embed=embed, pool_items=[e.input for e in pool], mmr_lambda=0.5 if kind == "mmr" else None)
        return r.retrieve([q.input for q in queries], k, query_pool_index)
    raise ValueError(f"unknown retriever {kind!r}; choose from {RETRIEVERS}")


def evaluate_classification(
    lm: LM,
    tokenizer,
    pool: Sequence[Example],
    queries: Sequence[Example],
    template: Template,
    k: int,
    retriever: str = "random",
    seed: int = 0,
    order: str = "most_relevant_last",
    query_pool_index: Optional[Sequence[int]] = None,
    embed: Optional[Callable] = None,
    normalise: bool = False,
    calibrate: bool = False,
    demonstrations: Optional[Sequence[Sequence[int]]] = None,
) -> ClassificationResult:
    """Accuracy and macro-F1 of k-shot classification by label-word likelihood.

    Args:
        lm: a :class:`~ferrolm.icl.LM`. tokenizer: a :class:`ferrolm.Tokenizer` (or anything
            with ``encode_ordinary`` / ``encode_ordinary_batch``).
        pool: demonstration candidates; queries: the examples to classify (their ``output``
            is the gold label, a key of ``template.label_words``).
        k: demonstrations per prompt. retriever: one of ``RETRIEVERS``. seed: retrieval seed.
        query_pool_index: each query's index in ``pool`` when it is drawn from it (never
            shown to itself).
        normalise: rank choices by mean log-prob per token instead of the sum.
        calibrate: contextual calibration (Zhao et al. 2021): divide the label probabilities by
            those of the same prompt with a content-free input (:data:`CONTENT_FREE`).
        demonstrations: instead of a retriever, each query's pool indices (k of them, in the
            order ``order`` arranges; ``order="as_is"`` shows them as given).

    Raises:
        ValueError: ``demonstrations`` not one list of k pool indices per query.
    """
    labels = template.choices()
    if demonstrations is None:
        demos = _retrieve(retriever, tokenizer, pool, queries, k, seed, query_pool_index, embed)
    else:
        demos = [list(d) for d in demonstrations]
        if len(demos) != len(queries) or any(len(d) != k for d in demos):
            raise ValueError(f"demonstrations must hold {len(queries)} lists (one per query) of k={k} pool indices")
        if any(not 0 <= i < len(pool) for d in demos for i in d):
            raise ValueError(f"demonstrations hold pool indices outside [0, {len(pool)})")
    words = [tokenizer.encode_ordinary(template.label_words[c]) for c in labels]  # type: ignore[index]
    if any(not w for w in words):
        raise ValueError("every label word must encode to at least one token")
    prompts = [
        template.render([pool[i] for i in order_demos(d, order)], Example(q.input, None, q.fields))
        for q, d in zip(queries, demos)
    ]
    answers = lm.multiple_choice(
        [(ctx, words) for ctx in tokenizer.encode_ordinary_batch(prompts)], normalise=normalise
    )
    preds = [labels[best] for best, _ in answers]
    if calibrate:
        shown = [tuple(order_demos(d, order)) for d in demos]
        prior = _content_free_logprobs(lm, tokenizer, pool, template, sorted(set(shown)), words, normalise)
        preds = []
        for (_, rs), d in zip(answers, shown):
            lp = _label_logprobs([r.mean_logprob if normalise else r.logprob for r in rs])
            scores = [a - b for a, b in zip(lp, prior[d])]
            preds.append(labels[max(range(len(labels)), key=lambda j: (scores[j], -j))])
    truncated = sum(rs[0].truncated for _, rs in answers)
    gold = [q.output for q in queries]
    return ClassificationResult(k, seed, accuracy(preds, gold), macro_f1(preds, gold, labels), preds, demos, truncated)


def _label_logprobs(scores: Sequence[float]) -> List[float]:
    """Log-probabilities renormalised over the labels (log-softmax of the label scores)."""
    m = max(scores)
    z = m + math.log(sum(math.exp(x - m) for x in scores))
    return [x - z for x in scores]


def _content_free_logprobs(
    lm: LM,
    tokenizer,
    pool: Sequence[Example],
    template: Template,
    demo_sets: Sequence[Tuple[int, ...]],
    words: List[List[int]],
    normalise: bool,
) -> Dict[Tuple[int, ...], List[float]]:
    """Per demonstration set (pool indices in prompt order): the log of the label distribution
    that a content-free query gets, averaged over :data:`CONTENT_FREE` in probability space."""
    prompts = [template.render([pool[i] for i in d], Example(cf, None)) for d in demo_sets for cf in CONTENT_FREE]
    answers = lm.multiple_choice(
        [(ctx, words) for ctx in tokenizer.encode_ordinary_batch(prompts)], normalise=normalise
    )
    out = {}
    n = len(CONTENT_FREE)
    for j, d in enumerate(demo_sets):
        probs = [0.0] * len(words)
        for _, rs in answers[j * n : (j + 1) * n]:
            lp = _label_logprobs([r.mean_logprob if normalise else r.logprob for r in rs])
            probs = [p + math.exp(x) / n for p, x in zip(probs, lp)]
        out[d] = [math.log(max(p, 1e-300)) for p in probs]
    return out


def evaluate_exact_match(
    lm: LM,
    tokenizer,
    pool: Sequence[Example],
    queries: Sequence[Example],
    template: Template,
    k: int,
    retriever: str = "random",
    seed: int = 0,
    order: str = "most_relevant_last",
    query_pool_index: Optional[Sequence[int]] = None,
    embed: Optional[Callable] = None,
    answers: Optional[Callable[[Example], List[str]]] = None,
    stop: str = "\n",
) -> ClassificationResult:
    """Exact-match accuracy of k-shot generation: the greedy continuation of each prompt, cut at
    ``stop`` and stripped, equals the query's ``output`` (or any string ``answers(query)`` gives).

    Args: as :func:`evaluate_classification`; ``tokenizer`` also decodes the generations. The
    generation budget is the longest answer's token count plus 2.
    """
    demos = _retrieve(retriever, tokenizer, pool, queries, k, seed, query_pool_index, embed)
    accepted = [answers(q) if answers is not None else [str(q.output)] for q in queries]
    budget = max(len(tokenizer.encode_ordinary(" " + a)) for acc in accepted for a in acc) + 2
    prompts = [
        template.render([pool[i] for i in order_demos(d, order)], Example(q.input, None, q.fields))
        for q, d in zip(queries, demos)
    ]
    ids = tokenizer.encode_ordinary_batch(prompts)
    texts = lm.generate_until([(x, [stop], budget) for x in ids], tokenizer)
    preds = [t.strip() for t in texts]
    right = [p in {a.strip() for a in acc} for p, acc in zip(preds, accepted)]
    truncated = sum(lm.max_length is not None and len(x) + budget > lm.max_length for x in ids)
    return ClassificationResult(k, seed, sum(right) / max(1, len(right)), None, preds, demos, truncated)


def evaluate_task(lm: LM, tokenizer, task, k: int, **kwargs) -> ClassificationResult:
    """:func:`evaluate_classification` or :func:`evaluate_exact_match` of a
    :class:`~ferrolm.icl.tasks.Task`'s test set with demonstrations from its pool."""
    if task.scoring == "classification":
        return evaluate_classification(lm, tokenizer, task.pool, task.test, task.template, k, **kwargs)
    kwargs.pop("calibrate", None)  # calibration applies to a choice among labels only
    kwargs.pop("normalise", None)
    return evaluate_exact_match(lm, tokenizer, task.pool, task.test, task.template, k, answers=task.answers, **kwargs)


@dataclass
class SweepResult:
    """Per k: the runs (one per seed) and the mean accuracy with its 95% interval."""

    runs: List[ClassificationResult]

    def table(self) -> List[Dict[str, float]]:
        """Per k: the mean accuracy over seeds, its Student-t 95% interval over seeds (``ci_*``,
        clipped to [0, 1]; the mean itself for one seed), and the Wilson 95% interval of all the
        answers pooled (``wilson_*``: the test questions' sampling error, meaningful for one seed
        too)."""
        from scipy.stats import binomtest

        rows = []
        for k in sorted({r.k for r in self.runs}):
            runs = [r for r in self.runs if r.k == k]
            acc = [r.accuracy for r in runs]
            f1 = [r.macro_f1 for r in runs if r.macro_f1 is not None]
            m, lo, hi = mean_ci(acc)
            answers = sum(len(r.predictions) for r in runs)
            right = round(sum(r.accuracy * len(r.predictions) for r in runs))
            wl, wh = (m, m)
            if answers:
                ci = binomtest(right, answers).proportion_ci(0.95, method="wilson")
                wl, wh = float(ci.low), float(ci.high)
            rows.append(
                {
                    "k": k,
                    "seeds": len(acc),
                    "accuracy": m,
                    "ci_low": max(0.0, lo),
                    "ci_high": min(1.0, hi),
                    "answers": answers,
                    "wilson_low": wl,
                    "wilson_high": wh,
                    "macro_f1": sum(f1) / len(f1) if f1 else None,
                }
            )
        return rows

    def markdown(self) -> str:
        lines = ["| k | seeds | accuracy (mean) | 95% CI | macro-F1 |", "|---|---|---|---|---|"]
        for r in self.table():
            f1 = "—" if r["macro_f1"] is None else f"{r['macro_f1']:.4f}"
            lines.append(
                f"| {r['k']} | {r['seeds']} | {r['accuracy']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {f1} |"
            )
        return "\n".join(lines) + "\n"

    def save_json(self, path: PathLike) -> None:
        payload = {"table": self.table(), "runs": [asdict(r) for r in self.runs]}
        atomic_write(path, json.dumps(payload, indent=2, default=str).encode())

    def plot(self, path: PathLike, title: str = "in-context learning: accuracy vs k") -> None:
        plt = pyplot()
        t = self.table()
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = [r["k"] for r in t]
        ax.plot(ks, [r["accuracy"] for r in t], marker="o")
        ax.fill_between(ks, [r["ci_low"] for r in t], [r["ci_high"] for r in t], alpha=0.25)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("demonstrations k")
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        fig.tight_layout()
        save_figure(fig, path)


def kshot_sweep(
    lm: LM,
    tokenizer,
    pool: Sequence[Example],
    queries: Sequence[Example],
    template: Template,
    ks: Sequence[int] = (0, 1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    progress: bool = True,
    **kwargs,
) -> SweepResult:
    """:func:`evaluate_classification` for every k and seed (k = 0 runs once: it has no
    demonstrations to vary)."""
    plan = [(k, s) for k in ks for s in (seeds if k > 0 else list(seeds)[:1])]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="k-shot", unit="run")
    runs = []
    for k, s in plan:
        runs.append(evaluate_classification(lm, tokenizer, pool, queries, template, k, seed=s, **kwargs))
        if bar is not None:
            bar.set_postfix(k=k, acc=f"{runs[-1].accuracy:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    return SweepResult(runs)


def task_sweep(
    lm: LM,
    tokenizer,
    task,
    ks: Sequence[int] = (0, 1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    progress: bool = True,
    **kwargs,
) -> SweepResult:
    """:func:`evaluate_task` for every k and seed (k = 0 runs once), as :func:`kshot_sweep`."""
    plan = [(k, s) for k in ks for s in (seeds if k > 0 else list(seeds)[:1])]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc=task.name, unit="run")
    runs = []
    for k, s in plan:
        runs.append(evaluate_task(lm, tokenizer, task, k, seed=s, **kwargs))
        if bar is not None:
            bar.set_postfix(k=k, acc=f"{runs[-1].accuracy:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    return SweepResult(runs)
