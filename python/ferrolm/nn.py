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

import math

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import dropout as _dropout
from .ops import _needs_grad, gru_layer, lstm_layer

__all__ = ["LSTM", "GRU", "Dropout", "MultiheadSelfAttention", "MultiheadAttention", "Packed", "KVCache", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "RotaryEmbedding"]

_FAST_DTYPES = (torch.float32, torch.float64)


class Dropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` on ferrolm's fused kernel for CPU float32/float64 (see
    :func:`ferrolm.ops.dropout`: same distribution and scaling, about 15x faster than torch's
    on this machine, no mask kept for the backward); anything else goes to torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.inplace or not self.training or self.p == 0.0:
            return super().forward(input)
        return _dropout(input, self.p, True)


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
            raise ValueError(f"{type(self).__name__}: expected input of {expect} dims, got {x.dim()} (shape {tuple(x.shape)})")
        if x.size(-1) != self.input_size:
            raise ValueError(f"{type(self).__name__}: input has {x.size(-1)} features, expected input_size={self.input_size}")

    def _check_state(self, name: str, s: torch.Tensor, batch: int) -> None:
        dirs = 2 if self.bidirectional else 1
        want = (self.num_layers * dirs, batch, self.hidden_size)
        if tuple(s.shape) != want:
            raise ValueError(f"{type(self).__name__}: {name} has shape {tuple(s.shape)}, expected {want} (num_layers*num_directions, batch, hidden_size)")
        if s.dtype != self.weight_ih_l0.dtype and s.dtype not in _FAST_DTYPES:
            raise TypeError(f"{name} has dtype {s.dtype}, expected {self.weight_ih_l0.dtype}")

    def _run_packed(self, data: torch.Tensor, batch_sizes: List[int], h0: torch.Tensor, c0: Optional[torch.Tensor], batch_first: bool = False):
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
                    y, h, c = lstm_layer(x, batch_sizes, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, reverse=bool(d), batch_first=batch_first)
                    c_n.append(c)
                else:
                    y, h = gru_layer(x, batch_sizes, h0[k], w_ih, w_hh, b_ih, b_hh, reverse=bool(d), batch_first=batch_first)
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
        if not self._use_fused(data):
            torch_forward = super().forward  # type: ignore[misc]
            if lengths is not None:
                packed = pack_padded_sequence(input, torch.as_tensor(lengths).cpu(), batch_first=self.batch_first, enforce_sorted=False)
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
                    raise ValueError(f"{cls}: lengths has shape {tuple(lengths.shape)}, expected ({batch},) (one length per sequence)")
                if (lengths <= 0).any() or (lengths > steps).any():
                    raise ValueError(f"{cls}: lengths must be in [1, {steps}] (the padded length), got min {int(lengths.min())}, max {int(lengths.max())}")
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
            raise TypeError(f"{cls}: input dtype {dtype} differs from the weights' {self.weight_ih_l0.dtype}; convert one (module.to(dtype))")
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
                PackedSequence(y, batch_sizes_t, sorted_idx, unsorted_idx), batch_first=self.batch_first, total_length=steps
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
            raise NotImplementedError("ferrolm.nn.LSTM does not support proj_size > 0 yet; use torch.nn.LSTM for projections")



class GRU(_FusedRNNMixin, torch.nn.GRU):
    """``torch.nn.GRU`` with fused Rust kernels on CPU (same constructor and parameters);
    ``forward(input, hx=None, lengths=None)`` as :class:`LSTM`, with ``hx = h0``."""

    _lstm = False



# --------------------------------------------------------------------------- attention


class SinusoidalPositionalEncoding(torch.nn.Module):
    """The Transformer's fixed encoding: ``pe[p, 2i] = sin(p / 10000^(2i/C))``,
    ``pe[p, 2i+1] = cos(...)``; ``forward(x, offset=0)`` returns ``x + pe[offset:offset+T]``
    for x (B, T, C)."""

    def __init__(self, n_embd: int, max_len: int = 4096, base: float = 10000.0) -> None:
        super().__init__()
        if n_embd % 2:
            raise ValueError(f"n_embd must be even for sinusoidal positions, got {n_embd}")
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        inv = base ** (-torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)
        pe = torch.zeros(max_len, n_embd, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * inv)
        pe[:, 1::2] = torch.cos(pos * inv)
        self.register_buffer("pe", pe.float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.size(1)
        if offset + t > self.pe.size(0):
            raise ValueError(f"positions up to {offset + t} exceed max_len={self.pe.size(0)}; raise max_len")
        return x + self.pe[offset : offset + t].to(x.dtype)


class LearnedPositionalEmbedding(torch.nn.Module):
    """A learned position table (GPT-2's ``wpe``); ``forward(x, offset=0)`` adds it."""

    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.weight = torch.nn.Parameter(torch.randn(block_size, n_embd) * 0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.size(1)
        if offset + t > self.block_size:
            raise ValueError(f"sequence length {offset + t} exceeds block_size={self.block_size}; crop the input or raise block_size")
        return x + self.weight[offset : offset + t].to(x.dtype)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoPE, Su et al.): rotates pairs ``(x[2i], x[2i+1])`` of each
    head's vector by ``p * base^(-2i/D)``, so ``<rope(q, m), rope(k, n)>`` depends only on
    ``m - n``. ``forward(x, offset=0, positions=None)`` for x (B, H, T, D); ``positions``
    (B, T) int64 gives each token's position (left-padded or ragged batches), else
    ``offset + arange(T)``."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = x.size(-2)
        inv = self.inv_freq.to(x.device)
        if positions is None:
            pos = torch.arange(offset, offset + t, dtype=torch.float64, device=x.device)
            ang = pos[:, None] * inv[None, :]  # (T, D/2)
        else:
            ang = (positions.to(x.device, torch.float64)[:, :, None] * inv)[:, None]  # (B, 1, T, D/2)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out


class KVCache:
    """Keys and values of past positions for generation: ``k``, ``v`` (B, Hk, capacity, D), and
    ``lengths``, the number of positions each sequence has filled.

    A block of T > 1 tokens (a prompt) is appended at the same position for every row
    (``append``; with ``lengths=`` only the first ``lengths[b]`` of them count as real for row b,
    for right-padded prompts). A single token per row is written at each row's own length
    (``append_step``), so sequences of different lengths decode together without padding.
    """

    def __init__(self, batch: int, n_kv_head: int, capacity: int, head_dim: int, dtype=torch.float32, device="cpu") -> None:
        self.k = torch.zeros(batch, n_kv_head, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, dtype=torch.int64)

    @property
    def capacity(self) -> int:
        return self.k.size(2)

    @property
    def length(self) -> int:
        """The common length of all rows (ValueError when rows differ)."""
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if lo != hi:
            raise ValueError(f"the cache rows hold different lengths ({lo}..{hi}); append one token per row with append_step")
        return lo

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Appends (B, Hk, T, D) at the common length; returns the filled (B, Hk, L+T, D) views."""
        start, t = self.length, k.size(2)
        if start + t > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; appending {t} to {start} overflows it")
        self.k[:, :, start : start + t] = k
        self.v[:, :, start : start + t] = v
        if lengths is None:
            self.lengths += t
        else:
            self.lengths = start + torch.as_tensor(lengths, dtype=torch.int64).cpu()
        return self.k[:, :, : start + t], self.v[:, :, : start + t]

    def append_step(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Writes one position per row, (B, Hk, 1, D), at each row's length; returns the new lengths."""
        if int(self.lengths.max()) >= self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions and a row is full")
        b = k.size(0)
        if b == 1:
            at = int(self.lengths[0])
            self.k[:, :, at : at + 1] = k
            self.v[:, :, at : at + 1] = v
        else:
            rows = torch.arange(b, device=self.k.device)
            at = self.lengths.to(self.k.device)
            self.k[rows, :, at] = k[:, :, 0]
            self.v[rows, :, at] = v[:, :, 0]
        self.lengths = self.lengths + 1
        return self.lengths


class MultiheadSelfAttention(torch.nn.Module):
    """Multi-head (optionally grouped-query) self-attention on ferrolm's attention kernels.

    A fused qkv projection ``c_attn`` (C -> (H + 2*Hk) * D) and an output projection
    ``c_proj``, GPT-2's names. ``forward(x, key_padding_mask=None, cache=None, positions=None,
    lengths=None)``: x (B, T, C). With a :class:`KVCache`, a block of T > 1 tokens is appended
    and attends to the whole cache (causal mask aligned to the end; ``lengths`` marks the real
    tokens of right-padded rows), and a single token per row (T = 1) is written at each row's own
    length and attends to that row's cache (the decode kernel). ``positions`` (B, T) are the
    tokens' positions for RoPE (default: the cache length onwards).

    Args:
        n_embd: C. n_head: H. n_kv_head: Hk (default H; must divide H).
        causal: mask future positions. bias: biases in the projections.
        dropout: dropout on the output projection (the kernel has no attention-weight dropout).
        rope: apply rotary embeddings to q and k (``rope_base``).
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, causal: bool = True, bias: bool = True,
                 dropout: float = 0.0, rope: bool = False, rope_base: float = 10000.0) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if n_kv_head <= 0 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.c_attn = torch.nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = torch.nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = Dropout(dropout)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def new_cache(self, batch: int, capacity: int, dtype=torch.float32, device="cpu") -> KVCache:
        """An empty :class:`KVCache` for this layer."""
        return KVCache(batch, self.n_kv_head, capacity, self.head_dim, dtype, device)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention pattern (B, H, T, T) this layer computes for x (B, T, C): softmax of
        the scaled query-key products under its mask, in plain torch (for analysis, such as
        finding induction heads; the fused kernels never form this matrix)."""
        if x.dim() != 3 or x.size(-1) != self.n_embd:
            raise ValueError(f"expected x of shape (B, T, {self.n_embd}), got {tuple(x.shape)}")
        B, T, _ = x.size()
        D, H, Hk = self.head_dim, self.n_head, self.n_kv_head
        q, k, _ = self.c_attn(x).split([H * D, Hk * D, Hk * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hk, D).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, 0, None), self.rotary(k, 0, None)
        k = k.repeat_interleave(H // Hk, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        if self.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return scores.softmax(-1)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        from .ops import attention, decode_attention

        if x.dim() != 3 or x.size(-1) != self.n_embd:
            raise ValueError(f"expected x of shape (B, T, {self.n_embd}), got {tuple(x.shape)}")
        B, T, C = x.size()
        D, H, Hk = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([H * D, Hk * D, Hk * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hk, D).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, Hk, D).transpose(1, 2)
        step = cache is not None and T == 1 and key_padding_mask is None
        if self.rotary is not None:
            if positions is None and cache is not None:
                positions = cache.lengths.view(B, 1) + torch.arange(T).view(1, T) if step else None
                offset = 0 if step else cache.length
            else:
                offset = 0
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        if step:
            assert cache is not None
            lens = cache.append_step(k, v)
            y = decode_attention(q, cache.k, cache.v, lens)  # (B, H, 1, D)
        else:
            if cache is not None:
                k, v = cache.append(k, v, lengths)
            y = attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=self.causal, key_padding_mask=key_padding_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dropout(self.c_proj(y))


class Packed:
    """The real tokens of a padded (B, T) batch, so that the per-token layers (projections,
    norms, feed-forward, output layer) run on the (N, C) rows of the N real tokens only and
    attention scatters them back to (B, T) around its product: a batch costs in proportion to
    its real tokens, not its padded size.

    Args:
        pad_mask: (B, T) bool, True at pads (None: no padding, packing is a reshape).
        B, T: the padded shape.
    """

    def __init__(self, pad_mask: Optional[torch.Tensor], B: int, T: int) -> None:
        self.B, self.T, self.mask = B, T, pad_mask
        self.rows = None if pad_mask is None else (~pad_mask).reshape(-1).nonzero()[:, 0]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (N, F), the real tokens' rows in row-major order."""
        flat = x.reshape(self.B * self.T, -1)
        return flat if self.rows is None else flat.index_select(0, self.rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (B, T, F) with zeros at the pads."""
        if self.rows is None:
            return x.reshape(self.B, self.T, -1)
        return x.new_zeros(self.B * self.T, x.size(-1)).index_copy(0, self.rows, x).view(self.B, self.T, -1)


class MultiheadAttention(torch.nn.Module):
    """``torch.nn.MultiheadAttention``'s parameters and batch-first layout on ferrolm's kernels:
    self-attention (optionally causal) and cross-attention (queries from one sequence, keys
    and values from another, such as a decoder attending to its encoder's output).

    Parameters as torch's (``in_proj_weight`` (3C, C) holding W_q, W_k, W_v, ``in_proj_bias``,
    ``out_proj``), so ``load_state_dict`` works both ways with ``torch.nn.MultiheadAttention``
    (and inside ``torch.nn.Transformer`` layers). Self-attention projects q, k, v in one GEMM;
    cross-attention projects the keys and values of the memory in one (:meth:`project_kv`, which
    a decoder calls once per source and passes back as ``memory_kv`` at every step).

    ``forward(x, memory=None, key_padding_mask=None, causal=False, cache=None, memory_kv=None,
    memory_lengths=None)``: x (B, T, C). Self-attention when ``memory`` and ``memory_kv`` are
    None: with a :class:`KVCache`, a single token per row (T = 1) is written at each row's
    length and attends to the row's cache (the decode kernel), a block of T > 1 tokens is
    appended and attends causally to the whole cache. Cross-attention otherwise:
    ``key_padding_mask`` (B, S) bool marks the memory's pad positions (True = ignore), or
    ``memory_lengths`` (B,) the real lengths of right-padded memory rows (single-token steps then
    run on the decode kernel).

    Args:
        embed_dim: C. num_heads: H (divides C).
        dropout: dropout on the attention weights, as torch's; while training with dropout > 0
            the product runs on torch's ``scaled_dot_product_attention`` (the fused kernel has
            no weight dropout); in eval mode, or with dropout 0, on ferrolm's.
        bias: biases in the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout = float(dropout)
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = torch.nn.Parameter(torch.zeros(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        torch.nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            torch.nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project_kv(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``memory`` (B, S, C), each (B, H, S, D), in one GEMM."""
        C = self.embed_dim
        if memory.dim() != 3 or memory.size(-1) != C:
            raise ValueError(f"expected memory of shape (B, S, {C}), got {tuple(memory.shape)}")
        b = None if self.in_proj_bias is None else self.in_proj_bias[C:]
        k, v = F.linear(memory, self.in_proj_weight[C:], b).split(C, dim=2)
        return self._split_heads(k), self._split_heads(v)

    def forward_packed(self, x: torch.Tensor, pack: Packed, causal: bool = False,
                       memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                       memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention for the packed real tokens ``x`` (N, C) of a padded batch (see
        :class:`Packed`): self-attention among each row's real tokens (``causal`` optional), or
        cross-attention to ``memory_kv`` (from :meth:`project_kv_packed`) with the memory's
        ``memory_mask``. Returns (N, C)."""
        C = self.embed_dim
        if memory_kv is None:
            qkv = pack.unpack(F.linear(x, self.in_proj_weight, self.in_proj_bias))  # (B, T, 3C)
            q, k, v = (self._split_heads(t) for t in qkv.split(C, dim=2))
            y = self._attend(q, k, v, causal, pack.mask)
        else:
            b = None if self.in_proj_bias is None else self.in_proj_bias[:C]
            q = self._split_heads(pack.unpack(F.linear(x, self.in_proj_weight[:C], b)))
            y = self._attend(q, memory_kv[0], memory_kv[1], False, memory_mask)
        return self.out_proj(pack.pack(y.transpose(1, 2)))  # (N, C)

    def project_kv_packed(self, memory: torch.Tensor, pack: Packed) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, D) of packed memory rows (N, C); zeros at the pads."""
        C = self.embed_dim
        b = None if self.in_proj_bias is None else self.in_proj_bias[C:]
        k, v = pack.unpack(F.linear(memory, self.in_proj_weight[C:], b)).split(C, dim=2)
        return self._split_heads(k), self._split_heads(v)

    def _attend(self, q, k, v, causal: bool, key_padding_mask):
        from .ops import attention

        if self.training and self.dropout > 0:
            from .ops import _attention_mask

            mask = _attention_mask(q.size(0), q.size(2), k.size(2), causal, key_padding_mask, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
            return y if mask is None else y.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, key_padding_mask=key_padding_mask)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                causal: bool = False, cache: Optional[KVCache] = None, memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                memory_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        from .ops import decode_attention

        C = self.embed_dim
        if x.dim() != 3 or x.size(-1) != C:
            raise ValueError(f"expected x of shape (B, T, {C}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if memory is None and memory_kv is None:  # self-attention
            q, k, v = (self._split_heads(t) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=2))
            if cache is not None and T == 1 and key_padding_mask is None:
                lens = cache.append_step(k, v)
                y = decode_attention(q, cache.k, cache.v, lens)
            else:
                if cache is not None:
                    k, v = cache.append(k, v)
                    causal = True
                y = self._attend(q, k, v, causal, key_padding_mask)
        else:  # cross-attention
            if cache is not None or causal:
                raise ValueError("cross-attention takes no KV cache and no causal mask (the memory is fixed)")
            b = None if self.in_proj_bias is None else self.in_proj_bias[:C]
            q = self._split_heads(F.linear(x, self.in_proj_weight[:C], b))
            k, v = memory_kv if memory_kv is not None else self.project_kv(memory)  # type: ignore[arg-type]
            if k.size(0) != B:
                raise ValueError(f"the memory holds {k.size(0)} rows, the queries {B}")
            if memory_lengths is not None and T == 1 and not (self.training and self.dropout > 0):
                y = decode_attention(q, k, v, memory_lengths)
            else:
                if memory_lengths is not None and key_padding_mask is None:
                    key_padding_mask = torch.arange(k.size(2), device=x.device)[None, :] >= memory_lengths.to(x.device)[:, None]
                y = self._attend(q, k, v, False, key_padding_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)
