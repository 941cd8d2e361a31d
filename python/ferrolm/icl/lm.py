"""One adapter for the language models that in-context learning scores with: every ferrolm
language model (anything implementing :class:`ferrolm.decoding.Decoder`: GPT, Llama, the LSTM LM,
a prompt-tuned GPT) and Hugging Face ``transformers`` causal LMs. Requests follow
lm-evaluation-harness's kinds: ``loglikelihood`` (context, continuation) and
``loglikelihood_rolling`` (a whole text), as strings (encoded with the model's tokenizer exactly as
lm-eval encodes causal requests) or token ids; results are ``(logprob, is_greedy)`` pairs.

Shared-prefix reuse: requests with the same context (the k demonstrations and the question,
scored against each choice) run the context once. The distinct contexts of a call run in
batches, grouped by length with :class:`ferrolm.data.BucketBatchSampler` and right-padded with
:func:`ferrolm.data.pad` (each row's cache keeps its own length, so the pads are never attended
to); the multi-token continuations of all contexts of a batch then continue copies of their
context's cache row (the protocol's ``select``) as one block, one forward for all their tokens
(:meth:`ferrolm.nn.KVCache.append_block` places it after the longest context and masks each
shorter row's gap). A prefix common to all contexts of a call (an instruction and fixed
demonstrations) runs once too, each context running only its own remainder after it.
Transformers models reuse their KV caches the same way: contexts as right-padded batches with an
attention mask, then the continuations as one block on copies of their rows
(``DynamicCache.batch_select_indices``) at their own ``position_ids``, the context pads masked
(full forwards where a model offers no such cache). A continuation of one token needs no second
pass at all (its log-probability is read from the context's last position). Padding never
enters a score: continuations are right-padded, the causal mask keeps real tokens from seeing
the pads after them, and each row's log-probs are gathered at its own positions only, so scores
do not depend on the batch size.

Contexts longer than the model's window are cut from the left (the oldest tokens go; the input
is the context and every continuation token but the last, as lm-eval cuts it), and
``LogLikelihood.truncated`` says so.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..data import BucketBatchSampler, pad
from ..decoding import generate, is_decoder

__all__ = ["LM", "LogLikelihood"]


class LogLikelihood(tuple):
    """The score of one continuation: a ``(logprob, is_greedy)`` pair — what lm-evaluation-harness's
    ``loglikelihood`` returns, so ``logprob, is_greedy = result`` works — that also carries
    ``n_tokens`` and ``truncated`` (the context was cut to fit the model's window) as attributes,
    the way ``os.stat_result`` is a tuple with more named fields.

    ``logprob`` is the sum of the continuation tokens' natural-log probabilities; ``is_greedy``
    says every token is the argmax at its position.

    Example:
        >>> r = LogLikelihood(-1.5, 3, True)
        >>> tuple(r), r.n_tokens, r.mean_logprob
        ((-1.5, True), 3, -0.5)
    """

    def __new__(cls, logprob: float, n_tokens: int, is_greedy: bool, truncated: bool = False) -> "LogLikelihood":
        self = super().__new__(cls, (float(logprob), bool(is_greedy)))
        self._n_tokens = int(n_tokens)
        self._truncated = bool(truncated)
        return self

    @property
    def logprob(self) -> float:
        return self[0]

    @property
    def is_greedy(self) -> bool:
        return self[1]

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def truncated(self) -> bool:
        return self._truncated

    @property
    def mean_logprob(self) -> float:
        """Length-normalised log-likelihood (per token)."""
        return self.logprob / max(1, self.n_tokens)

    def __reduce__(self):
        return (type(self), (self.logprob, self.n_tokens, self.is_greedy, self.truncated))

    def __repr__(self) -> str:
        return (
            f"LogLikelihood(logprob={self.logprob!r}, n_tokens={self.n_tokens}, is_greedy={self.is_greedy}, "
            f"truncated={self.truncated})"
        )


def _ids(x, what: str) -> List[int]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    try:
        out = [int(t) for t in x]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a sequence of int token ids, got {type(x).__name__}") from None
    return out


def _hf_cache_of(out):
    """The KV cache a transformers forward returned: ``cache`` (transformers 5.x) or
    ``past_key_values`` (4.x; a deprecated alias in 5.x that warns)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    return out["cache"] if "cache" in keys else getattr(out, "past_key_values", None)


def _hf_cache_arg(model) -> str:
    """The name under which a transformers model's forward takes a KV cache."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class LM:
    """A causal language model behind the ICL requests.

    Requests are ``(context, continuation)`` pairs of strings (encoded with ``tokenizer`` as
    lm-evaluation-harness encodes for causal models, see :meth:`encode_pair`) or of token ids.

    Args:
        model: a ferrolm language model (implementing :class:`ferrolm.decoding.Decoder`), or a
            ``transformers`` causal LM (anything whose ``forward(input_ids, attention_mask)``
            returns ``.logits``).
        tokenizer: the model's tokenizer (a :class:`ferrolm.Tokenizer`, or anything with
            ``encode``/``decode``); needed for string requests only.
        max_length: the window (default: the model's ``context_window`` — a GPT's block_size,
            unlimited for a recurrent model — or the HF config's
            ``n_positions``/``max_position_embeddings``).
        batch_size: continuations (or rolling windows) per forward pass. Scores do not depend
            on it.
        prefix_token_id: the token an empty context becomes (default: the tokenizer's bos,
            else its eos, else ``<|endoftext|>``, as lm-evaluation-harness chooses).

    Example:
        >>> from ferrolm.models import GPT, GPTConfig
        >>> lm = LM(GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=8)))
        >>> [r.n_tokens for r in lm.loglikelihood([([1, 2, 3], [4]), ([1, 2, 3], [5, 6])])]
        [1, 2]
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        max_length: Optional[int] = None,
        batch_size: int = 16,
        prefix_token_id: Optional[int] = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"LM wraps a torch.nn.Module language model, got {type(model).__name__}")
        if getattr(model, "is_encoder_decoder", False):
            raise TypeError(f"LM scores causal language models; {type(model).__name__} is an encoder-decoder model")
        if isinstance(tokenizer, int) and not isinstance(tokenizer, bool):
            raise TypeError("LM's second argument is the tokenizer; pass the window as max_length=")
        self.model = model
        self.tokenizer = tokenizer
        # ferrolm models decode through the protocol; anything else is called as transformers' models are.
        self.native = is_decoder(model)
        cfg = getattr(model, "config", None)
        if max_length is None:
            if self.native:
                max_length = model.context_window
            else:
                max_length = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        self.max_length = max_length
        self.vocab_size = getattr(cfg, "vocab_size", None)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self._prefix_token_id = prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes: the tokenizer's bos, else eos, else ``<|endoftext|>``."""
        if self._prefix_token_id is not None:
            return int(self._prefix_token_id)
        tok = self._need_tokenizer("an empty context")
        for name in ("bos_token_id", "eos_token_id"):
            i = getattr(tok, name, None)
            if i is not None:
                return int(i)
        eot = (getattr(tok, "special_tokens", None) or {}).get("<|endoftext|>")
        if eot is not None:
            return int(eot)
        raise ValueError(
            "the tokenizer has no bos, eos or <|endoftext|> token for an empty context; pass LM(prefix_token_id=...)"
        )

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise TypeError(f"{what} needs the model's tokenizer: LM(model, tokenizer=tok), or give token ids")
        return self.tokenizer

    def encode(self, text: str) -> List[int]:
        """The ids of ``text`` with no bos/eos added; special-token texts become their tokens
        (as transformers' ``encode(text, add_special_tokens=False)``)."""
        tok = self._need_tokenizer("a string request")
        if hasattr(tok, "special_tokens_set"):  # a ferrolm Tokenizer
            return tok.encode(text, allowed_special="all")
        try:
            return list(tok.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tok.encode(text))

    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """``(context ids, continuation ids)`` as lm-evaluation-harness encodes a causal request:
        the context's trailing whitespace moves to the continuation, the pair is encoded as one
        text and the continuation is what follows the context's own ids; an empty context
        becomes ``[prefix_token_id]`` (or the continuation's first token when that is it)."""
        if context == "":
            cont = self.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:  # the text already starts with it (lm-eval 0.4.13)
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return (ctx or [self.prefix_token_id]), whole[len(ctx) :]

    def _requests(self, requests) -> List[Tuple[List[int], List[int]]]:
        """Requests as id pairs: string pairs encoded (:meth:`encode_pair`), id pairs checked."""
        out = []
        for i, req in enumerate(requests):
            if not isinstance(req, (tuple, list)) or len(req) != 2:
                raise TypeError(
                    f"request {i} is {type(req).__name__} {req!r:.60}; give (context, continuation) pairs "
                    "of str or of int token ids"
                )
            ctx, cont = req
            if isinstance(ctx, str) and isinstance(cont, str):
                out.append(self.encode_pair(ctx, cont))
                continue
            if isinstance(ctx, str) != isinstance(cont, str):
                raise TypeError(
                    f"request {i}: one of context and continuation is a str, the other is not; "
                    "give both as str (with LM(tokenizer=...)) or both as int token ids"
                )
            out.append((_ids(ctx, f"context {i}"), _ids(cont, f"continuation {i}")))
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ helpers

    def _check(self, ids: List[int], what: str) -> None:
        if self.vocab_size is not None and ids:
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"{what} holds token id {lo if lo < 0 else hi}, outside the vocabulary [0, {self.vocab_size})"
                )

    def _logits_full(self, rows: List[List[int]]) -> List[torch.Tensor]:
        """Log-softmax over full (uncached) forwards of right-padded rows: one (T_i, V) each."""
        T = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.int64)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        lengths = torch.tensor([len(r) for r in rows])
        idx = idx.to(self.device)
        if self.native:
            logits, _ = self.model(idx, lengths=lengths)
        else:
            mask = (torch.arange(T)[None, :] < lengths[:, None]).long().to(self.device)
            logits = self.model(input_ids=idx, attention_mask=mask).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        return [logp[i, : len(r)] for i, r in enumerate(rows)]

    @staticmethod
    def _score(logp: torch.Tensor, targets: List[int]) -> Tuple[float, bool]:
        """Sum of log-probs of ``targets`` under rows of ``logp`` (len(targets), V)."""
        t = torch.tensor(targets, device=logp.device)
        picked = logp.gather(1, t[:, None])[:, 0]
        greedy = bool((logp.argmax(-1) == t).all())
        return float(picked.double().sum()), greedy

    # ------------------------------------------------------------------ requests

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Tuple[Any, Any]], reuse_prefix: bool = True) -> List[LogLikelihood]:
        """``log P(continuation | context)`` for each ``(context, continuation)`` pair, in
        request order: each a :class:`LogLikelihood`, i.e. a ``(logprob, is_greedy)`` pair with
        ``n_tokens`` and ``truncated`` attributes.

        Args:
            requests: pairs of strings (encoded by :meth:`encode_pair`, as lm-evaluation-harness
                does) or of int token id sequences.
            reuse_prefix: run each distinct context once and score its continuations from the
                cached prefix (ferrolm models); False runs one full forward per request (the
                reference behaviour, used by tests and benchmarks).

        Raises:
            TypeError: a request that is not a pair of str or of ids; strings without a tokenizer.
            ValueError: an empty context or continuation (of ids), ids outside the vocabulary, a
                continuation longer than the model's window.

        Example:
            >>> lm.loglikelihood([("The capital of France is", " Paris")])  # doctest: +SKIP
            [LogLikelihood(logprob=-2.1, n_tokens=1, is_greedy=True, truncated=False)]
        """
        reqs = []
        for i, (ctx, cont) in enumerate(self._requests(requests)):
            if not ctx:
                raise ValueError(
                    f"request {i}: the context is empty; give at least one token (for example a BOS / end-of-text id)"
                )
            if not cont:
                raise ValueError(f"request {i}: the continuation is empty")
            if self.max_length is not None and len(cont) > self.max_length:
                raise ValueError(
                    f"request {i}: a continuation of {len(cont)} tokens does not fit the window of {self.max_length}"
                )
            self._check(ctx, f"context {i}")
            self._check(cont, f"continuation {i}")
            reqs.append((ctx, cont))
        was = self.model.training
        self.model.eval()
        try:
            if reuse_prefix and (self.native or self._hf_cache_ok()):
                return self._loglikelihood_cached(reqs)
            return self._loglikelihood_full(reqs)
        finally:
            self.model.train(was)

    def multiple_choice(
        self, questions: Sequence[Tuple[Any, Sequence[Any]]], normalise: bool = False
    ) -> List[Tuple[int, List[LogLikelihood]]]:
        """For each ``(context, choices)`` (strings or token ids): the index of the most likely choice and every
        choice's :class:`LogLikelihood` (one loglikelihood request per choice, all sharing the
        context's cache). ``normalise`` ranks by mean log-prob per token instead of the sum;
        ties go to the first choice.

        Raises:
            ValueError: a question with no choices (and whatever :meth:`loglikelihood` raises).
        """
        reqs: List[Tuple[Any, Any]] = []
        spans = []
        for i, (ctx, choices) in enumerate(questions):
            choices = list(choices)
            if not choices:
                raise ValueError(f"question {i}: the choice list is empty; give at least one continuation")
            spans.append((len(reqs), len(choices)))
            reqs += [(ctx, c) for c in choices]
        scores = self.loglikelihood(reqs)
        out = []
        for start, n in spans:
            rs = scores[start : start + n]
            key = [r.mean_logprob if normalise else r.logprob for r in rs]
            out.append((max(range(n), key=lambda j: (key[j], -j)), rs))
        return out

    def _fit(self, ctx: List[int], cont: List[int]) -> Tuple[List[int], bool]:
        """The context cut from the left so that the model's input (the context and every
        continuation token but the last) fits the window, as lm-evaluation-harness cuts it."""
        if self.max_length is None or len(ctx) + len(cont) - 1 <= self.max_length:
            return ctx, False
        keep = self.max_length - len(cont) + 1
        return ctx[len(ctx) - keep :] if keep > 0 else [], True

    def _loglikelihood_full(self, reqs: List[Tuple[List[int], List[int]]]) -> List[LogLikelihood]:
        out: List[Optional[LogLikelihood]] = [None] * len(reqs)
        rows = []
        for ctx, cont in reqs:
            ctx, cut = self._fit(ctx, cont)
            if not ctx:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens leaves no room for context "
                    f"in the window of {self.max_length}"
                )
            rows.append((ctx + cont[:-1], len(ctx), cont, cut))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            logps = self._logits_full([rows[i][0] for i in chunk])
            for i, lp in zip(chunk, logps):
                seq, n_ctx, cont, cut = rows[i]
                total, greedy = self._score(lp[n_ctx - 1 : n_ctx - 1 + len(cont)], cont)
                out[i] = LogLikelihood(total, len(cont), greedy, cut)
        return out  # type: ignore[return-value]

    def _loglikelihood_cached(self, reqs: List[Tuple[List[int], List[int]]]) -> List[LogLikelihood]:
        # Requests share a prefix when their contexts, each cut to fit the window with its own
        # continuation (as a full forward would cut it), are the same.
        groups: Dict[Tuple[int, ...], List[int]] = {}
        cuts = []
        for i, (ctx, cont) in enumerate(reqs):
            fitted, cut = self._fit(ctx, cont)
            groups.setdefault(tuple(fitted), []).append(i)
            cuts.append(cut)
        plans = []
        for ctx_t, members in groups.items():
            longest = max(len(reqs[i][1]) for i in members)
            plans.append((list(ctx_t), longest, members))
        out: List[Optional[LogLikelihood]] = [None] * len(reqs)
        if not self.native:
            return self._loglikelihood_hf(reqs, plans, cuts)
        base = self._shared_base([p[0] for p in plans], max(len(p[0]) + p[1] - 1 for p in plans))
        done = base[0] if base is not None else 0
        for batch in self._context_batches([len(p[0]) - done for p in plans]):
            prefilled = self._prefix_batch([plans[i][0] for i in batch], max(plans[i][1] for i in batch) - 1, base)
            state = prefilled[0][1][0]
            for i, first, _ in ((i, first, row) for b, (first, (_, row)) in zip(batch, prefilled) for i in plans[b][2]):
                if len(reqs[i][1]) == 1:  # read from the context's last position: no pass at all
                    out[i] = self._result(first, None, reqs[i][1], cuts[i])
            longer = [(b, i) for b in range(len(batch)) for i in plans[batch[b]][2] if len(reqs[i][1]) > 1]
            span = max((len(plans[batch[b]][0]) + len(reqs[i][1]) for b, i in longer), default=1)
            # Stepping rows of several contexts together moves every row as far as the longest
            # continuation (finished rows step on with fillers): only when that fits the window.
            widest = max((len(plans[batch[b]][0]) for b, _ in longer), default=0)
            steps = max((len(reqs[i][1]) - 1 for _, i in longer), default=0)
            mix = self.max_length is None or widest + steps <= self.max_length
            for chunk in self._continuation_chunks(longer, span, mix):
                rows = torch.tensor([prefilled[b][1][1] for b, _ in chunk], dtype=torch.int64)
                rests = self._continue_rows(state, rows, [reqs[i][1] for _, i in chunk])
                for (b, i), rest in zip(chunk, rests):
                    out[i] = self._result(prefilled[b][0], rest, reqs[i][1], cuts[i])
        return out  # type: ignore[return-value]

    def _result(self, first: torch.Tensor, rest: Optional[torch.Tensor], cont: List[int], cut: bool) -> LogLikelihood:
        """A continuation's score from the log-probs after its context (``first``, (1, V)) and
        after each of its tokens but the last (``rest``, (>= len - 1, V))."""
        lp = first if len(cont) == 1 else torch.cat([first, rest[: len(cont) - 1]])  # type: ignore[index]
        total, greedy = self._score(lp, cont)
        return LogLikelihood(total, len(cont), greedy, cut)

    #: Continuation rows per pass: at least this many (each row a copy of its context's cache) ...
    CONTINUE_ROWS = 64
    #: ... as long as the copies hold at most this many positions in all.
    CONTINUE_POSITIONS = 16384

    def _continuation_chunks(
        self, jobs: List[Tuple[int, int]], span: int, mix: bool = True
    ) -> List[List[Tuple[int, int]]]:
        """Groups ``(context row, request)`` jobs of multi-token continuations into passes.

        A pass runs its continuations as one block (each row a copy of its context's cache, the
        block appended after the longest of them: :meth:`ferrolm.nn.KVCache.append_block`), one
        forward for all their tokens. Continuations of several contexts share a pass when
        ``mix`` (the longest context plus the longest continuation fits the window), otherwise
        each context has its own. A pass takes up to ``max(batch_size, CONTINUE_ROWS)`` rows,
        fewer when their cache copies (``span`` positions each) would exceed
        ``CONTINUE_POSITIONS``.
        """
        if not jobs:
            return []
        size = max(1, min(max(self.batch_size, self.CONTINUE_ROWS), self.CONTINUE_POSITIONS // max(1, span)))
        if mix:
            return [jobs[s : s + size] for s in range(0, len(jobs), size)]
        out = []
        for b in sorted({b for b, _ in jobs}):
            mine = [j for j in jobs if j[0] == b]
            out += [mine[s : s + size] for s in range(0, len(mine), size)]
        return out

    def _continue_rows(self, state, rows: torch.Tensor, conts: List[List[int]]) -> List[torch.Tensor]:
        """Log-probs (len - 1, V) after each continuation's tokens but its last, each
        continuing row ``rows[i]`` of a ferrolm model's batch ``state`` (a copy: ``select``),
        all in one right-padded block (its pads' positions are never read)."""
        idx, real = pad([c[:-1] for c in conts], return_tensors="pt")
        st = self.model.select(state, rows)
        lengths = real.sum(1)
        h = self.model.advance(st, idx.to(self.device), lengths)  # (n, m, C)
        real = real.bool().to(h.device)
        # the output layer and softmax on the real positions only (the pads' are never read)
        logp = F.log_softmax(self.model.logits(h[real]).float(), -1)
        return list(logp.split(lengths.tolist()))

    #: Padded context tokens per prefill batch (with ``batch_size`` contexts at most).
    PREFILL_TOKENS = 8192

    def _context_batches(self, lengths: List[int]) -> List[List[int]]:
        """Indices of contexts grouped for batched prefill: sorted by length inside buckets
        (:class:`ferrolm.data.BucketBatchSampler`) so right padding wastes little."""
        sampler = BucketBatchSampler(lengths, batch_size=self.batch_size, max_tokens=self.PREFILL_TOKENS, shuffle=False)
        return [list(b) for b in sampler]

    #: A prefix shared by every context of a call (the instruction and fixed demonstrations) is
    #: run once when it is at least this many tokens long.
    MIN_SHARED_PREFIX = 16

    def _shared_base(self, contexts: List[List[int]], capacity: int):
        """``(length, state)`` of the longest prefix common to all ``contexts`` and shorter than
        each (run once), or None when there is none worth sharing."""
        if len(contexts) < 2:
            return None
        n = min(len(c) for c in contexts) - 1  # every context keeps at least one token of its own
        first = contexts[0]
        for c in contexts[1:]:
            k = 0
            while k < n and c[k] == first[k]:
                k += 1
            n = k
        if n < self.MIN_SHARED_PREFIX:
            return None
        _, state = self._prefix_batch([first[:n]], capacity - n)[0]
        return n, state

    def _prefix_batch(self, ctxs: List[List[int]], room: int, base=None) -> List[Tuple[torch.Tensor, object]]:
        """Runs the contexts as one right-padded batch (after the shared ``base`` prefix when
        given, which every context then starts with): for each, the log-probs at its last
        position (1, V) and its reusable state ``(batch state, row)``, with room for ``room``
        more tokens."""
        done = base[0] if base is not None else 0
        rems = [c[done:] for c in ctxs]
        idx, _ = pad(rems, return_tensors="pt")
        idx = idx.to(self.device)
        B, T = idx.shape
        lengths = torch.tensor([len(r) for r in rems], dtype=torch.int64)
        rows = torch.arange(B)
        if base is not None:
            base_state, base_row = base[1]
            state = self.model.select(base_state, torch.full((B,), base_row, dtype=torch.int64))
        else:
            capacity = done + T + room  # each row fits the window; the longest row and longest room may not
            state = self.model.start(B, capacity if self.max_length is None else min(capacity, self.max_length))
        h = self.model.advance(state, idx, lengths)
        logp = F.log_softmax(self.model.logits(h[rows, lengths - 1]).float(), -1)
        return [(logp[i : i + 1], (state, i)) for i in range(B)]

    def _loglikelihood_hf(self, reqs, plans, cuts) -> List[LogLikelihood]:
        """The cached path for a transformers model: contexts run as right-padded batches (one
        forward each, with an attention mask), then the multi-token continuations of a batch's
        contexts as one block on copies of their rows of the cache (their positions given, the
        context pads masked)."""
        out: List[Optional[LogLikelihood]] = [None] * len(reqs)
        # Without position_ids the model counts positions from the cache length: contexts then
        # run one at a time (no pads, so the count is right).
        positions = self._hf_takes_positions()
        batches = self._context_batches([len(p[0]) for p in plans]) if positions else [[b] for b in range(len(plans))]
        for batch in batches:
            ctxs = [plans[b][0] for b in batch]
            firsts, state, mask = self._hf_prefix(ctxs)
            jobs = [(j, i) for j, b in enumerate(batch) for i in plans[b][2]]
            longer = []
            for j, i in jobs:
                if len(reqs[i][1]) == 1:
                    out[i] = self._result(firsts[j], None, reqs[i][1], cuts[i])
                else:
                    longer.append((j, i))
            span = max((mask.size(1) + len(reqs[i][1]) for _, i in longer), default=1)
            for chunk in self._continuation_chunks(longer, span):
                rows = [j for j, _ in chunk]
                starts = [len(ctxs[j]) for j in rows] if positions else None
                rests = self._continue(state, mask, rows, [reqs[i][1] for _, i in chunk], starts)
                for (j, i), rest in zip(chunk, rests):
                    out[i] = self._result(firsts[j], rest, reqs[i][1], cuts[i])
        return out  # type: ignore[return-value]

    def _hf_takes_positions(self) -> bool:
        import inspect

        try:
            return "position_ids" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False

    def _hf_prefix(self, ctxs: List[List[int]]):
        """A transformers model run on right-padded contexts: each one's log-probs after its
        last token (1, V), the ``past_key_values`` (pads included) and the attention mask (B, T)."""
        ids, mask = pad(ctxs, return_tensors="pt")
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=True)
        last = torch.tensor([len(c) - 1 for c in ctxs], device=out.logits.device)
        logp = F.log_softmax(out.logits[torch.arange(len(ctxs), device=last.device), last].float(), -1)
        return [logp[i : i + 1] for i in range(len(ctxs))], _hf_cache_of(out), mask

    def _hf_cache_ok(self) -> bool:
        """Whether the transformers model returns a KV cache that can be copied per row
        (``DynamicCache.batch_select_indices``); otherwise requests run as full forwards."""
        if getattr(self, "_hf_cache", None) is None:
            try:
                with torch.no_grad():
                    out = self.model(input_ids=torch.zeros(1, 1, dtype=torch.int64, device=self.device), use_cache=True)
                self._hf_cache = hasattr(_hf_cache_of(out), "batch_select_indices")
            except (TypeError, ValueError, RuntimeError):
                self._hf_cache = False
        return bool(self._hf_cache)

    def _continue(
        self, state, ctx_mask: torch.Tensor, rows: List[int], conts: List[List[int]], starts: Optional[List[int]]
    ) -> List[torch.Tensor]:
        """Log-probs (len - 1, V) after each continuation's tokens but its last: continuation i
        follows context row ``rows[i]`` of a transformers model's ``past_key_values`` ``state``
        (right-padded contexts, ``ctx_mask`` (B, T)); all run as one right-padded block on a
        copy of those rows, at positions ``starts[i]`` on (None: the model counts them from the
        cache length, right for unpadded single contexts)."""
        import copy

        idx, cont_mask = pad([c[:-1] for c in conts], return_tensors="pt")
        n, m = idx.shape
        sel = torch.tensor(rows, dtype=torch.int64)
        cache = copy.deepcopy(state)  # the forward below appends to it
        cache.batch_select_indices(sel.to(self.device))
        mask = torch.cat([ctx_mask.index_select(0, sel), cont_mask], 1)
        kw = {_hf_cache_arg(self.model): cache, "attention_mask": mask.to(self.device)}
        if starts is not None:
            start = torch.tensor(starts, dtype=torch.int64)
            kw["position_ids"] = (start.view(n, 1) + torch.arange(m).view(1, m)).to(self.device)
        logits = self.model(input_ids=idx.to(self.device), **kw).logits
        logp = F.log_softmax(logits.float(), -1)
        return [logp[i, : len(c) - 1] for i, c in enumerate(conts)]

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Tuple[Any, Sequence[str], int]], tokenizer=None) -> List[str]:
        """Greedy continuations: for each ``(context, stop strings, max_tokens)`` the text
        generated after the context (a string, encoded with :meth:`encode`, or token ids), cut
        before the first stop string (or after ``max_tokens`` tokens). Contexts are cut from the
        left to leave room for ``max_tokens`` in the window.

        Args:
            tokenizer: decodes the generated ids (default: the LM's tokenizer; a
                :class:`ferrolm.Tokenizer` or anything with ``decode``); its eos and
                ``<|endoftext|>``, when it has them, also end a continuation.
        """
        tokenizer = tokenizer if tokenizer is not None else self._need_tokenizer("generate_until")
        specials = getattr(tokenizer, "special_tokens", None)
        stop_ids = sorted(
            {
                int(t)
                for t in (
                    specials.get("<|endoftext|>") if isinstance(specials, dict) else None,
                    getattr(tokenizer, "eos_token_id", None),
                )
                if t is not None
            }
        )
        prepared = []
        for i, (ctx, stops, n) in enumerate(requests):
            ctx = self.encode(ctx) if isinstance(ctx, str) else _ids(ctx, f"context {i}")
            if not ctx:
                raise ValueError(f"request {i}: the context is empty")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"request {i}: max_tokens must be a positive int, got {n!r}")
            if isinstance(stops, str):
                stops = [stops]
            self._check(ctx, f"context {i}")
            if self.max_length is not None:
                if n >= self.max_length:
                    raise ValueError(
                        f"request {i}: max_tokens={n} leaves no room for context in the window of {self.max_length}"
                    )
                ctx = ctx[-(self.max_length - n) :]
            prepared.append((ctx, list(stops), n))
        out: List[str] = []
        was = self.model.training
        self.model.eval()
        try:
            # Requests with the same budget run as one ragged batch.
            by_n: Dict[int, List[int]] = {}
            for i, (_, _, n) in enumerate(prepared):
                by_n.setdefault(n, []).append(i)
            texts: Dict[int, str] = {}
            for n, members in by_n.items():
                for s in range(0, len(members), self.batch_size):
                    chunk = members[s : s + self.batch_size]
                    ctxs = [prepared[i][0] for i in chunk]
                    if self.native:
                        new = generate(self.model, ctxs, n, temperature=0, stop_ids=stop_ids or None)
                    else:
                        new = self._hf_generate(ctxs, n, stop_ids)
                    for i, ids in zip(chunk, new):
                        ids = [t for t in ids if t not in stop_ids]
                        text = tokenizer.decode(ids)
                        cut = min((text.find(st) for st in prepared[i][1] if st and st in text), default=-1)
                        texts[i] = text[:cut] if cut >= 0 else text
            out = [texts[i] for i in range(len(prepared))]
        finally:
            self.model.train(was)
        return out

    def _hf_generate(self, ctxs: List[List[int]], n: int, stop_ids: List[int]) -> List[List[int]]:
        """Greedy continuations from a transformers model (left padding + attention mask)."""
        T = max(len(c) for c in ctxs)
        ids = torch.zeros(len(ctxs), T, dtype=torch.int64)
        mask = torch.zeros(len(ctxs), T, dtype=torch.int64)
        for i, c in enumerate(ctxs):
            ids[i, T - len(c) :] = torch.tensor(c)
            mask[i, T - len(c) :] = 1
        res = self.model.generate(
            ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=stop_ids or None,
        )
        out = []
        for row in res.cpu():
            new = row[T:].tolist()
            end = next((j for j, t in enumerate(new) if t in stop_ids), None)
            out.append(new if end is None else new[: end + 1])
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, tokens: Any, stride: Optional[int] = None) -> LogLikelihood:
        """The log-likelihood of a whole text, every token after the first scored exactly once,
        in windows of the model's length (each window predicts only tokens no earlier window
        did — at most ``stride`` of them, default ``max_length - 1`` — with the rest of the
        window before them as context). For
        perplexity: ``exp(-logprob / n_tokens)``.

        Args:
            tokens: token ids, or a string: encoded with :meth:`encode` after
                ``prefix_token_id``, so that every token of the text is scored."""
        ids = [self.prefix_token_id] + self.encode(tokens) if isinstance(tokens, str) else _ids(tokens, "tokens")
        if len(ids) < 2:
            raise ValueError("loglikelihood_rolling needs at least 2 tokens (the first is only context)")
        self._check(ids, "tokens")
        W = self.max_length or len(ids)
        if W < 2:
            raise ValueError(f"a window of {W} token cannot predict anything")
        # Each window predicts at most W - 1 tokens, so it holds at least one token of context.
        stride = W - 1 if stride is None else int(stride)
        if not 1 <= stride <= W - 1:
            raise ValueError(f"stride must be in [1, {W - 1}] (the window minus one context token), got {stride}")
        windows = []  # (token slice start, end, first scored position within slice)
        scored = 1
        while scored < len(ids):
            end = min(len(ids), scored + stride)
            start = max(0, end - W)
            windows.append((start, end, scored - start))
            scored = end
        was = self.model.training
        self.model.eval()
        total, greedy = 0.0, True
        try:
            for s in range(0, len(windows), self.batch_size):
                chunk = windows[s : s + self.batch_size]
                logps = self._logits_full([ids[a:b] for a, b, _ in chunk])
                for (a, b, first), lp in zip(chunk, logps):
                    t, g = self._score(lp[first - 1 : b - a - 1], ids[a + first : b])
                    total += t
                    greedy = greedy and g
        finally:
            self.model.train(was)
        return LogLikelihood(total, len(ids) - 1, greedy)
