"""Autoregressive generation for ferrolm's language models.

Prompts of different lengths run as one batch without padding waste: they are right-padded
for the prompt pass (causal attention never lets a real token see the pads after it, and the
LSTM stops each row at its own length), then every row decodes at its own position — the GPT's
KV cache keeps a length per row and the decode kernel attends to exactly that many keys; the
LSTM carries each row's state. Inputs padded on the left with an attention mask (Hugging Face's
convention) are accepted and regrouped the same way.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch

__all__ = ["generate", "sample_next"]

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[int]]


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
        raise TypeError(f"prompts must be a tensor, a list of ids or a list of id lists, got {type(idx).__name__}") from None
    for p in prompts:
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            raise TypeError("each prompt must be a list of int token ids")
    return prompts


def sample_next(logits: torch.Tensor, temperature: Optional[float] = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token of each row (B,) from logits (B, V): argmax when ``temperature`` is 0 or
    None (exactly ``logits.argmax(-1)``), else a sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens and to the smallest set whose probability
    reaches ``top_p`` (nucleus)."""
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
def generate(model, idx: Prompts, max_new_tokens: int, temperature: Optional[float] = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, stop_ids: Union[int, Iterable[int], None] = None, seed: Optional[int] = None,
             attention_mask: Optional[torch.Tensor] = None) -> List[List[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`ferrolm.models.GPT` or :class:`ferrolm.models.LSTMLanguageModel`.
        idx: one prompt (list of ids or (T,) tensor), a list of prompts of any lengths, or a
            (B, T) tensor; with ``attention_mask`` (B, T) (1 = token, 0 = pad, left or right
            padding) only the masked-in ids are the prompt.
        max_new_tokens: tokens to add per prompt (>= 0).
        temperature: 0 or None = greedy (argmax); else the softmax temperature.
        top_k, top_p: sampling filters (see :func:`sample_next`).
        stop_ids: a row stops after emitting one of these ids (it is kept in the output).
        seed: seeds a private generator so the same call gives the same tokens; None uses
            torch's global RNG.

    Returns:
        The new tokens of each prompt (a list per prompt, without the prompt).

    Raises:
        ValueError: empty prompts, ids outside the vocabulary, a prompt plus
            ``max_new_tokens`` longer than the GPT's block_size, bad sampling options.

    Example:
        >>> from ferrolm.models import GPT, GPTConfig
        >>> m = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=8))
        >>> out = generate(m, [[1, 2, 3], [4]], max_new_tokens=5, temperature=0)
        >>> [len(o) for o in out]
        [5, 5]
    """
    from .models import GPT, LSTMLanguageModel

    if not isinstance(model, (GPT, LSTMLanguageModel)):
        raise TypeError(f"generate needs a ferrolm GPT or LSTMLanguageModel, got {type(model).__name__}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stops = set() if stop_ids is None else ({int(stop_ids)} if isinstance(stop_ids, int) else {int(s) for s in stop_ids})
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
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    T = int(lens.max())
    is_gpt = isinstance(model, GPT)
    if is_gpt and T + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds block_size={model.config.block_size}; "
                         "shorten the prompt or generate fewer tokens")
    out: List[List[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    device = next(model.parameters()).device
    padded = torch.zeros(B, T, dtype=torch.int64)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
    padded = padded.to(device)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    rows = torch.arange(B, device=device)
    was_training = model.training
    model.eval()
    try:
        if is_gpt:
            cache = model.new_cache(B, T + max_new_tokens)
            h = model.hidden_states(padded, lengths=lens, cache=cache)
            head = model.lm_head
        else:
            h, state = model.forward_state(padded, None, lengths=lens)
            head = model.head
        logits = head(h[rows, lens.to(device) - 1])  # (B, V)
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
            tok = nxt.view(B, 1)
            if is_gpt:
                h = model.hidden_states(tok, cache=cache)
            else:
                h, state = model.forward_state(tok, state)
            logits = head(h[:, -1])
    finally:
        model.train(was_training)
    return out
