"""Scaled-dot-product attention as a ``torch.autograd.Function`` over the Rust attention
kernel (``rust/kernels/attention.rs``): SDPA's layout, causal mask aligned to the end, key
padding, grouped-query attention, forward and backward; other devices and dtypes go to
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _core
from ._common import num_threads, to_numpy

__all__ = ["attention", "attention_mask"]


def attention_mask(b: int, tq: int, tk: int, causal: bool, key_padding_mask, device) -> Optional[torch.Tensor]:
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
        mask = to_numpy(key_padding_mask) if key_padding_mask is not None else None
        o, lse = _core.attention_forward(to_numpy(q), to_numpy(k), to_numpy(v), causal, mask, scale, num_threads())
        o, lse = torch.from_numpy(o), torch.from_numpy(lse)
        ctx.causal, ctx.scale, ctx.mask = causal, scale, mask
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, d_o):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _core.attention_backward(
            to_numpy(q),
            to_numpy(k),
            to_numpy(v),
            to_numpy(o),
            to_numpy(lse),
            to_numpy(d_o),
            ctx.causal,
            ctx.mask,
            ctx.scale,
            num_threads(),
        )
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
    if d == 0 or v.shape[3] == 0:
        raise ValueError(
            f"head_dim must be positive: q/k have head_dim {d}, v {v.shape[3]} (q {tuple(q.shape)}, v {tuple(v.shape)})"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = ignore the key)")
        if tuple(key_padding_mask.shape) != (b, tk):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected ({b}, {tk}) (batch, key time)"
            )
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
    mask = attention_mask(b, tq, tk, bool(causal), key_padding_mask, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out
