"""Demonstration retrievers (OpenICL's set): which k pool examples go before each query.

Every retriever returns, for each query, k indices into the pool, most relevant first (the
prompt order is then chosen by ``order``); a query that is itself in the pool
(``query_pool_index``) never gets itself back. All are deterministic given their seed.

- :class:`RandomRetriever` — k distinct pool examples per query, seeded per (seed, query).
- :class:`FixedRetriever` — the same given examples for every query.
- :class:`BM25Retriever` — Okapi BM25 over token ids, in Rust.
- :class:`TopKRetriever` — nearest neighbours by cosine similarity of embeddings (any callable
  returning vectors, or :func:`model_embedder` for mean-pooled hidden states of a ferrolm
  model), optionally diversified with maximal marginal relevance (``mmr_lambda``).
- :class:`VoteKRetriever` — vote-k (Su et al. 2022, "Selective Annotation Makes Language Models
  Better Few-Shot Learners"; OpenICL's ``VotekRetriever``): one set of representative and
  diverse pool examples, chosen on the pool's k-nearest-neighbour graph, for every query.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

__all__ = [
    "RandomRetriever",
    "FixedRetriever",
    "BM25Retriever",
    "TopKRetriever",
    "VoteKRetriever",
    "model_embedder",
    "order_demos",
]


def _check_k(k: int, pool: int, excluding_self: bool) -> None:
    avail = pool - (1 if excluding_self else 0)
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if k > avail:
        raise ValueError(f"k={k} exceeds the {avail} pool examples available to a query")


def _excl(query_pool_index: Optional[Sequence[int]], n: int) -> List[int]:
    if query_pool_index is None:
        return [-1] * n
    ex = [int(i) if i is not None else -1 for i in query_pool_index]
    if len(ex) != n:
        raise ValueError(f"query_pool_index has {len(ex)} entries for {n} queries")
    return ex


class RandomRetriever:
    """k distinct random pool examples per query; query q with seed s always gets the same."""

    def __init__(self, pool_size: int, seed: int = 0) -> None:
        self.pool_size, self.seed = int(pool_size), int(seed)

    def retrieve(self, n_queries: int, k: int, query_pool_index: Optional[Sequence[int]] = None) -> List[List[int]]:
        ex = _excl(query_pool_index, n_queries)
        _check_k(k, self.pool_size, any(e >= 0 for e in ex))
        out = []
        for q in range(n_queries):
            rng = np.random.default_rng([self.seed, q])
            cand = rng.permutation(self.pool_size)
            out.append([int(i) for i in cand if i != ex[q]][:k])
        return out


class FixedRetriever:
    """The same demonstrations (pool indices, in order) for every query; a query found among
    them is replaced by the next unused index of ``fallback`` order (0, 1, 2, ...)."""

    def __init__(self, pool_size: int, indices: Sequence[int]) -> None:
        self.pool_size = int(pool_size)
        self.indices = [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < self.pool_size]
        if bad:
            raise ValueError(f"fixed demonstration indices {bad} are outside the pool of {self.pool_size}")

    def retrieve(self, n_queries: int, k: int, query_pool_index: Optional[Sequence[int]] = None) -> List[List[int]]:
        ex = _excl(query_pool_index, n_queries)
        _check_k(k, self.pool_size, any(e >= 0 for e in ex))
        out = []
        for q in range(n_queries):
            chosen = [i for i in self.indices if i != ex[q]][:k]
            extra = (i for i in range(self.pool_size) if i != ex[q] and i not in chosen)
            while len(chosen) < k:
                chosen.append(next(extra))
            out.append(chosen)
        return out


class BM25Retriever:
    """The k pool examples with the highest BM25 score for the query's token ids.

    Args:
        pool_tokens: token ids of each pool example (what is matched: usually its input).
        k1, b: BM25's term-frequency saturation and length normalisation.
    """

    def __init__(self, pool_tokens: Sequence[Sequence[int]], k1: float = 1.5, b: float = 0.75) -> None:
        from .. import _core

        self.pool_size = len(pool_tokens)
        self._index = _core.Bm25Index(
            [list(map(int, t)) if not isinstance(t, np.ndarray) else t for t in pool_tokens], float(k1), float(b)
        )

    def scores(self, query_tokens: Sequence[int]) -> np.ndarray:
        """(pool,) BM25 scores of every pool example for one query."""
        return self._index.scores(list(map(int, query_tokens)))

    def retrieve(
        self, query_tokens: Sequence[Sequence[int]], k: int, query_pool_index: Optional[Sequence[int]] = None
    ) -> List[List[int]]:
        n = len(query_tokens)
        ex = _excl(query_pool_index, n)
        _check_k(k, self.pool_size, any(e >= 0 for e in ex))
        idx, _ = self._index.top_k([list(map(int, q)) for q in query_tokens], k, ex)
        return [[int(i) for i in row if i >= 0] for row in idx]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (items, dim), got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


class TopKRetriever:
    """Nearest pool examples by cosine similarity of embeddings.

    Args:
        pool_embeddings: (pool, dim) vectors, or ``embed`` and ``pool_texts`` to compute them.
        embed: a callable mapping a list of items to (n, dim) vectors (used for the queries).
        mmr_lambda: None for plain top-k; in [0, 1] for maximal marginal relevance
            (``lambda * sim(query, d) - (1 - lambda) * max sim(d, chosen)``), which trades
            relevance for diversity among the chosen demonstrations.
    """

    def __init__(
        self,
        pool_embeddings=None,
        embed: Optional[Callable] = None,
        pool_items: Optional[Sequence] = None,
        mmr_lambda: Optional[float] = None,
    ) -> None:
        if pool_embeddings is None:
            if embed is None or pool_items is None:
                raise ValueError("give pool_embeddings, or embed and pool_items to compute them")
            pool_embeddings = embed(list(pool_items))
        self.pool = _normalise(pool_embeddings)
        self.pool_size = self.pool.shape[0]
        self.embed = embed
        if mmr_lambda is not None and not 0.0 <= mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda must be in [0, 1], got {mmr_lambda}")
        self.mmr_lambda = mmr_lambda

    def retrieve(self, queries, k: int, query_pool_index: Optional[Sequence[int]] = None) -> List[List[int]]:
        """``queries``: (n, dim) embeddings, or items for ``embed``."""
        q = np.asarray(queries) if isinstance(queries, np.ndarray) else None
        if q is None or q.ndim != 2 or not np.issubdtype(q.dtype, np.floating):
            if self.embed is None:
                raise ValueError("queries must be (n, dim) embeddings when no embed callable was given")
            q = self.embed(list(queries))
        q = _normalise(q)
        if q.shape[1] != self.pool.shape[1]:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the pool's {self.pool.shape[1]}")
        ex = _excl(query_pool_index, q.shape[0])
        _check_k(k, self.pool_size, any(e >= 0 for e in ex))
        sims = q @ self.pool.T  # (n, pool)
        out = []
        for i in range(q.shape[0]):
            s = sims[i].copy()
            if ex[i] >= 0:
                s[ex[i]] = -np.inf
            if self.mmr_lambda is None:
                order = np.lexsort((np.arange(self.pool_size), -s))  # score desc, index asc
                out.append([int(j) for j in order[:k]])
                continue
            chosen: List[int] = []
            pair = self.pool @ self.pool.T
            for _ in range(k):
                if chosen:
                    penalty = pair[:, chosen].max(axis=1)
                else:
                    penalty = np.zeros(self.pool_size)
                score = self.mmr_lambda * s - (1 - self.mmr_lambda) * penalty
                score[chosen] = -np.inf
                if ex[i] >= 0:
                    score[ex[i]] = -np.inf
                chosen.append(int(np.lexsort((np.arange(self.pool_size), -score))[0]))
            out.append(chosen)
        return out


class VoteKRetriever:
    """Vote-k selection (Su et al. 2022): every pool example votes for its ``n_neighbors``
    nearest neighbours (cosine similarity of embeddings); examples are chosen greedily, each
    time the one whose voters are least covered by earlier choices (a voter that already backs
    ``s`` chosen examples counts ``rho ** -s``). The same k examples go to every query (a query
    found among them is replaced by the next in the vote-k order); ties go to the lower index.

    Args:
        pool_embeddings: (pool, dim) vectors, or ``embed`` and ``pool_items`` to compute them.
        n_neighbors: the graph's k (OpenICL's ``votek_k``, default 3). rho: the discount (10).

    Example:
        >>> two_clusters = [[1, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [0.2, 1]]
        >>> VoteKRetriever(two_clusters, n_neighbors=2).select(2)  # one from each cluster
        [0, 3]
    """

    def __init__(
        self,
        pool_embeddings=None,
        embed: Optional[Callable] = None,
        pool_items: Optional[Sequence] = None,
        n_neighbors: int = 3,
        rho: float = 10.0,
    ) -> None:
        if pool_embeddings is None:
            if embed is None or pool_items is None:
                raise ValueError("give pool_embeddings, or embed and pool_items to compute them")
            pool_embeddings = embed(list(pool_items))
        x = _normalise(pool_embeddings)
        self.pool_size = x.shape[0]
        if not isinstance(n_neighbors, int) or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive int, got {n_neighbors!r}")
        if rho <= 1:
            raise ValueError(f"rho must be > 1 (the discount of a voter already covered), got {rho}")
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        kk = min(n_neighbors, self.pool_size - 1)
        # voters[u]: the examples that have u among their kk nearest neighbours.
        self._votes = np.zeros((self.pool_size, self.pool_size), dtype=bool)  # [voter, candidate]
        for i in range(self.pool_size):
            order = np.lexsort((np.arange(self.pool_size), -sims[i]))[:kk]
            self._votes[i, order] = True
        self.rho = float(rho)
        self._order: List[int] = []

    def select(self, n: int) -> List[int]:
        """The first ``n`` pool indices in vote-k order."""
        if n > self.pool_size:
            raise ValueError(f"cannot select {n} of a pool of {self.pool_size}")
        covered = np.zeros(self.pool_size)  # per voter: chosen examples it voted for
        chosen: List[int] = []
        is_chosen = np.zeros(self.pool_size, dtype=bool)
        while len(chosen) < n:
            weight = np.where(is_chosen, 0.0, self.rho**-covered)  # chosen voters no longer count
            score = weight @ self._votes  # (candidates,)
            score[is_chosen] = -np.inf
            best = int(np.lexsort((np.arange(self.pool_size), -score))[0])
            chosen.append(best)
            is_chosen[best] = True
            covered += self._votes[:, best]
        return chosen

    def retrieve(self, n_queries: int, k: int, query_pool_index: Optional[Sequence[int]] = None) -> List[List[int]]:
        ex = _excl(query_pool_index, n_queries)
        _check_k(k, self.pool_size, any(e >= 0 for e in ex))
        order = self.select(min(self.pool_size, k + 1))
        return [[i for i in order if i != ex[q]][:k] for q in range(n_queries)]


def model_embedder(model, tokenizer, batch_size: int = 32) -> Callable[[Sequence[str]], np.ndarray]:
    """An ``embed`` callable: texts -> mean-pooled final hidden states of a ferrolm
    :class:`~ferrolm.models.GPT` or :class:`~ferrolm.models.LSTMLanguageModel` (real tokens
    only), float64 (n, C)."""
    import torch

    from ..models import pool

    def embed(texts: Sequence[str]) -> np.ndarray:
        was = model.training
        model.eval()
        out = []
        block = getattr(model.config, "block_size", None)
        try:
            with torch.no_grad():
                for s in range(0, len(texts), batch_size):
                    ids = [
                        tokenizer.encode_ordinary(t)[-block:] if block else tokenizer.encode_ordinary(t)
                        for t in texts[s : s + batch_size]
                    ]
                    ids = [x if x else [0] for x in ids]
                    T = max(len(x) for x in ids)
                    idx = torch.zeros(len(ids), T, dtype=torch.int64)
                    for i, x in enumerate(ids):
                        idx[i, : len(x)] = torch.tensor(x)
                    lengths = torch.tensor([len(x) for x in ids])
                    h = model.hidden_states(idx.to(next(model.parameters()).device), lengths=lengths)
                    out.append(pool(h.float(), lengths, "mean").double().cpu().numpy())
        finally:
            model.train(was)
        return np.concatenate(out) if out else np.zeros((0, 0))

    return embed


def order_demos(indices: Sequence[int], how: str = "most_relevant_last") -> List[int]:
    """The prompt order of retrieved demonstrations (given most relevant first):
    ``"most_relevant_last"`` (closest to the query; OpenICL's default), ``"most_relevant_first"``,
    or ``"as_is"``."""
    if how == "most_relevant_last":
        return list(reversed(indices))
    if how in ("most_relevant_first", "as_is"):
        return list(indices)
    raise ValueError(f"order must be 'most_relevant_last', 'most_relevant_first' or 'as_is', got {how!r}")
