"""The recurrent language model: embedding -> ferrolm LSTM or GRU (multi-layer, dropout) ->
linear head, optional weight tying."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .._config import Config
from ..decoding import generate
from ..nn import GRU, LSTM, Dropout
from .common import Checkpointable, RecurrentState, check_lengths, input_shape, lm_loss

__all__ = ["LSTMConfig", "LSTMLanguageModel"]


@dataclass
class LSTMConfig(Config):
    """Embedding -> multi-layer LSTM (or GRU) -> Linear.

    Args:
        vocab_size: V. n_embd: embedding width. hidden_size: recurrent width.
        num_layers: stacked layers. dropout: on the embeddings, between layers and on the output.
        tie_weights: the output layer shares the embedding (needs n_embd == hidden_size).
        cell: "lstm" or "gru".
    """

    vocab_size: int = 50257
    n_embd: int = 512
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False
    cell: str = "lstm"
    architecture: str = field(default="lstm", init=False, repr=False)

    def __post_init__(self) -> None:
        self._positive("vocab_size", "n_embd", "hidden_size", "num_layers")
        self._dropout(self.dropout)
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"LSTMConfig.cell must be 'lstm' or 'gru', got {self.cell!r}")
        if self.tie_weights and self.n_embd != self.hidden_size:
            raise ValueError(f"tie_weights needs n_embd == hidden_size, got {self.n_embd} and {self.hidden_size}")


class LSTMLanguageModel(Checkpointable, nn.Module):
    """Embedding -> ferrolm LSTM/GRU (multi-layer, dropout) -> Linear (``embed``, ``rnn``,
    ``head``), optional weight tying.

    ``forward(idx, targets=None, lengths=None, state=None)`` -> ``(logits, loss)``;
    :meth:`forward_state` also returns the final recurrent state (for generation and
    truncated backpropagation through time).
    """

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        if not isinstance(config, LSTMConfig):
            raise TypeError(f"LSTMLanguageModel needs an LSTMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        rnn_cls = LSTM if config.cell == "lstm" else GRU
        self.rnn = rnn_cls(
            config.n_embd,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.head.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)
        if config.tie_weights:
            self.head.weight = self.embed.weight

    def forward_state(
        self, idx: Optional[torch.Tensor], state=None, lengths=None, inputs_embeds: Optional[torch.Tensor] = None
    ):
        """``(hidden (B, T, H), final state)``; the state is ``(h, c)`` for an LSTM, ``h`` for a
        GRU, each (num_layers, B, H); with ``lengths`` it is each row's state at its last real
        token and hidden states past it are 0. ``inputs_embeds`` (B, T, n_embd), with
        ``idx=None``, replaces the token embeddings (models reading vectors, not tokens)."""
        B, T, _ = input_shape(idx, inputs_embeds, self.config)
        if lengths is not None:
            lengths = check_lengths(lengths, B, T)
            if bool((lengths == T).all()):
                lengths = None
        x = self.drop(self.embed(idx) if inputs_embeds is None else inputs_embeds)
        out, state = self.rnn(x, state, lengths=lengths)
        return self.drop(out), state

    def hidden_states(
        self, idx: Optional[torch.Tensor], lengths=None, state=None, inputs_embeds: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The top layer's outputs (B, T, H)."""
        return self.forward_state(idx, state, lengths, inputs_embeds)[0]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, lengths=None, state=None):
        """Returns ``(logits (B, T, V), loss or None)``."""
        logits = self.head(self.forward_state(idx, state, lengths)[0])
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    # ---- decoding (the protocol of ferrolm.decoding.Decoder)

    context_window = None  # a recurrent model reads sequences of any length

    def start(self, batch: int, capacity: int, memory=None) -> RecurrentState:
        """An initial (zero) recurrent state; ``capacity`` does not bound a recurrent model."""
        if memory is not None:
            raise TypeError("LSTMLanguageModel is a decoder-only model: it takes no encoder memory")
        return RecurrentState()

    def advance(self, state: RecurrentState, idx: torch.Tensor, lengths=None) -> torch.Tensor:
        """Hidden states (B, T, H) of ``idx`` (B, T) from ``state``, which then holds each row's
        state after its last real token (``lengths``: each right-padded row's real tokens)."""
        h, state.value = self.forward_state(idx, state.value, lengths=lengths)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer (``head``): (..., H) -> (..., V)."""
        return self.head(hidden)

    @staticmethod
    def select(state: RecurrentState, rows: torch.Tensor) -> RecurrentState:
        """A new state of rows ``rows`` (N,) of ``state``."""
        return state.select(rows)

    def generate(self, idx, max_new_tokens: int, **kwargs) -> List[List[int]]:
        """Continues each prompt; see :func:`ferrolm.decoding.generate`."""
        return generate(self, idx, max_new_tokens, **kwargs)
