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

__all__ = ["lstm_layer", "gru_layer", "num_threads"]


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
    def forward(ctx, mode: str, batch_sizes: Tuple[int, ...], reverse: bool, x, h0, c0, w_ih, w_hh, b_ih, b_hh):  # type: ignore[override]
        threads = num_threads()
        y, h_n, c_n, gates, cs = _core.rnn_forward(
            mode, _np(x), list(batch_sizes), reverse, _np(h0), _np(c0), _np(w_ih), _np(w_hh), _np(b_ih), _np(b_hh), threads
        )
        y, h_n, c_n, gates, cs = (_t(a) for a in (y, h_n, c_n, gates, cs))
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
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = _core.rnn_backward(
            ctx.mode, _np(x), list(ctx.batch_sizes), ctx.reverse, _np(h0), _np(c0) if lstm else None, _np(w_ih), _np(w_hh),
            _np(b_ih_a), _np(b_hh_a), _np(y), _np(gates), _np(cs), _np(dy), _np(dh_n), _np(dc_n) if lstm else None, num_threads(),
        )
        return (
            None, None, None,
            _t(dx), _t(dh0), _t(dc0) if lstm else None, _t(dw_ih), _t(dw_hh),
            _t(db_ih) if ctx.has_bias[0] else None, _t(db_hh) if ctx.has_bias[1] else None,
        )


def lstm_layer(x, batch_sizes: Sequence[int], h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, reverse: bool = False):
    """One LSTM layer direction over packed rows; returns ``(y, h_n, c_n)``.

    Args:
        x: (N, I) packed input rows (step t's rows follow step t-1's; N = sum(batch_sizes)).
        batch_sizes: rows per step, non-increasing.
        h0, c0: (B, H) initial states, B = batch_sizes[0], in the packed (sorted) order.
        w_ih: (4H, I); w_hh: (4H, H); b_ih, b_hh: (4H,) or None. Gate order i, f, g, o.
        reverse: run the sequences backwards (the reverse direction of a bidirectional layer).

    Returns:
        y: (N, H) packed outputs; h_n, c_n: (B, H).
    """
    return _RNNLayer.apply("lstm", tuple(int(b) for b in batch_sizes), bool(reverse), x, h0, c0, w_ih, w_hh, b_ih, b_hh)


def gru_layer(x, batch_sizes: Sequence[int], h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse: bool = False):
    """One GRU layer direction over packed rows; returns ``(y, h_n)``. Gate order r, z, n;
    weights (3H, I) and (3H, H). See :func:`lstm_layer`."""
    return _RNNLayer.apply("gru", tuple(int(b) for b in batch_sizes), bool(reverse), x, h0, None, w_ih, w_hh, b_ih, b_hh)
