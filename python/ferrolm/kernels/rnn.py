"""LSTM and GRU layers as ``torch.autograd.Function``s over the Rust recurrent kernels
(``rust/kernels/rnn.rs``), CPU float32/float64.

Each Function runs one layer direction over a *packed* batch (rows of step t are the
sequences still running, longest first, as in ``PackedSequence``), forward and backward in
Rust with the GIL released; the three large backward products (dx, dW_ih, dW_hh) use torch's
GEMM. ``ferrolm.testing.reference`` holds the pure-torch twins; :mod:`ferrolm.nn.rnn` composes
layers and directions and delegates other devices to torch.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .. import _core
from ._common import from_numpy, needs_grad, num_threads, to_numpy

__all__ = ["lstm_layer", "gru_layer"]


class _RNNLayer(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        mode: str,
        batch_sizes: Tuple[int, ...],
        reverse: bool,
        keep: bool,
        batch_first: bool,
        x,
        h0,
        c0,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
    ):  # type: ignore[override]
        threads = num_threads()
        # keep is False for inference (grad mode off, or nothing requires a gradient): the
        # layer then keeps no gate activations or cell states for a backward. batch_first
        # (inference only): x and y rows in batch-first order.
        y, h_n, c_n, gates, cs = _core.rnn_forward(
            mode,
            to_numpy(x),
            list(batch_sizes),
            reverse,
            to_numpy(h0),
            to_numpy(c0),
            to_numpy(w_ih),
            to_numpy(w_hh),
            to_numpy(b_ih),
            to_numpy(b_hh),
            threads,
            keep,
            batch_first,
        )
        y, h_n, c_n, gates, cs = (from_numpy(a) for a in (y, h_n, c_n, gates, cs))
        if gates is None:
            gates = cs = torch.empty(0)
        ctx.mode, ctx.batch_sizes, ctx.reverse = mode, batch_sizes, reverse
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(
            x,
            h0,
            c0 if c0 is not None else torch.empty(0),
            w_ih,
            w_hh,
            b_ih if b_ih is not None else torch.empty(0),
            b_hh if b_hh is not None else torch.empty(0),
            y,
            gates,
            cs,
        )
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
        # GEMM, as fast here as a Rust packed kernel was (docs/kernels.md).
        gw = (4 if lstm else 3) * h0.shape[-1]
        dgx, dgh, hprev, dh0, dc0 = _core.rnn_backward(
            ctx.mode,
            to_numpy(x),
            list(ctx.batch_sizes),
            ctx.reverse,
            to_numpy(h0),
            to_numpy(c0) if lstm else None,
            to_numpy(w_ih),
            to_numpy(w_hh),
            to_numpy(b_ih_a),
            to_numpy(b_hh_a),
            to_numpy(y),
            to_numpy(gates),
            to_numpy(cs),
            to_numpy(dy),
            to_numpy(dh_n),
            to_numpy(dc_n) if lstm else None,
            num_threads(),
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
        return (
            None,
            None,
            None,
            None,
            None,
            dx,
            from_numpy(dh0),
            from_numpy(dc0) if lstm else None,
            dw_ih,
            dw_hh,
            db_ih,
            db_hh,
        )


def lstm_layer(
    x,
    batch_sizes: Sequence[int],
    h0,
    c0,
    w_ih,
    w_hh,
    b_ih=None,
    b_hh=None,
    reverse: bool = False,
    batch_first: bool = False,
):
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
    keep = needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    _check_batch_first(batch_first, keep)
    return _RNNLayer.apply(
        "lstm",
        tuple(int(b) for b in batch_sizes),
        bool(reverse),
        keep,
        bool(batch_first),
        x,
        h0,
        c0,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
    )


def gru_layer(
    x,
    batch_sizes: Sequence[int],
    h0,
    w_ih,
    w_hh,
    b_ih=None,
    b_hh=None,
    reverse: bool = False,
    batch_first: bool = False,
):
    """One GRU layer direction over packed rows; returns ``(y, h_n)``. Gate order r, z, n;
    weights (3H, I) and (3H, H). See :func:`lstm_layer`."""
    keep = needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
    _check_batch_first(batch_first, keep)
    return _RNNLayer.apply(
        "gru",
        tuple(int(b) for b in batch_sizes),
        bool(reverse),
        keep,
        bool(batch_first),
        x,
        h0,
        None,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
    )


def _check_batch_first(batch_first: bool, keep: bool) -> None:
    if batch_first and keep:
        raise ValueError(
            "batch_first=True is for inference: run it under torch.no_grad() (or with nothing requiring a gradient)"
        )
