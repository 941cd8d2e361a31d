"""AttentionLSTM, the hybrid: embedding -> multi-head self-attention (pre-norm, residual) ->
ferrolm (Bi)LSTM -> linear head. A classifier backbone (bidirectional) or a causal language
model (``causal=True, bidirectional=False``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .._config import Config
from ..nn import LSTM, Dropout, MultiheadSelfAttention
from .common import Checkpointable, check_ids, check_lengths, lengths_to_padding_mask, lm_loss

__all__ = ["AttentionLSTMConfig", "AttentionLSTM"]


@dataclass
class AttentionLSTMConfig(Config):
    """Embedding -> multi-head self-attention (pre-norm, residual) -> LSTM -> linear head.

    Args:
        vocab_size: V. n_embd: embedding width C. n_head: attention heads (divides C).
        hidden_size: LSTM units per direction. num_layers: LSTM layers.
        bidirectional: a bidirectional LSTM (a classifier backbone); a language model needs
            False and ``causal=True``.
        causal: the attention sees only earlier positions.
        dropout: on the embeddings, the attention output, between LSTM layers and the output.
        block_size: the longest sequence accepted.
    """

    vocab_size: int = 50257
    n_embd: int = 256
    n_head: int = 4
    hidden_size: int = 256
    num_layers: int = 1
    bidirectional: bool = True
    causal: bool = False
    dropout: float = 0.0
    block_size: int = 1024
    architecture: str = field(default="attention_lstm", init=False, repr=False)

    def __post_init__(self) -> None:
        self._positive("vocab_size", "n_embd", "n_head", "hidden_size", "num_layers", "block_size")
        if self.n_embd % self.n_head:
            raise ValueError(f"AttentionLSTMConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        self._dropout(self.dropout)

    @property
    def output_size(self) -> int:
        """The width of the hidden states the model returns."""
        return self.hidden_size * (2 if self.bidirectional else 1)


class AttentionLSTM(Checkpointable, nn.Module):
    """The seeds' hybrid: embedding -> multi-head self-attention (``ln``, ``attn``; pre-norm,
    residual) -> ferrolm LSTM (``rnn``, bidirectional by default) -> linear head (``head``,
    over the vocabulary).

    As a classifier backbone (``SequenceClassifier.from_backbone``) it gives
    :meth:`hidden_states` (B, T, output_size); as a language model
    (``causal=True, bidirectional=False``) ``forward(idx, targets)`` -> ``(logits, loss)`` and
    ferrolm's trainer and ICL tools take it like the other LMs.
    """

    def __init__(self, config: AttentionLSTMConfig) -> None:
        super().__init__()
        if not isinstance(config, AttentionLSTMConfig):
            raise TypeError(f"AttentionLSTM needs an AttentionLSTMConfig, got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.embed = nn.Embedding(config.vocab_size, C)
        self.ln = nn.LayerNorm(C)
        self.attn = MultiheadSelfAttention(C, config.n_head, causal=config.causal, dropout=config.dropout)
        self.rnn = LSTM(
            C,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = Dropout(config.dropout)
        self.head = nn.Linear(config.output_size, config.vocab_size)
        nn.init.normal_(self.embed.weight, std=0.1)
        nn.init.zeros_(self.head.bias)

    def hidden_states(self, idx: torch.Tensor, lengths=None) -> torch.Tensor:
        """The LSTM's outputs (B, T, output_size); with ``lengths`` (right-padded rows) pads
        are masked in the attention and the LSTM stops at each row's length (zeros after)."""
        check_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; "
                "crop the input or raise AttentionLSTMConfig.block_size"
            )
        mask = None
        if lengths is not None:
            lengths = check_lengths(lengths, B, T)
            if bool((lengths == T).all()):
                lengths = None
            else:
                mask = lengths_to_padding_mask(lengths, T).to(idx.device)
        x = self.drop(self.embed(idx))  # (B, T, C)
        x = x + self.attn(self.ln(x), key_padding_mask=None if self.config.causal else mask)
        out, _ = self.rnn(x, lengths=lengths)
        return self.drop(out)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, lengths=None):
        """Returns ``(logits (B, T, V), loss or None)``; a loss needs a causal model (``causal=True,
        bidirectional=False``), since otherwise every position sees the token it predicts."""
        if targets is not None and (self.config.bidirectional or not self.config.causal):
            raise ValueError(
                "a language-model loss needs AttentionLSTMConfig(causal=True, bidirectional=False); "
                "this model sees future tokens (use it as a classifier backbone instead)"
            )
        logits = self.head(self.hidden_states(idx, lengths))
        return logits, (lm_loss(logits, targets) if targets is not None else None)
