"""KV-cache decode attention over the Rust decode kernel (``rust/kernels/decode.rs``): one
new token per sequence against caches of different lengths (inference only; other devices
and dtypes go through :func:`ferrolm.kernels.attention.attention` with a padding mask).
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from .. import _core
from ._common import num_threads, to_numpy
from .attention import attention

__all__ = ["decode_attention"]


def _lengths(cache_lengths) -> List[int]:
    """``cache_lengths`` as ints; floats (2.7 would silently become 2) and bools are a TypeError."""
    if isinstance(cache_lengths, torch.Tensor):
        if cache_lengths.dtype.is_floating_point or cache_lengths.dtype.is_complex or cache_lengths.dtype == torch.bool:
            raise TypeError(f"cache_lengths must hold integers, got a {cache_lengths.dtype} tensor")
        return [int(x) for x in cache_lengths.reshape(-1).tolist()]
    if isinstance(cache_lengths, np.ndarray):
        if cache_lengths.dtype.kind not in "iu":
            raise TypeError(f"cache_lengths must hold integers, got a {cache_lengths.dtype} array")
        return [int(x) for x in cache_lengths.reshape(-1).tolist()]
    try:
        values = list(cache_lengths)
    except TypeError:
        raise TypeError(f"cache_lengths must be a sequence of ints, got {type(cache_lengths).__name__}") from None
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"cache_lengths must hold ints, got {x!r} ({type(x).__name__})")
    return [int(x) for x in values]


def decode_attention(q, k_cache, v_cache, cache_lengths, scale: Optional[float] = None):
    """Attention of one new token per sequence against KV caches of different lengths.

    Args:
        q: (B, Hq, D) or (B, Hq, 1, D).
        k_cache: (B, Hk, L, D); v_cache: (B, Hk, L, Dv); ``Hk`` divides ``Hq``.
        cache_lengths: (B,) ints in [0, L]: sequence b attends to its first
            ``cache_lengths[b]`` cached keys (0 gives zeros).
        scale: default ``1/sqrt(D)``.

    The caches share ``q``'s dtype, or are float16 under a float32 ``q`` (the kernel converts
    them block by block; other devices convert them first).

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
    if (
        k_cache.shape[0] != b
        or v_cache.shape[0] != b
        or k_cache.shape[3] != d
        or k_cache.shape[:3] != v_cache.shape[:3]
    ):
        raise ValueError(
            f"shapes do not agree: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    hk, cap = k_cache.shape[1], k_cache.shape[2]
    if hk == 0 or hq % hk:
        raise ValueError(f"kv heads ({hk}) must divide query heads ({hq})")
    if d == 0 or v_cache.shape[3] == 0:
        raise ValueError(f"head_dim must be positive: q/k_cache have {d}, v_cache {v_cache.shape[3]}")
    half_cache = q.dtype == torch.float32 and k_cache.dtype == v_cache.dtype == torch.float16
    if not (q.dtype == k_cache.dtype == v_cache.dtype) and not half_cache:
        raise TypeError(
            f"q and the caches must share a dtype (or be float32 q over float16 caches), got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    lengths = _lengths(cache_lengths)
    if len(lengths) != b or any(x < 0 or x > cap for x in lengths):
        raise ValueError(f"cache_lengths must hold {b} ints in [0, {cap}], got {lengths}")
    scale = (1.0 / d**0.5) if scale is None else float(scale)
    if b == 0:
        out = q.new_zeros(0, hq, v_cache.shape[3])
        return out[:, :, None] if squeeze else out
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and not grad:
        out = torch.from_numpy(
            _core.decode_attention(to_numpy(q), to_numpy(k_cache), to_numpy(v_cache), lengths, scale, num_threads())
        )
    else:
        if half_cache:
            k_cache, v_cache = k_cache.to(q.dtype), v_cache.to(q.dtype)
        pad = torch.arange(cap, device=q.device)[None, :] >= torch.tensor(lengths, device=q.device)[:, None]
        out = attention(q[:, :, None], k_cache, v_cache, key_padding_mask=pad, scale=scale)[:, :, 0]
    return out[:, :, None] if squeeze else out
