"""Decoding for every ferrolm model, over one step protocol (:class:`Decoder`).

A model that decodes implements four methods: ``start(batch, capacity, memory=None)`` (an
empty decoding state for ``batch`` rows and ``capacity`` positions; ``memory`` is an
encoder-decoder's encoded source), ``advance(state, idx, lengths=None)`` (feeds (B, T) token
ids, right-padded with each row's real count in ``lengths``, appends them to the state and
returns their hidden states (B, T, C)), ``logits(hidden)`` (the output layer, applied only to
the positions that are needed) and ``select(state, rows)`` (a new state holding rows
``rows`` of this one: beams reordered, one prompt's state copied for several
continuations); and ``context_window``, its longest sequence (None: unlimited; a model may name
the setting behind it in ``window_name`` for error messages, e.g. ``"block_size"``). GPT keeps a
KV cache with a length per row, the recurrent models carry their state, the encoder-decoder
models their source memory beside either. :func:`generate`, :func:`greedy_decode`,
:func:`beam_search` and the ICL adapter :class:`ferrolm.icl.LM` call only this protocol.

Prompts of different lengths run as one batch without padding waste: they are right-padded
for the prompt pass (causal attention never lets a real token see the pads after it, and the
recurrent models stop each row at its own length), then every row decodes at its own
position. Inputs padded on the left with an attention mask (Hugging Face's convention) are
accepted and regrouped the same way.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Iterable, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Decoder", "is_decoder", "generate", "sample_next", "greedy_decode", "beam_search", "decode_uncached"]

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[int]]


@runtime_checkable
class Decoder(Protocol):
    """The step protocol every ferrolm language and translation model implements."""

    context_window: Optional[int]

    def start(self, batch: int, capacity: int, memory: Any = None) -> Any:
        """An empty state for ``batch`` rows that can hold ``capacity`` positions."""

    def advance(self, state: Any, idx: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states (B, T, C) of ``idx`` (B, T), appended to ``state``."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer: (..., C) -> (..., V)."""

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        """A new state of rows ``rows`` (N,) of ``state``, in that order."""


def is_decoder(model: Any) -> bool:
    """Whether ``model`` implements :class:`Decoder`."""
    return isinstance(model, Decoder)


def _as_prompts(idx: Prompts, attention_mask) -> List[List[int]]:
    if isinstance(idx, torch.Tensor):
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"prompt ids must be integers, got dtype {idx.dtype}")
        if idx.dim() == 1:
            idx = idx[None]
        if idx.dim() != 2:
            raise ValueError(f"prompt ids must be (T,) or (B, T), got shape {tuple(idx.shape)}")
        if attention_mask is None:
            return [row.tolist() for row in idx.cpu()]
        mask = torch.as_tensor(attention_mask).cpu()
        if mask.shape != idx.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {tuple(idx.shape)} like the ids")
        return [row[m.bool()].tolist() for row, m in zip(idx.cpu(), mask)]
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a (B, T) tensor of ids, not with lists")
    if isinstance(idx, (list, tuple)) and idx and all(isinstance(x, int) and not isinstance(x, bool) for x in idx):
        return [list(idx)]
    try:
        prompts = [list(p) for p in idx]  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(
            f"prompts must be a tensor, a list of ids or a list of id lists, got {type(idx).__name__}"
        ) from None
    for p in prompts:
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            raise TypeError("each prompt must be a list of int token ids")
    return prompts


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def right_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, T) int64 right-padded with pad_id, lengths (B,) int64 on the CPU)``."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    out = torch.full((len(rows), int(lengths.max()) if len(rows) else 0), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.int64)
    return out.to(device), lengths


def sample_next(
    logits: torch.Tensor,
    temperature: Optional[float] = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The next token of each row (B,) from logits (B, V): argmax when ``temperature`` is 0 or
    None (exactly ``logits.argmax(-1)``), else a sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens and to the smallest set whose probability
    reaches ``top_p`` (nucleus).

    Raises:
        ValueError: the logits hold NaN (a model with NaN weights or activations).
    """
    if torch.isnan(logits).any():
        raise ValueError(
            "the model produced NaN logits (NaN weights or activations); check the checkpoint or the inputs"
        )
    if not temperature:
        return logits.argmax(-1)
    logits = logits.float() / float(temperature)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, int(top_k), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above
        drop_sorted = before >= float(top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(
    model,
    idx: Prompts,
    max_new_tokens: int,
    temperature: Optional[float] = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_ids: Union[int, Iterable[int], None] = None,
    seed: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    kv_dtype: Optional[torch.dtype] = None,
    truncate: bool = False,
) -> List[List[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a causal language model implementing :class:`Decoder` (ferrolm's
            :class:`~ferrolm.models.GPT`, :class:`~ferrolm.models.LSTMLanguageModel`, a
            prompt-tuned GPT).
        idx: one prompt (list of ids or (T,) tensor), a list of prompts of any lengths, or a
            (B, T) tensor; with ``attention_mask`` (B, T) (1 = token, 0 = pad, left or right
            padding) only the masked-in ids are the prompt.
        max_new_tokens: tokens to add per prompt (>= 0).
        temperature: 0 or None = greedy (argmax); else the softmax temperature.
        top_k, top_p: sampling filters (see :func:`sample_next`).
        stop_ids: a row stops after emitting one of these ids (it is kept in the output).
        seed: seeds a private generator so the same call gives the same tokens; None uses
            torch's global RNG.
        kv_dtype: the KV cache's dtype for models with one (GPT, Llama): torch.float16 (half
            the cache memory and the bytes each step reads; keys and values rounded to float16)
            or torch.float32; None: the model's dtype.
        truncate: a prompt that leaves less than ``max_new_tokens`` of the model's window is
            cut from the left (its oldest tokens dropped) instead of raising.

    Returns:
        The new tokens of each prompt (a list per prompt, without the prompt).

    Raises:
        ValueError: empty prompts, ids outside the vocabulary, a prompt plus
            ``max_new_tokens`` longer than the model's window, bad sampling options.
        TypeError: ``kv_dtype`` other than float16/float32, or given for a model without a
            KV cache.

    Example:
        >>> from ferrolm.models import GPT, GPTConfig
        >>> m = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=8))
        >>> out = generate(m, [[1, 2, 3], [4]], max_new_tokens=5, temperature=0)
        >>> [len(o) for o in out]
        [5, 5]
    """
    if not is_decoder(model) or getattr(model, "is_encoder_decoder", False):
        raise TypeError(
            "generate needs a ferrolm causal language model (a GPT or LSTMLanguageModel, "
            f"or anything implementing ferrolm.decoding.Decoder), got {type(model).__name__}"
        )
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature is not None and not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    start_kw = {}
    if kv_dtype is not None:
        if "kv_dtype" not in inspect.signature(model.start).parameters:
            raise TypeError(f"kv_dtype applies to models with a KV cache (GPT, Llama); {type(model).__name__} has none")
        if kv_dtype not in (torch.float16, torch.float32):
            raise TypeError(f"kv_dtype must be torch.float16 or torch.float32 (or None), got {kv_dtype!r}")
        start_kw["kv_dtype"] = kv_dtype
    stops = (
        set() if stop_ids is None else ({int(stop_ids)} if isinstance(stop_ids, int) else {int(s) for s in stop_ids})
    )
    prompts = _as_prompts(idx, attention_mask)
    if not prompts:
        return []
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= V:
            raise ValueError(f"prompt {i} holds token id {lo if lo < 0 else hi}, outside the vocabulary [0, {V})")
    B = len(prompts)
    device = _device(model)
    window = model.context_window
    if truncate and window is not None:
        if max_new_tokens >= window:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the window of {window}")
        prompts = [p[-(window - max_new_tokens) :] for p in prompts]
    padded, lens = right_padded(prompts, 0, device)
    T = padded.size(1)
    if window is not None and T + max_new_tokens > window:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"{getattr(model, 'window_name', 'context_window')}={window}; "
            "shorten the prompt, generate fewer tokens or pass truncate=True (drops the oldest tokens)"
        )
    out: List[List[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    rows = torch.arange(B, device=device)
    was_training = model.training
    model.eval()
    try:
        state = model.start(B, T + max_new_tokens, **start_kw)
        h = model.advance(state, padded, lens)
        logits = model.logits(h[rows, lens.to(device) - 1])  # (B, V)
        done = [False] * B
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            ids = nxt.tolist()
            for b, t in enumerate(ids):
                if not done[b]:
                    out[b].append(t)
                    if t in stops:
                        done[b] = True
            if all(done) or step == max_new_tokens - 1:
                break
            logits = _step_logits(model, state, nxt.view(B, 1))
    finally:
        model.train(was_training)
    return out


def _step_logits(model, state, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) of one new token per row: the model's fused ``step_logits`` when it has
    one (a quantized Llama's whole-model step in Rust), else ``logits(advance(...))``."""
    fused = getattr(model, "step_logits", None)
    if fused is not None:
        return fused(state, idx)
    return model.logits(model.advance(state, idx)[:, -1])


# --------------------------------------------------------------------------- encoder-decoder models


def _as_sources(model: nn.Module, sources) -> List[List[int]]:
    if isinstance(sources, torch.Tensor):
        if sources.dim() == 1:
            sources = sources[None]
        if sources.dim() != 2:
            raise ValueError(f"sources must be a (B, S) tensor or a list of id lists, got shape {tuple(sources.shape)}")
        pad = model.config.pad_id  # type: ignore[attr-defined]
        return [[int(t) for t in row if int(t) != pad] for row in sources.tolist()]
    if not isinstance(sources, (list, tuple)):
        raise TypeError(f"sources must be a tensor or a list of id lists, got {type(sources).__name__}")
    if sources and isinstance(sources[0], int):
        sources = [sources]
    return [list(map(int, s)) for s in sources]


def _check_sources(model: nn.Module, sources: List[List[int]]) -> None:
    cfg = model.config  # type: ignore[attr-defined]
    for i, s in enumerate(sources):
        if not s:
            raise ValueError(f"source {i} is empty; every source needs at least one token")
        if len(s) > cfg.max_len:
            raise ValueError(f"source {i} has {len(s)} tokens, more than max_len={cfg.max_len}; shorten it")
        lo, hi = min(s), max(s)
        if lo < 0 or hi >= cfg.src_vocab_size:
            raise ValueError(
                f"source {i} holds token id {lo if lo < 0 else hi}, "
                f"outside the source vocabulary [0, {cfg.src_vocab_size})"
            )
        if cfg.pad_id in s:
            raise ValueError(f"source {i} holds pad_id={cfg.pad_id}; sources are given unpadded")


def _decode_args(model: nn.Module, sources, max_new_tokens: Optional[int], batch_size: int):
    if not getattr(model, "is_encoder_decoder", False):
        raise TypeError(f"decoding needs a ferrolm encoder-decoder model, got {type(model).__name__}")
    srcs = _as_sources(model, sources)
    _check_sources(model, srcs)
    cfg = model.config  # type: ignore[attr-defined]
    limit = cfg.max_len if max_new_tokens is None else max_new_tokens
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= cfg.max_len:
        raise ValueError(f"max_new_tokens must be an int in [1, max_len={cfg.max_len}], got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return srcs, limit


def _length_order(sources: List[List[int]]) -> List[int]:
    """Sources sorted by length (longest first), so each batch pads little."""
    return sorted(range(len(sources)), key=lambda i: -len(sources[i]))


@torch.no_grad()
def greedy_decode(
    model: nn.Module, sources, max_new_tokens: Optional[int] = None, batch_size: int = 64
) -> List[List[int]]:
    """Greedy translation: the target ids of each source, without BOS and EOS.

    Sources of different lengths run together in length-sorted batches (right-padded, pads
    masked); each decoder step feeds one token per row through the Transformer's KV cache or
    the LSTM's carried state. A row stops at EOS or after ``max_new_tokens`` tokens.

    Args:
        model: a :class:`Seq2SeqTransformer` or :class:`Seq2SeqLSTM`.
        sources: a list of source id lists (or one list, or a (B, S) tensor padded with pad_id).
        max_new_tokens: the most target tokens per source, EOS included (default and most:
            ``config.max_len``).

    Raises:
        ValueError: an empty source, one longer than max_len, ids outside the source vocabulary.
    """
    srcs, limit = _decode_args(model, sources, max_new_tokens, batch_size)
    cfg = model.config  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    out: List[List[int]] = [[] for _ in srcs]
    order = _length_order(srcs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            memory = model.encode(right_padded([srcs[i] for i in idx], cfg.pad_id, device)[0])  # type: ignore[operator]
            state = model.start(len(idx), limit, memory)  # type: ignore[operator]
            tok = torch.full((len(idx),), cfg.bos_id, dtype=torch.int64, device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            steps: List[torch.Tensor] = []
            for _ in range(limit):
                tok = model.logits(model.advance(state, tok.view(-1, 1))[:, -1]).argmax(-1)  # type: ignore[operator]
                steps.append(tok)
                done |= tok == cfg.eos_id
                if bool(done.all()):
                    break
            rows = torch.stack(steps, 1).tolist()
            for r, i in enumerate(idx):
                seq = rows[r]
                out[i] = seq[: seq.index(cfg.eos_id)] if cfg.eos_id in seq else seq
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def beam_search(
    model: nn.Module,
    sources,
    beam_size: int = 4,
    max_new_tokens: Optional[int] = None,
    length_penalty: float = 1.0,
    batch_size: int = 16,
) -> List[List[int]]:
    """Beam-search translation: the best target ids of each source, without BOS and EOS.

    Each source keeps ``beam_size`` running hypotheses; at each step the ``2 * beam_size``
    best extensions are taken, those ending in EOS among the top ``beam_size`` become finished
    hypotheses scored ``sum of log-probs / length ** length_penalty`` (length = tokens
    generated, EOS included), the others continue. A source is done once it holds
    ``beam_size`` finished hypotheses and its best running one cannot beat the worst of them
    at the current length (transformers' default stopping rule); at ``max_new_tokens`` the
    running hypotheses are scored as they stand. ``beam_size=1`` gives exactly
    :func:`greedy_decode`. Sources of different lengths share batches as in greedy decoding.

    Raises:
        ValueError: ``beam_size`` < 1, and the bad inputs :func:`greedy_decode` rejects.
    """
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    srcs, limit = _decode_args(model, sources, max_new_tokens, batch_size)
    cfg = model.config  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    K, eos = beam_size, cfg.eos_id
    out: List[List[int]] = [[] for _ in srcs]
    order = _length_order(srcs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            B = len(idx)
            memory = model.encode(right_padded([srcs[i] for i in idx], cfg.pad_id, device)[0])  # type: ignore[operator]
            state = model.start(B, limit, memory)  # type: ignore[operator]
            state = model.select(state, torch.arange(B, device=device).repeat_interleave(K))  # K beams per source
            scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
            scores[:, 0] = 0.0  # one live beam per source at the start
            seqs = torch.zeros(B * K, 0, dtype=torch.int64)
            tok = torch.full((B * K,), cfg.bos_id, dtype=torch.int64, device=device)
            finished: List[List[Tuple[float, List[int]]]] = [[] for _ in range(B)]
            done = [False] * B
            for t in range(limit):
                logits = model.logits(model.advance(state, tok.view(-1, 1))[:, -1])  # type: ignore[operator]
                logp = F.log_softmax(logits.double(), dim=-1).cpu()
                V = logp.size(-1)
                cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
                top, pos = cand.topk(min(2 * K, K * V), dim=1)  # best first
                beam_of, token_of = pos // V, pos % V
                new_scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
                rows = torch.zeros(B, K, dtype=torch.int64)
                toks = torch.full((B, K), eos, dtype=torch.int64)
                length = t + 1
                for b in range(B):
                    if done[b]:
                        rows[b] = b * K  # keep a harmless row; its results are ignored
                        continue
                    k = 0
                    for rank in range(top.size(1)):
                        s = float(top[b, rank])
                        if s == float("-inf"):
                            break
                        src_row = b * K + int(beam_of[b, rank])
                        if int(token_of[b, rank]) == eos:
                            if rank < K:
                                hyp = seqs[src_row].tolist()
                                finished[b].append((s / length**length_penalty, hyp))
                            continue
                        new_scores[b, k], rows[b, k], toks[b, k] = s, src_row, int(token_of[b, rank])
                        k += 1
                        if k == K:
                            break
                    if len(finished[b]) >= K:
                        finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                        best_running = float(new_scores[b].max())
                        if best_running == float("-inf") or finished[b][-1][0] >= best_running / length**length_penalty:
                            done[b] = True
                    elif k == 0:
                        done[b] = True
                scores = new_scores
                flat = rows.view(-1)
                seqs = torch.cat([seqs.index_select(0, flat), toks.view(-1, 1)], dim=1)
                if all(done) or t == limit - 1:
                    break
                state = model.select(state, flat.to(device))  # type: ignore[operator]
                tok = toks.view(-1).to(device)
            for b in range(B):
                pool = list(finished[b])
                if not done[b]:  # out of steps: the running hypotheses count as they stand
                    for k in range(K):
                        s = float(scores[b, k])
                        if s > float("-inf"):
                            pool.append((s / seqs.size(1) ** length_penalty, seqs[b * K + k].tolist()))
                best = max(pool, key=lambda h: h[0]) if pool else (0.0, [])
                out[idx[b]] = best[1]
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def decode_uncached(model: nn.Module, sources, max_new_tokens: Optional[int] = None) -> List[List[int]]:
    """Greedy translation the plain way: every step re-runs the whole model on the source and
    the target so far (no cache, no carried state). The reference that the cached decoding is
    tested and benchmarked against."""
    srcs, limit = _decode_args(model, sources, max_new_tokens, 1 << 30)
    cfg = model.config  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        src = right_padded(srcs, cfg.pad_id, device)[0]
        tgt = torch.full((len(srcs), 1), cfg.bos_id, dtype=torch.int64, device=device)
        done = torch.zeros(len(srcs), dtype=torch.bool, device=device)
        for _ in range(limit):
            logits, _ = model(src, tgt)
            nxt = logits[:, -1].argmax(-1)
            tgt = torch.cat([tgt, nxt[:, None]], dim=1)
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    out = []
    for row in tgt[:, 1:].tolist():
        out.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return out
