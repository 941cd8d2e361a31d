"""Autograd Functions over the Rust kernels: one module per ``rust/kernels/*.rs`` file.

:mod:`.rnn` (LSTM/GRU layer directions), :mod:`.attention` (scaled-dot-product attention,
forward and backward), :mod:`.decode` (KV-cache decode attention), :mod:`.dropout` (fused
dropout). Each takes CPU float32/float64 tensors, runs Rust with the GIL released on
``torch.get_num_threads()`` threads, and hands other devices and dtypes to torch's own
kernels. Their pure-torch twins are in :mod:`ferrolm.testing.reference`; the modules that
use them are in :mod:`ferrolm.nn`.
"""

from __future__ import annotations

from ._common import num_threads
from .attention import attention
from .decode import decode_attention
from .dropout import dropout
from .rnn import gru_layer, lstm_layer

__all__ = ["lstm_layer", "gru_layer", "attention", "decode_attention", "dropout", "num_threads"]
