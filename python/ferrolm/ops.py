"""Fused kernels as ``torch.autograd.Function``s (CPU, float32/float64).

Each Function runs one layer direction of an LSTM or GRU over a *packed* batch (rows of step
t are the sequences still running, longest first, as in ``PackedSequence``), forward and
backward in Rust with the GIL released. ``ferrolm.reference`` holds the pure-torch twins;
``ferrolm.nn`` composes layers and directions and delegates CUDA tensors to torch.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _core

__all__ = ["lstm_layer", "gru_layer", "attention", "decode_attention", "dropout", "num_threads"]


def num_threads() -> int:
    """The kernels' thread count: ``torch.get_num_threads()`` (never more than that)."""
    return max(1, torch.get_num_threads())


def _np(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return t.detach().contiguous().numpy()


def _t(a) -> Optional[torch.Tensor]:
    return None if a is None else torch.from_numpy(a)


class _RNNLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode: str, batch_sizes: Tuple[int, ...], reverse: bool, keep: bool, batch_first: bool, x, h0, c0, w_ih, w_hh, b_ih, b_hh):  # type: ignore[override]
        threads = num_threads()
        # keep is False for inference (grad mode off, or nothing requires a gradient): the
        # layer then keeps no gate activations or cell states for a backward. batch_first
        # (inference only): x and y rows in batch-first order.
        y, h_n, c_n, gates, cs = _core.rnn_forward(
            mode, _np(x), list(batch_sizes), reverse, _np(h0), _np(c0), _np(w_ih), _np(w_hh), _np(b_ih), _np(b_hh), threads, keep, batch_first
        )
        y, h_n, c_n, gates, cs = (_t(a) for a in (y, h_n, c_n, gates, cs))
        if gates is None:
            gates = cs = torch.empty(0)
        ctx.mode, ctx.batch_sizes, ctx.reverse = mode, batch_sizes, reverse
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, h0, c0 if c0 is not None else torch.empty(0), w_ih, w_hh, b_ih if b_ih is not None else torch.empty(0),
                              b_hh if b_hh is not None else torch.empty(0), y, gates, cs)
        if mode == "lstm":
            return y, h_n, c_n
        return y, h_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n=None):  # type: ignore[override]
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, y, gates, cs = ctx.saved_tensors
        lstm = ctx.mode == "lstm"
        zeros = lambda like: torch.zeros_like(like)  # noqa: E731
        dy = zeros(y) if dy is None else dy
        dh_n = zeros(h0) if dh_n is None else dh_n
        if lstm:
            dc_n = zeros(c0) if dc_n is None else dc_n
        b_ih_a = b_ih if ctx.has_bias[0] else None
        b_hh_a = b_hh if ctx.has_bias[1] else None
        # Rust runs the backward through time (the sequential part: gate gradients and the
        # recurrent product per step); the three large products over all steps go to torch's
        # GEMM. Measured: the gemm crate took 42 ms of a B=8, T=256, H=256 forward+backward;
        # Rust's own packed AVX-512 kernel (`products=True`) ran them as fast as torch's MKL
        # here (A/B in one process: within the machine's noise, either way by size).
        gw = (4 if lstm else 3) * h0.shape[-1]
        dgx, dgh, hprev, dh0, dc0 = _core.rnn_backward(
            ctx.mode, _np(x), list(ctx.batch_sizes), ctx.reverse, _np(h0), _np(c0) if lstm else None, _np(w_ih), _np(w_hh),
            _np(b_ih_a), _np(b_hh_a), _np(y), _np(gates), _np(cs), _np(dy), _np(dh_n), _np(dc_n) if lstm else None, num_threads(),
        )
        # (N, stride) arrays: the first gw columns are the gradients (rows padded off 1 KiB).
        dgx = torch.from_numpy(dgx)[:, :gw]
        dgh = dgx if dgh is None else torch.from_numpy(dgh)[:, :gw]
        hprev = torch.from_numpy(hprev)
        need = ctx.needs_input_grad
        dx = dgx @ w_ih.detach() if need[5] else None
        dw_ih = dgx.t() @ x.detach() if need[8] else None
        dw_hh = dgh.t() @ hprev if need[9] else None
        db_ih = dgx.sum(0) if ctx.has_bias[0] and need[10] else None
        db_hh = dgh.sum(0) if ctx.has_bias[1] and need[11] else None
        return (None, None, None, None, None, dx, _t(dh0), _t(dc0) if lstm else None, dw_ih, dw_hh, db_ih, db_hh)


def lstm_layer(x, batch_sizes: Sequence[int], h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, reverse: bool = False, batch_first: bool = False):
    """One LSTM layer direction over packed rows; returns ``(y, h_n, c_n)``.

    Args:
        x: (N, I) packed input rows (step t's rows follow step t-1's; N = sum(batch_sizes)).
        batch_sizes: rows per step, non-increasing.
        h0, c0: (B, H) initial states, B = batch_sizes[0], in the packed (sorted) order.
        w_ih: (4H, I); w_hh: (4H, H); b_ih, b_hh: (4H,) or None. Gate order i, f, g, o.
        reverse: run the sequences backwards (the reverse direction of a bidirectional layer).
        batch_first: for inference (nothing needs a gradient) over sequences of one length:
            the rows of ``x`` and ``y`` are in batch-first order (``(B, T, I)`` flattened),
            saving the transposed copies.

    Returns:
        y: (N, H) packed outputs; h_n, c_n: (B, H).
    """
    keep = _needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    _check_batch_first(batch_first, keep)
    return _RNNLayer.apply("lstm", tuple(int(b) for b in batch_sizes), bool(reverse), keep, bool(batch_first), x, h0, c0, w_ih, w_hh, b_ih, b_hh)


def gru_layer(x, batch_sizes: Sequence[int], h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse: bool = False, batch_first: bool = False):
    """One GRU layer direction over packed rows; returns ``(y, h_n)``. Gate order r, z, n;
    weights (3H, I) and (3H, H). See :func:`lstm_layer`."""
    keep = _needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
    _check_batch_first(batch_first, keep)
    return _RNNLayer.apply("gru", tuple(int(b) for b in batch_sizes), bool(reverse), keep, bool(batch_first), x, h0, None, w_ih, w_hh, b_ih, b_hh)


def _check_batch_first(batch_first: bool, keep: bool) -> None:
    if batch_first and keep:
        raise ValueError("batch_first=True is for inference: run it under torch.no_grad() (or with nothing requiring a gradient)")


def _needs_grad(*tensors) -> bool:
    """Whether autograd will record a call on these tensors (grad mode on and one requires it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- attention


def _attention_mask(b: int, tq: int, tk: int, causal: bool, key_padding_mask, device) -> Optional[torch.Tensor]:
    """(B, 1, Tq, Tk) bool, True where a query may attend to a key, or None for no mask."""
    if not causal and key_padding_mask is None:
        return None
    allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(tq, device=device)[:, None]
        j = torch.arange(tk, device=device)[None, :]
        allowed = allowed & (j <= i + (tk - tq))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, key_padding_mask, scale: float):  # type: ignore[override]
        mask = _np(key_padding_mask) if key_padding_mask is not None else None
        o, lse = _core.attention_forward(_np(q), _np(k), _np(v), causal, mask, scale, num_threads())
        o, lse = torch.from_numpy(o), torch.from_numpy(lse)
        ctx.causal, ctx.scale, ctx.mask = causal, scale, mask
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, d_o):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _core.attention_backward(_np(q), _np(k), _np(v), _np(o), _np(lse), _np(d_o), ctx.causal, ctx.mask, ctx.scale, num_threads())
        return torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv), None, None, None


def attention(q, k, v, causal: bool = False, key_padding_mask=None, scale: Optional[float] = None):
    """Scaled-dot-product attention with the layout of
    ``torch.nn.functional.scaled_dot_product_attention``; returns ``(B, Hq, Tq, Dv)``.

    Args:
        q: (B, Hq, Tq, D); k: (B, Hk, Tk, D); v: (B, Hk, Tk, Dv). ``Hk`` must divide ``Hq``
            (grouped-query attention: query head h uses kv head ``h // (Hq // Hk)``).
        causal: query i attends to keys ``j <= i + Tk - Tq`` (aligned to the end, so a query
            block appended to a KV cache sees the whole cache).
        key_padding_mask: (B, Tk) bool, True for keys to ignore (``nn.MultiheadAttention``'s
            convention).
        scale: the score scale (default ``1/sqrt(D)``).

    Returns:
        The attention output; a query row with no visible key is all zeros (not NaN).

    Raises:
        ValueError / TypeError: mismatched shapes, heads that do not divide, mixed dtypes or
            devices, a mask of the wrong shape or dtype.

    CPU float32/float64 run ferrolm's Rust kernels (forward and backward); other devices and
    dtypes run torch's ``scaled_dot_product_attention``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, time, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, tq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k head_dim {k.shape[3]} differs from q's {d}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share heads and time")
    hk, tk = k.shape[1], k.shape[2]
    if hk == 0 or hq % hk:
        raise ValueError(f"kv heads ({hk}) must divide query heads ({hq})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = ignore the key)")
        if tuple(key_padding_mask.shape) != (b, tk):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected ({b}, {tk}) (batch, key time)")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    scale = (1.0 / d**0.5) if scale is None else float(scale)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        return _Attention.apply(q, k, v, bool(causal), key_padding_mask, scale)
    # Other devices and dtypes: torch's SDPA, with the same mask semantics and zeros for rows
    # that see no key.
    group = hq // hk
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = _attention_mask(b, tq, tk, bool(causal), key_padding_mask, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out


def decode_attention(q, k_cache, v_cache, cache_lengths, scale: Optional[float] = None):
    """Attention of one new token per sequence against KV caches of different lengths.

    Args:
        q: (B, Hq, D) or (B, Hq, 1, D).
        k_cache: (B, Hk, L, D); v_cache: (B, Hk, L, Dv); ``Hk`` divides ``Hq``.
        cache_lengths: (B,) ints in [0, L]: sequence b attends to its first
            ``cache_lengths[b]`` cached keys (0 gives zeros).
        scale: default ``1/sqrt(D)``.

    Returns:
        (B, Hq, Dv) or (B, Hq, 1, Dv), like ``q``; equal to :func:`attention` on the last
        position with the keys past each length masked.

    CPU float32/float64 without autograd run the Rust kernel (split over the cache so both
    cores stream it); otherwise :func:`attention` with a padding mask.
    """
    squeeze = False
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"decode_attention takes one query per sequence; q has {q.shape[2]} (use attention())")
        q = q[:, :, 0]
        squeeze = True
    for name, t, nd in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != nd:
            raise ValueError(f"{name} must be {nd}-D, got shape {tuple(t.shape)}")
    b, hq, d = q.shape
    if k_cache.shape[0] != b or v_cache.shape[0] != b or k_cache.shape[3] != d or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    hk, cap = k_cache.shape[1], k_cache.shape[2]
    if hk == 0 or hq % hk:
        raise ValueError(f"kv heads ({hk}) must divide query heads ({hq})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    lengths = [int(x) for x in (cache_lengths.tolist() if hasattr(cache_lengths, "tolist") else cache_lengths)]
    if len(lengths) != b or any(x < 0 or x > cap for x in lengths):
        raise ValueError(f"cache_lengths must hold {b} ints in [0, {cap}], got {lengths}")
    scale = (1.0 / d**0.5) if scale is None else float(scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and not grad:
        out = torch.from_numpy(_core.decode_attention(_np(q), _np(k_cache), _np(v_cache), lengths, scale, num_threads()))
    else:
        pad = torch.arange(cap, device=q.device)[None, :] >= torch.tensor(lengths, device=q.device)[:, None]
        out = attention(q[:, :, None], k_cache, v_cache, key_padding_mask=pad, scale=scale)[:, :, 0]
    return out[:, :, None] if squeeze else out


# --------------------------------------------------------------------------- dropout


def _dropout_into(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    x = x.detach().contiguous()
    out = torch.empty_like(x)
    _core.dropout(x.numpy(), out.numpy(), p, seed, num_threads())
    return out


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        return _dropout_into(x, p, seed)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # The mask is a pure function of (seed, element index): regenerated, never stored.
        return _dropout_into(grad, ctx.p, ctx.seed), None, None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout`` with a fused Rust kernel for CPU float32/float64.

    Each element is kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``, as torch's;
    the mask comes from a counter-based hash of a seed drawn from torch's global generator (so
    ``torch.manual_seed`` makes it reproducible) and the element's index, and the backward
    regenerates it instead of keeping it in memory. The random numbers differ from torch's
    own dropout (the distribution is the same). Other devices and dtypes use
    ``torch.nn.functional.dropout``.

    Raises:
        ValueError: ``p`` outside [0, 1].
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.nn.functional.dropout(x, p, True)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return _Dropout.apply(x, float(p), seed)
