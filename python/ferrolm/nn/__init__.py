"""Torch modules on ferrolm's kernels: drop-in :class:`LSTM` / :class:`GRU` (:mod:`.rnn`),
attention (:mod:`.attention`: :class:`MultiheadSelfAttention`, :class:`MultiheadAttention`,
:class:`KVCache`, :class:`Packed`), positional encodings (:mod:`.positions`) and fused
:class:`Dropout` (:mod:`.dropout`). CPU float32/float64 run in Rust; other devices and dtypes
go to torch's own implementations (cuDNN, SDPA).

Example:
    >>> import torch, ferrolm.nn
    >>> lstm = ferrolm.nn.LSTM(16, 32, num_layers=2, batch_first=True)
    >>> out, (h, c) = lstm(torch.randn(4, 10, 16))
    >>> out.shape, h.shape
    (torch.Size([4, 10, 32]), torch.Size([2, 4, 32]))
"""

from __future__ import annotations

from .attention import KVCache, MultiheadAttention, MultiheadSelfAttention, Packed
from .dropout import Dropout
from .positions import LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding
from .rnn import GRU, LSTM

__all__ = [
    "LSTM",
    "GRU",
    "Dropout",
    "MultiheadSelfAttention",
    "MultiheadAttention",
    "Packed",
    "KVCache",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
]
