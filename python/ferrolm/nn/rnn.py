"""Drop-in ``torch.nn.LSTM`` and ``torch.nn.GRU`` on ferrolm's fused CPU kernels.

The classes subclass torch's, so the constructor, parameter names and shapes
(``weight_ih_l0``, ``weight_hh_l0_reverse``, ...), ``state_dict`` and ``.cuda()`` are torch's
own, and ``load_state_dict`` works both ways. CPU float32/float64 inputs run in Rust (the whole
sequence per layer direction, forward and backward); CUDA tensors and other dtypes go to
torch's implementation (cuDNN on GPU). Extra: ``forward(input, hx, lengths=...)`` for padded
batches of different lengths, computed in proportion to the real tokens.

Example:
    >>> import torch, ferrolm.nn
    >>> lstm = ferrolm.nn.LSTM(16, 32, num_layers=2, batch_first=True)
    >>> out, (h, c) = lstm(torch.randn(4, 10, 16))
    >>> out.shape, h.shape
    (torch.Size([4, 10, 32]), torch.Size([2, 4, 32]))
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..kernels import dropout as _dropout
from ..kernels import gru_layer, lstm_layer
from ..kernels._common import needs_grad as _needs_grad

__all__ = ["LSTM", "GRU"]

_FAST_DTYPES = (torch.float32, torch.float64)


class _FusedRNNMixin:
    """Shared forward logic; the subclass sets ``_lstm``."""

    _lstm: bool

    def _use_fused(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _FAST_DTYPES

    def _layer_params(self, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih = getattr(self, "weight_ih" + sfx)
        w_hh = getattr(self, "weight_hh" + sfx)
        b_ih = getattr(self, "bias_ih" + sfx) if self.bias else None
        b_hh = getattr(self, "bias_hh" + sfx) if self.bias else None
        return w_ih, w_hh, b_ih, b_hh

    def _check_input(self, x: torch.Tensor, batched: bool) -> None:
        expect = 3 if batched else 2
        if x.dim() != expect:
            raise ValueError(
                f"{type(self).__name__}: expected input of {expect} dims, got {x.dim()} (shape {tuple(x.shape)})"
            )
        if x.size(-1) != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: input has {x.size(-1)} features, expected input_size={self.input_size}"
            )

    def _check_state(self, name: str, s: torch.Tensor, batch: int) -> None:
        dirs = 2 if self.bidirectional else 1
        want = (self.num_layers * dirs, batch, self.hidden_size)
        if tuple(s.shape) != want:
            raise ValueError(
                f"{type(self).__name__}: {name} has shape {tuple(s.shape)}, expected {want} "
                "(num_layers*num_directions, batch, hidden_size)"
            )
        if s.dtype != self.weight_ih_l0.dtype and s.dtype not in _FAST_DTYPES:
            raise TypeError(f"{name} has dtype {s.dtype}, expected {self.weight_ih_l0.dtype}")

    def _run_packed(
        self,
        data: torch.Tensor,
        batch_sizes: List[int],
        h0: torch.Tensor,
        c0: Optional[torch.Tensor],
        batch_first: bool = False,
    ):
        """All layers and directions over packed rows (or, with ``batch_first``, rows in
        batch-first order: inference over one length); states are (L*D, B, H) in sorted order."""
        dirs = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        x = data
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                w_ih, w_hh, b_ih, b_hh = self._layer_params(layer, d)
                if self._lstm:
                    y, h, c = lstm_layer(
                        x, batch_sizes, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, reverse=bool(d), batch_first=batch_first
                    )
                    c_n.append(c)
                else:
                    y, h = gru_layer(
                        x, batch_sizes, h0[k], w_ih, w_hh, b_ih, b_hh, reverse=bool(d), batch_first=batch_first
                    )
                h_n.append(h)
                outs.append(y)
            x = outs[0] if dirs == 1 else torch.cat(outs, dim=1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = _dropout(x, p=self.dropout, training=True)
        h_n_t = torch.stack(h_n)
        c_n_t = torch.stack(c_n) if self._lstm else None
        return x, h_n_t, c_n_t

    def forward(self, input, hx=None, lengths=None):  # type: ignore[override]
        """CPU float32/float64: the fused kernels; anything else: torch's own implementation
        (``lengths`` then goes through ``pack_padded_sequence``)."""
        data = input.data if isinstance(input, PackedSequence) else input
        if data.dim() == 3 and data.size(0 if self.batch_first else 1) == 0:
            return super().forward(input, hx)  # type: ignore[misc]  # an empty batch: torch's empty outputs
        if not self._use_fused(data):
            torch_forward = super().forward  # type: ignore[misc]
            if lengths is not None:
                packed = pack_padded_sequence(
                    input, torch.as_tensor(lengths).cpu(), batch_first=self.batch_first, enforce_sorted=False
                )
                out, state = torch_forward(packed, hx)
                steps = input.size(1) if self.batch_first else input.size(0)
                return pad_packed_sequence(out, batch_first=self.batch_first, total_length=steps)[0], state
            return torch_forward(input, hx)
        return self._fused_forward(input, hx, lengths)

    def _fused_forward(self, input, hx, lengths):
        cls = type(self).__name__
        dirs = 2 if self.bidirectional else 1
        is_packed = isinstance(input, PackedSequence)
        if lengths is not None and is_packed:
            raise ValueError(f"{cls}: pass lengths= with a padded tensor, not with a PackedSequence")
        unbatched = False
        if is_packed:
            data, batch_sizes_t, sorted_idx, unsorted_idx = input
            self._check_input(data, batched=False)
            batch = int(batch_sizes_t[0])
        else:
            if input.dim() == 2:
                if lengths is not None:
                    raise ValueError(f"{cls}: lengths= needs a batched (3-D) input")
                unbatched = True
                input = input.unsqueeze(0 if self.batch_first else 1)
                if hx is not None:
                    hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
            self._check_input(input, batched=True)
            batch = input.size(0) if self.batch_first else input.size(1)
            steps = input.size(1) if self.batch_first else input.size(0)
            if lengths is not None:
                lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
                if lengths.shape != (batch,):
                    raise ValueError(
                        f"{cls}: lengths has shape {tuple(lengths.shape)}, expected ({batch},) "
                        "(one length per sequence)"
                    )
                if (lengths <= 0).any() or (lengths > steps).any():
                    raise ValueError(
                        f"{cls}: lengths must be in [1, {steps}] (the padded length), "
                        f"got min {int(lengths.min())}, max {int(lengths.max())}"
                    )
                packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)
                data, batch_sizes_t, sorted_idx, unsorted_idx = packed
            else:
                # Inference over a batch-first tensor: the kernels read and write batch-first
                # rows themselves (no transposed copies in and out).
                states = () if hx is None else (hx if isinstance(hx, tuple) else (hx,))
                rows_bf = self.batch_first and not unbatched and not _needs_grad(input, *states, *self.parameters())
                x = input.transpose(0, 1) if self.batch_first and not rows_bf else input
                data = x.reshape(steps * batch, self.input_size)
                batch_sizes_t = torch.full((steps,), batch, dtype=torch.int64)
                sorted_idx = unsorted_idx = None
        dtype = data.dtype
        if self.weight_ih_l0.dtype != dtype:
            raise TypeError(
                f"{cls}: input dtype {dtype} differs from the weights' {self.weight_ih_l0.dtype}; "
                "convert one (module.to(dtype))"
            )
        # Initial states, in the packed (sorted) order.
        zeros = torch.zeros(self.num_layers * dirs, batch, self.hidden_size, dtype=dtype)
        if self._lstm:
            if hx is None:
                h0, c0 = zeros, zeros
            else:
                if not (isinstance(hx, tuple) and len(hx) == 2):
                    raise TypeError(f"{cls}: hx must be a tuple (h0, c0)")
                h0, c0 = hx
                self._check_state("h0", h0, batch)
                self._check_state("c0", c0, batch)
        else:
            h0 = zeros if hx is None else hx
            if hx is not None:
                self._check_state("h0", h0, batch)
            c0 = None
        if sorted_idx is not None:
            h0 = h0.index_select(1, sorted_idx)
            c0 = c0.index_select(1, sorted_idx) if c0 is not None else None
        rows_bf = not is_packed and lengths is None and rows_bf
        y, h_n, c_n = self._run_packed(data, [int(b) for b in batch_sizes_t], h0, c0, batch_first=rows_bf)
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None
        state = (h_n, c_n) if self._lstm else h_n
        if is_packed:
            return PackedSequence(y, batch_sizes_t, sorted_idx, unsorted_idx), state
        if lengths is not None:
            out, _ = pad_packed_sequence(
                PackedSequence(y, batch_sizes_t, sorted_idx, unsorted_idx),
                batch_first=self.batch_first,
                total_length=steps,
            )
        elif rows_bf:
            out = y.view(batch, steps, -1)
        else:
            out = y.view(steps, batch, -1)
            if self.batch_first:
                out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = (h_n.squeeze(1), c_n.squeeze(1)) if self._lstm else h_n.squeeze(1)
        return out, state


class LSTM(_FusedRNNMixin, torch.nn.LSTM):
    """``torch.nn.LSTM`` with fused Rust kernels on CPU (same constructor and parameters).

    ``forward(input, hx=None, lengths=None)``: ``input`` is a tensor (T, B, I) / (B, T, I) with
    ``batch_first`` / (T, I) unbatched, or a ``PackedSequence``; ``hx = (h0, c0)``;
    ``lengths`` (B,) marks the real length of each padded sequence (outputs past it are 0 and
    ``h_n`` is each sequence's last real state, as with ``pack_padded_sequence``).

    Raises:
        NotImplementedError: ``proj_size > 0`` (not implemented by the fused kernel yet).
    """

    _lstm = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.proj_size > 0:
            raise NotImplementedError(
                "ferrolm.nn.LSTM does not support proj_size > 0 yet; use torch.nn.LSTM for projections"
            )


class GRU(_FusedRNNMixin, torch.nn.GRU):
    """``torch.nn.GRU`` with fused Rust kernels on CPU (same constructor and parameters);
    ``forward(input, hx=None, lengths=None)`` as :class:`LSTM`, with ``hx = h0``."""

    _lstm = False
