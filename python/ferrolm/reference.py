"""Pure-PyTorch twins of ferrolm's fused kernels, with identical semantics and layouts.

Tests compare the kernels with these (and with torch's own modules); benchmarks use torch's
modules as the baseline.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = ["lstm_layer", "gru_layer", "attention"]


def _steps(batch_sizes: Sequence[int], reverse: bool):
    offsets = [0]
    for b in batch_sizes:
        offsets.append(offsets[-1] + int(b))
    order = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    return offsets, order


def lstm_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer direction over packed rows, step by step in torch ops (see
    :func:`ferrolm.ops.lstm_layer` for the layout)."""
    offsets, order = _steps(batch_sizes, reverse)
    h, c = h0.clone(), c0.clone()
    ys = [None] * len(batch_sizes)
    for t in order:
        bs = int(batch_sizes[t])
        g = x[offsets[t] : offsets[t] + bs] @ w_ih.t() + h[:bs] @ w_hh.t()
        if b_ih is not None:
            g = g + b_ih
        if b_hh is not None:
            g = g + b_hh
        i, f, gg, o = g.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[:bs] + torch.sigmoid(i) * torch.tanh(gg)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        h = torch.cat([h_new, h[bs:]])
        c = torch.cat([c_new, c[bs:]])
        ys[t] = h_new
    return torch.cat(ys), h, c


def gru_layer(x, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer direction over packed rows, step by step in torch ops."""
    offsets, order = _steps(batch_sizes, reverse)
    h = h0.clone()
    ys = [None] * len(batch_sizes)
    for t in order:
        bs = int(batch_sizes[t])
        gx = x[offsets[t] : offsets[t] + bs] @ w_ih.t()
        gh = h[:bs] @ w_hh.t()
        if b_ih is not None:
            gx = gx + b_ih
        if b_hh is not None:
            gh = gh + b_hh
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h_new = (1 - z) * n + z * h[:bs]
        h = torch.cat([h_new, h[bs:]])
        ys[t] = h_new
    return torch.cat(ys), h


def attention(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """Scaled-dot-product attention in plain torch ops (the math of
    :func:`ferrolm.ops.attention`: end-aligned causal mask, True = padded key, GQA, zeros for a
    query that sees no key)."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    group = hq // hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = (1.0 / d**0.5) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        allowed = allowed & (j <= i + (tk - tq))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~any_key, 0.0), dim=-1).masked_fill(~allowed, 0.0)
    return (p @ v).masked_fill(~any_key, 0.0)
