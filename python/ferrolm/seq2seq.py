"""Sequence-to-sequence and hybrid models on ferrolm's kernels: :class:`Seq2SeqTransformer`
(encoder-decoder, ``torch.nn.Transformer``'s parameter names), :class:`Seq2SeqLSTM`
(bidirectional LSTM encoder, LSTM decoder with Luong attention) and :class:`AttentionLSTM`
(embedding -> multi-head self-attention -> bidirectional LSTM -> head), plus batched greedy and
beam-search decoding (:func:`greedy_decode`, :func:`beam_search`).

The encoder-decoder models share one interface: ``forward(src, tgt, targets=None) ->
(logits, loss)`` for teacher-forced training (``src`` (B, S) and ``tgt`` (B, T) right-padded
with ``config.pad_id``; ``tgt`` starts with ``bos_id``; ``targets`` (B, T) with -100 where no
loss is wanted), and for decoding ``encode(src)``, ``start(memory, capacity)``,
``step(state, tokens) -> logits`` and ``reorder(state, rows)``. The Transformer decoder keeps a
KV cache for its self-attention and projects each source's cross-attention keys and values
once; the LSTM decoder carries its state. Every class is importable from
:mod:`ferrolm.models` too, and saves and loads with :func:`ferrolm.models.save_model` /
:func:`~ferrolm.models.load_model`.

Example:
    >>> import torch
    >>> from ferrolm.models import Seq2SeqTransformer, Seq2SeqTransformerConfig
    >>> cfg = Seq2SeqTransformerConfig(src_vocab_size=40, tgt_vocab_size=40, n_layer=1, n_head=2, n_embd=16, ff_size=32)
    >>> m = Seq2SeqTransformer(cfg)
    >>> src = torch.randint(3, 40, (2, 7))
    >>> tgt = torch.randint(3, 40, (2, 5)); tgt[:, 0] = cfg.bos_id
    >>> m(src, tgt)[0].shape
    torch.Size([2, 5, 40])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._config import Config as _Config
from .models import _Checkpointable, check_ids, check_lengths, lengths_to_padding_mask, lm_loss
from .nn import GRU, LSTM, Dropout, KVCache, LearnedPositionalEmbedding, MultiheadAttention, MultiheadSelfAttention, Packed, SinusoidalPositionalEncoding

__all__ = [
    "Seq2SeqTransformerConfig",
    "Seq2SeqLSTMConfig",
    "AttentionLSTMConfig",
    "Seq2SeqTransformer",
    "Seq2SeqLSTM",
    "AttentionLSTM",
    "greedy_decode",
    "beam_search",
    "decode_uncached",
]

ACTIVATIONS = ("relu", "gelu")
ATTENTIONS = ("general", "dot")


# --------------------------------------------------------------------------- configs


@dataclass
class _Seq2SeqConfig(_Config):
    """The fields and checks the encoder-decoder configs share (vocabularies, special ids,
    max_len, embedding sharing, label smoothing); see the subclasses for their meaning."""

    src_vocab_size: int = 1024
    tgt_vocab_size: int = 1024
    max_len: int = 256
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    shared_embeddings: bool = False
    tie_output: bool = False
    label_smoothing: float = 0.0

    def _check_seq2seq(self) -> None:
        self._positive("src_vocab_size", "tgt_vocab_size", "max_len")
        for name in ("pad_id", "bos_id", "eos_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.tgt_vocab_size:
                raise ValueError(f"{type(self).__name__}.{name}={v!r} must be a target-vocabulary id in [0, {self.tgt_vocab_size})")
        if self.pad_id in (self.bos_id, self.eos_id):
            raise ValueError(f"{type(self).__name__}: pad_id ({self.pad_id}) must differ from bos_id and eos_id")
        if not self.pad_id < self.src_vocab_size:
            raise ValueError(f"{type(self).__name__}.pad_id={self.pad_id} must be a source-vocabulary id too (< {self.src_vocab_size})")
        if self.shared_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"shared_embeddings needs one vocabulary, got src_vocab_size={self.src_vocab_size}, tgt_vocab_size={self.tgt_vocab_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class Seq2SeqTransformerConfig(_Seq2SeqConfig):
    """An encoder-decoder Transformer (Vaswani et al. 2017; ``torch.nn.Transformer``'s layout).

    Args:
        src_vocab_size, tgt_vocab_size: vocabularies of the two sides.
        n_layer: encoder layers; n_decoder_layer: decoder layers (default n_layer).
        n_head, n_embd: heads and width C (n_head divides n_embd). ff_size: feed-forward width.
        dropout: on embeddings and each sub-layer's output (as torch's ``dropout``).
        attention_dropout: on the attention weights (torch uses ``dropout`` there too; here it
            is separate because the fused kernels have none: > 0 runs training attention on
            torch's SDPA).
        activation: "relu" or "gelu" (exact). norm_first: pre-norm (True) or post-norm layers.
        positions: "sinusoidal" (fixed, shared by both sides) or "learned" (a table per side).
        shared_embeddings: one embedding for both sides (needs one vocabulary).
        tie_output: the output layer shares the target embedding.
        max_len: the longest source and target sequence (positions 0..max_len-1).
        pad_id, bos_id, eos_id: special target ids (pad_id is the source pad too).
        label_smoothing: of the training loss. layer_norm_eps, bias: as torch's.
    """

    n_layer: int = 3
    n_decoder_layer: Optional[int] = None
    n_head: int = 4
    n_embd: int = 256
    ff_size: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"
    norm_first: bool = False
    positions: str = "sinusoidal"
    layer_norm_eps: float = 1e-5
    bias: bool = True
    architecture: str = field(default="seq2seq_transformer", init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_seq2seq()
        self._positive("n_layer", "n_head", "n_embd", "ff_size")
        if self.n_decoder_layer is not None:
            self._positive("n_decoder_layer")
        if self.n_embd % self.n_head:
            raise ValueError(f"Seq2SeqTransformerConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Seq2SeqTransformerConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"Seq2SeqTransformerConfig.positions must be 'sinusoidal' or 'learned', got {self.positions!r}")
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        self._dropout(self.dropout)
        self._dropout(self.attention_dropout)

    @property
    def decoder_layers(self) -> int:
        return self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer


@dataclass
class Seq2SeqLSTMConfig(_Seq2SeqConfig):
    """A bidirectional LSTM encoder and an LSTM decoder with Luong attention.

    Args:
        src_vocab_size, tgt_vocab_size: vocabularies. n_embd: embedding width.
        hidden_size: the decoder's width H; the encoder runs H/2 units per direction, so its
            outputs are H wide and its final states, the two directions concatenated, start
            the decoder (H must be even).
        num_layers: layers on each side. dropout: on embeddings, between layers and on the
            attentional output.
        attention: Luong's score, "general" (h_t . W_a e_s) or "dot" (h_t . e_s).
        shared_embeddings, tie_output, max_len, pad_id, bos_id, eos_id, label_smoothing: as
            :class:`Seq2SeqTransformerConfig` (tie_output needs n_embd == hidden_size).
    """

    n_embd: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.1
    attention: str = "general"
    architecture: str = field(default="seq2seq_lstm", init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_seq2seq()
        self._positive("n_embd", "hidden_size", "num_layers")
        if self.hidden_size % 2:
            raise ValueError(f"Seq2SeqLSTMConfig.hidden_size must be even (H/2 units per encoder direction), got {self.hidden_size}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Seq2SeqLSTMConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.tie_output and self.n_embd != self.hidden_size:
            raise ValueError(f"tie_output needs n_embd == hidden_size, got {self.n_embd} and {self.hidden_size}")
        self._dropout(self.dropout)


@dataclass
class AttentionLSTMConfig(_Config):
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


# --------------------------------------------------------------------------- shared pieces


def _check_src(model: nn.Module, src: torch.Tensor, what: str = "src") -> None:
    cfg = model.config  # type: ignore[attr-defined]
    check_ids(src, cfg.src_vocab_size if what == "src" else cfg.tgt_vocab_size, what)
    if src.size(1) == 0:
        raise ValueError(f"{what} is empty (0 positions); every sequence needs at least one token")
    if src.size(1) > cfg.max_len:
        raise ValueError(f"{what} has {src.size(1)} positions, more than max_len={cfg.max_len}; shorten it or raise {type(cfg).__name__}.max_len")


def _pad_info(src: torch.Tensor, pad_id: int) -> Tuple[Optional[torch.Tensor], torch.Tensor, bool]:
    """(key padding mask or None, lengths (B,) = real tokens per row, whether every row is
    right-padded so its real tokens are a prefix)."""
    pad = src == pad_id
    lengths = (~pad).sum(1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0, 0])
        raise ValueError(f"source row {row} is empty (only pad_id={pad_id} tokens); every source needs at least one real token")
    prefix = bool((pad == lengths_to_padding_mask(lengths, src.size(1))).all())
    return (pad if bool(pad.any()) else None), lengths, prefix


def _seq2seq_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} (batch, target time)")
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1).long(), ignore_index=-100, label_smoothing=smoothing)


class _EncoderDecoderMixin:
    """The decoding surface both encoder-decoder models share."""

    config: Any
    is_encoder_decoder = True

    def translate(self, sources: Union[torch.Tensor, Sequence[Sequence[int]]], max_new_tokens: Optional[int] = None, beam_size: int = 1,
                  length_penalty: float = 1.0, batch_size: int = 64) -> List[List[int]]:
        """Target ids (without BOS/EOS) for each source: greedy with ``beam_size=1``, else
        beam search. See :func:`beam_search`."""
        if beam_size == 1:
            return greedy_decode(self, sources, max_new_tokens, batch_size=batch_size)
        return beam_search(self, sources, beam_size, max_new_tokens, length_penalty=length_penalty, batch_size=batch_size)

    def _check_tgt(self, tgt: torch.Tensor) -> None:
        _check_src(self, tgt, "tgt")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Transformer


def _activation(name: str):
    return F.relu if name == "relu" else F.gelu


class TransformerEncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (batch first) on ferrolm attention; same names."""

    def __init__(self, config: Seq2SeqTransformerConfig) -> None:
        super().__init__()
        C, eps, bias = config.n_embd, config.layer_norm_eps, config.bias
        self.self_attn = MultiheadAttention(C, config.n_head, config.attention_dropout, bias)
        self.linear1 = nn.Linear(C, config.ff_size, bias=bias)
        self.dropout = Dropout(config.dropout)
        self.linear2 = nn.Linear(config.ff_size, C, bias=bias)
        self.norm1 = nn.LayerNorm(C, eps=eps, bias=bias)
        self.norm2 = nn.LayerNorm(C, eps=eps, bias=bias)
        self.dropout1 = Dropout(config.dropout)
        self.dropout2 = Dropout(config.dropout)
        self.norm_first = config.norm_first
        self.act = _activation(config.activation)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.act(self.linear1(x)))))

    def forward(self, x: torch.Tensor, pack: Packed) -> torch.Tensor:
        """x: (N, C), the packed real tokens of the sources (see :class:`~ferrolm.nn.Packed`)."""
        def sa(h):
            return self.dropout1(self.self_attn.forward_packed(h, pack))

        if self.norm_first:
            x = x + sa(self.norm1(x))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + sa(x))
        return self.norm2(x + self._ff(x))


class TransformerDecoderLayer(nn.Module):
    """``torch.nn.TransformerDecoderLayer`` (batch first, causal self-attention) on ferrolm
    attention; same names (``self_attn``, ``multihead_attn``, ``norm1..3``)."""

    def __init__(self, config: Seq2SeqTransformerConfig) -> None:
        super().__init__()
        C, eps, bias = config.n_embd, config.layer_norm_eps, config.bias
        self.self_attn = MultiheadAttention(C, config.n_head, config.attention_dropout, bias)
        self.multihead_attn = MultiheadAttention(C, config.n_head, config.attention_dropout, bias)
        self.linear1 = nn.Linear(C, config.ff_size, bias=bias)
        self.dropout = Dropout(config.dropout)
        self.linear2 = nn.Linear(config.ff_size, C, bias=bias)
        self.norm1 = nn.LayerNorm(C, eps=eps, bias=bias)
        self.norm2 = nn.LayerNorm(C, eps=eps, bias=bias)
        self.norm3 = nn.LayerNorm(C, eps=eps, bias=bias)
        self.dropout1 = Dropout(config.dropout)
        self.dropout2 = Dropout(config.dropout)
        self.dropout3 = Dropout(config.dropout)
        self.norm_first = config.norm_first
        self.act = _activation(config.activation)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.linear2(self.dropout(self.act(self.linear1(x)))))

    def forward(self, x: torch.Tensor, pack: Packed, memory_kv: Tuple[torch.Tensor, torch.Tensor], mem_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (N, C), the packed real tokens of the targets (teacher forcing, causal)."""
        return self._residuals(x, lambda h: self.self_attn.forward_packed(h, pack, causal=True),
                               lambda h: self.multihead_attn.forward_packed(h, pack, memory_kv=memory_kv, memory_mask=mem_mask))

    def step(self, x: torch.Tensor, memory_kv: Tuple[torch.Tensor, torch.Tensor], mem_mask: Optional[torch.Tensor],
             mem_lengths: Optional[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """x: (B, 1, C), one new token per row, through the self-attention's KV cache."""
        return self._residuals(x, lambda h: self.self_attn(h, cache=cache),
                               lambda h: self.multihead_attn(h, memory_kv=memory_kv, key_padding_mask=mem_mask, memory_lengths=mem_lengths))

    def _residuals(self, x: torch.Tensor, self_attn, cross_attn) -> torch.Tensor:
        def sa(h):
            return self.dropout1(self_attn(h))

        def ca(h):
            return self.dropout2(cross_attn(h))

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + ca(x))
        return self.norm3(x + self._ff(x))


class _Stack(nn.Module):
    def __init__(self, layers: List[nn.Module], config: Seq2SeqTransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


class _EncoderDecoder(nn.Module):
    """Holds ``encoder`` and ``decoder`` under ``torch.nn.Transformer``'s names."""

    def __init__(self, config: Seq2SeqTransformerConfig) -> None:
        super().__init__()
        self.encoder = _Stack([TransformerEncoderLayer(config) for _ in range(config.n_layer)], config)
        self.decoder = _Stack([TransformerDecoderLayer(config) for _ in range(config.decoder_layers)], config)


@dataclass
class _TransformerMemory:
    batch: int  # B, the sources
    kv: List[Tuple[torch.Tensor, torch.Tensor]]  # per decoder layer, each (B, H, S, D)
    mask: Optional[torch.Tensor]  # (B, S) True = pad, or None
    lengths: Optional[torch.Tensor]  # (B,) when every row is right-padded (decode kernel)


@dataclass
class _TransformerState:
    memory: _TransformerMemory
    caches: List[KVCache]
    pos: int = 0


class Seq2SeqTransformer(_EncoderDecoderMixin, _Checkpointable, nn.Module):
    """An encoder-decoder Transformer on ferrolm's attention kernels.

    Modules: ``src_embed``, ``tgt_embed`` (the same module with ``shared_embeddings``),
    positions (``src_pos`` / ``tgt_pos`` tables when learned), ``transformer`` with
    ``encoder.layers.N``, ``encoder.norm``, ``decoder.layers.N``, ``decoder.norm`` named as in
    ``torch.nn.Transformer`` (so ``model.transformer.load_state_dict(torch_transformer.state_dict())``
    works both ways), and ``generator`` (C -> target vocabulary). Embeddings are scaled by
    sqrt(C) before the positions are added, as in Vaswani et al.

    ``forward(src, tgt, targets=None)`` -> ``(logits (B, T, V), loss or None)``; source pads
    (``pad_id``) are masked in the encoder and in cross-attention; target pads need no mask
    (right padding under a causal mask) and are left out of the loss by -100 targets.
    """

    def __init__(self, config: Seq2SeqTransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, Seq2SeqTransformerConfig):
            raise TypeError(f"Seq2SeqTransformer needs a Seq2SeqTransformerConfig, got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.src_embed = nn.Embedding(config.src_vocab_size, C)
        self.tgt_embed = self.src_embed if config.shared_embeddings else nn.Embedding(config.tgt_vocab_size, C)
        if config.positions == "learned":
            self.src_pos = LearnedPositionalEmbedding(config.max_len, C)
            self.tgt_pos = LearnedPositionalEmbedding(config.max_len, C)
        else:
            self.pos = SinusoidalPositionalEncoding(C, max_len=config.max_len)
        self.drop = Dropout(config.dropout)
        self.transformer = _EncoderDecoder(config)
        self.generator = nn.Linear(C, config.tgt_vocab_size, bias=config.bias)
        for p in self.transformer.parameters():  # torch.nn.Transformer's own initialisation
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            nn.init.normal_(emb.weight, std=C**-0.5)
        nn.init.xavier_uniform_(self.generator.weight)
        if self.generator.bias is not None:
            nn.init.zeros_(self.generator.bias)
        if config.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def _embed(self, idx: torch.Tensor, side: str, offset: int = 0) -> torch.Tensor:
        emb = self.src_embed if side == "src" else self.tgt_embed
        x = emb(idx) * math.sqrt(self.config.n_embd)  # (B, T, C)
        if self.config.positions == "learned":
            x = (self.src_pos if side == "src" else self.tgt_pos)(x, offset)
        else:
            x = self.pos(x, offset)
        return self.drop(x)

    def encode(self, src: torch.Tensor) -> _TransformerMemory:
        """Runs the encoder on ``src`` (B, S) (right-padded with pad_id; only the real tokens
        are computed) and projects every decoder layer's cross-attention keys and values once."""
        _check_src(self, src)
        mask, lengths, prefix = _pad_info(src, self.config.pad_id)
        B, S = src.shape
        pack = Packed(mask, B, S)
        x = pack.pack(self._embed(src, "src"))  # (N, C)
        for layer in self.transformer.encoder.layers:
            x = layer(x, pack)
        h = self.transformer.encoder.norm(x)
        kv = [layer.multihead_attn.project_kv_packed(h, pack) for layer in self.transformer.decoder.layers]
        return _TransformerMemory(B, kv, mask, lengths if prefix else None)

    def _decode_packed(self, tgt: torch.Tensor, memory: _TransformerMemory) -> Tuple[torch.Tensor, Packed]:
        self._check_tgt(tgt)
        B, T = tgt.shape
        if B != memory.batch:
            raise ValueError(f"tgt has {B} rows and the memory {memory.batch}; they must pair up")
        pad = tgt == self.config.pad_id
        pack = Packed(pad if bool(pad.any()) else None, B, T)
        x = pack.pack(self._embed(tgt, "tgt"))  # (N, C)
        for layer, kv in zip(self.transformer.decoder.layers, memory.kv):
            x = layer(x, pack, kv, memory.mask)
        return self.transformer.decoder.norm(x), pack

    def decode(self, tgt: torch.Tensor, memory: _TransformerMemory) -> torch.Tensor:
        """The decoder's final-norm hidden states (B, T, C) for target inputs ``tgt`` (B, T),
        right-padded with pad_id (zeros at the pads, which are not computed)."""
        h, pack = self._decode_packed(tgt, memory)
        return pack.unpack(h)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Returns ``(logits (B, T, V), loss)``; ``loss`` is the mean cross-entropy against
        ``targets`` (B, T) (-100 ignored; ``config.label_smoothing``), or None.

        Only real tokens are computed: logits at target pads (``tgt == pad_id``) are 0, and
        their targets must be -100."""
        if isinstance(src, torch.Tensor) and isinstance(tgt, torch.Tensor) and src.dim() == 2 and tgt.dim() == 2 and src.size(0) != tgt.size(0):
            raise ValueError(f"src has {src.size(0)} rows and tgt {tgt.size(0)}; they must pair up")
        h, pack = self._decode_packed(tgt, self.encode(src))
        logits = self.generator(h)  # (N, V)
        loss = None
        if targets is not None:
            if targets.shape != tgt.shape:
                raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(tgt.shape)} (batch, target time)")
            if pack.mask is not None and bool((targets[pack.mask] != -100).any()):
                raise ValueError("targets at padded target positions (tgt == pad_id) must be -100")
            loss = _seq2seq_loss(logits, pack.pack(targets[..., None])[:, 0], self.config.label_smoothing)
        return pack.unpack(logits), loss

    # ---- incremental decoding

    def start(self, memory: _TransformerMemory, capacity: int) -> _TransformerState:
        """An empty decoder state for ``capacity`` target positions (at most max_len)."""
        if capacity > self.config.max_len:
            raise ValueError(f"decoding {capacity} positions exceeds max_len={self.config.max_len}")
        B = memory.batch
        p = self.generator.weight
        caches = [KVCache(B, self.config.n_head, capacity, self.config.n_embd // self.config.n_head, p.dtype, p.device)
                  for _ in self.transformer.decoder.layers]
        return _TransformerState(memory, caches)

    def step(self, state: _TransformerState, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (B,) and returns the next-token logits (B, V)."""
        x = self._embed(tokens.view(-1, 1), "tgt", offset=state.pos)  # (B, 1, C)
        m = state.memory
        for layer, kv, cache in zip(self.transformer.decoder.layers, m.kv, state.caches):
            x = layer.step(x, kv, m.mask, m.lengths, cache)
        state.pos += 1
        return self.generator(self.transformer.decoder.norm(x))[:, 0]

    @staticmethod
    def repeat_memory(memory: _TransformerMemory, n: int) -> _TransformerMemory:
        """Each source row repeated ``n`` times in place (row b -> rows b*n .. b*n+n-1), for beams."""
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return _TransformerMemory(memory.batch * n, [(rep(k), rep(v)) for k, v in memory.kv], rep(memory.mask), rep(memory.lengths))

    @staticmethod
    def reorder(state: _TransformerState, rows: torch.Tensor) -> None:
        """Keeps decoder rows ``rows`` (N,) in that order (beams of the same source reorder
        among themselves, so the per-source memory stays as it is)."""
        for c in state.caches:
            c.k, c.v = c.k.index_select(0, rows), c.v.index_select(0, rows)
            c.lengths = c.lengths.index_select(0, rows.cpu())


# --------------------------------------------------------------------------- LSTM encoder-decoder


@dataclass
class _LSTMMemory:
    hidden: torch.Tensor  # (B, S, H) encoder outputs
    keys: torch.Tensor  # (B, 1, S, H) attention keys (W_a e_s, or e_s for "dot")
    values: torch.Tensor  # (B, 1, S, H)
    mask: Optional[torch.Tensor]
    lengths: Optional[torch.Tensor]
    state: Tuple[torch.Tensor, torch.Tensor]  # the decoder's initial (h0, c0), (L, B, H)


@dataclass
class _LSTMState:
    memory: _LSTMMemory
    state: Tuple[torch.Tensor, torch.Tensor]


class Seq2SeqLSTM(_EncoderDecoderMixin, _Checkpointable, nn.Module):
    """A bidirectional ferrolm LSTM encoder and a ferrolm LSTM decoder with Luong (global)
    attention over the encoder outputs (Luong et al. 2015, without input feeding, so the
    decoder runs the whole target sequence in one fused call when teacher-forced).

    Modules: ``src_embed``, ``tgt_embed``, ``encoder`` (LSTM, H/2 per direction), ``decoder``
    (LSTM, H), ``attn_proj`` (W_a, "general" only), ``combine`` (W_c: [c_t; h_t] -> H),
    ``generator``. Per target step: ``h_t`` from the decoder, ``a_t = softmax(score(h_t, e_s))``
    over the real source positions, ``c_t = sum_s a_ts e_s``, ``h~_t = tanh(W_c [c_t; h_t])``,
    logits ``= generator(h~_t)``. The scores run on ferrolm's attention kernel (one head,
    scale 1).
    """

    def __init__(self, config: Seq2SeqLSTMConfig) -> None:
        super().__init__()
        if not isinstance(config, Seq2SeqLSTMConfig):
            raise TypeError(f"Seq2SeqLSTM needs a Seq2SeqLSTMConfig, got {type(config).__name__}")
        self.config = config
        E, H, L = config.n_embd, config.hidden_size, config.num_layers
        drop_between = config.dropout if L > 1 else 0.0
        self.src_embed = nn.Embedding(config.src_vocab_size, E)
        self.tgt_embed = self.src_embed if config.shared_embeddings else nn.Embedding(config.tgt_vocab_size, E)
        self.encoder = LSTM(E, H // 2, num_layers=L, batch_first=True, bidirectional=True, dropout=drop_between)
        self.decoder = LSTM(E, H, num_layers=L, batch_first=True, dropout=drop_between)
        if config.attention == "general":
            self.attn_proj = nn.Linear(H, H, bias=False)
        self.combine = nn.Linear(2 * H, H, bias=False)
        self.drop = Dropout(config.dropout)
        self.generator = nn.Linear(H, config.tgt_vocab_size)
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            nn.init.uniform_(emb.weight, -0.1, 0.1)
        nn.init.zeros_(self.generator.bias)
        if config.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def encode(self, src: torch.Tensor) -> _LSTMMemory:
        """Runs the encoder on ``src`` (B, S), right-padded with pad_id."""
        _check_src(self, src)
        mask, lengths, prefix = _pad_info(src, self.config.pad_id)
        if not prefix:
            raise ValueError("Seq2SeqLSTM needs right-padded sources (real tokens first, then pad_id)")
        B, S = src.shape
        x = self.drop(self.src_embed(src))
        out, (h_n, c_n) = self.encoder(x, lengths=None if mask is None else lengths)  # out (B, S, H); states (2L, B, H/2)
        L = self.config.num_layers

        def join(s: torch.Tensor) -> torch.Tensor:  # (2L, B, H/2) -> (L, B, H): [forward; backward] per layer
            return s.view(L, 2, B, -1).transpose(1, 2).reshape(L, B, -1)

        keys = self.attn_proj(out) if self.config.attention == "general" else out
        return _LSTMMemory(out, keys[:, None], out[:, None], mask, lengths, (join(h_n), join(c_n)))

    def _attend(self, h: torch.Tensor, memory: _LSTMMemory) -> torch.Tensor:
        """Luong's attentional hidden state for decoder outputs h (B, T, H)."""
        from .ops import attention, decode_attention

        if h.size(1) == 1 and memory.lengths is not None and not torch.is_grad_enabled():
            ctx = decode_attention(h[:, None], memory.keys, memory.values, memory.lengths, scale=1.0)[:, 0]
        else:
            ctx = attention(h[:, None].contiguous(), memory.keys.contiguous(), memory.values.contiguous(),
                            key_padding_mask=memory.mask, scale=1.0)[:, 0]  # (B, T, H)
        return self.drop(torch.tanh(self.combine(torch.cat([ctx, h], dim=-1))))

    def decode(self, tgt: torch.Tensor, memory: _LSTMMemory, state=None):
        """``(attentional hidden states (B, T, H), final decoder state)`` for target inputs."""
        self._check_tgt(tgt)
        out, state = self.decoder(self.drop(self.tgt_embed(tgt)), memory.state if state is None else state)
        return self._attend(out, memory), state

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Returns ``(logits (B, T, V), loss)`` as :meth:`Seq2SeqTransformer.forward`."""
        if isinstance(src, torch.Tensor) and isinstance(tgt, torch.Tensor) and src.dim() == 2 and tgt.dim() == 2 and src.size(0) != tgt.size(0):
            raise ValueError(f"src has {src.size(0)} rows and tgt {tgt.size(0)}; they must pair up")
        h, _ = self.decode(tgt, self.encode(src))
        logits = self.generator(h)
        return logits, (_seq2seq_loss(logits, targets, self.config.label_smoothing) if targets is not None else None)

    def start(self, memory: _LSTMMemory, capacity: int) -> _LSTMState:
        if capacity > self.config.max_len:
            raise ValueError(f"decoding {capacity} positions exceeds max_len={self.config.max_len}")
        return _LSTMState(memory, memory.state)

    def step(self, state: _LSTMState, tokens: torch.Tensor) -> torch.Tensor:
        h, state.state = self.decode(tokens.view(-1, 1), state.memory, state.state)
        return self.generator(h)[:, 0]

    @staticmethod
    def repeat_memory(memory: _LSTMMemory, n: int) -> _LSTMMemory:
        rep = lambda t, d=0: None if t is None else t.repeat_interleave(n, dim=d)  # noqa: E731
        return _LSTMMemory(rep(memory.hidden), rep(memory.keys), rep(memory.values), rep(memory.mask), rep(memory.lengths),
                           (rep(memory.state[0], 1), rep(memory.state[1], 1)))

    @staticmethod
    def reorder(state: _LSTMState, rows: torch.Tensor) -> None:
        state.state = (state.state[0].index_select(1, rows), state.state[1].index_select(1, rows))


# --------------------------------------------------------------------------- attention + BiLSTM


class AttentionLSTM(_Checkpointable, nn.Module):
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
        self.rnn = LSTM(C, config.hidden_size, num_layers=config.num_layers, batch_first=True, bidirectional=config.bidirectional,
                        dropout=config.dropout if config.num_layers > 1 else 0.0)
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
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}; crop the input or raise AttentionLSTMConfig.block_size")
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
            raise ValueError("a language-model loss needs AttentionLSTMConfig(causal=True, bidirectional=False); "
                             "this model sees future tokens (use it as a classifier backbone instead)")
        logits = self.head(self.hidden_states(idx, lengths))
        return logits, (lm_loss(logits, targets) if targets is not None else None)


# --------------------------------------------------------------------------- decoding


def _as_sources(model: nn.Module, sources) -> List[List[int]]:
    if isinstance(sources, torch.Tensor):
        if sources.dim() == 1:
            sources = sources[None]
        if sources.dim() != 2:
            raise ValueError(f"sources must be a (B, S) tensor or a list of id lists, got shape {tuple(sources.shape)}")
        pad = model.config.pad_id  # type: ignore[attr-defined]
        return [[int(t) for t in row if int(t) != pad] for row in sources.tolist()]
    if not isinstance(sources, (list, tuple)):
        raise TypeError(f"sources must be a tensor or a list of id lists, got {type(sources).__name__}")
    if sources and isinstance(sources[0], int):
        sources = [sources]
    return [list(map(int, s)) for s in sources]


def _check_sources(model: nn.Module, sources: List[List[int]]) -> None:
    cfg = model.config  # type: ignore[attr-defined]
    for i, s in enumerate(sources):
        if not s:
            raise ValueError(f"source {i} is empty; every source needs at least one token")
        if len(s) > cfg.max_len:
            raise ValueError(f"source {i} has {len(s)} tokens, more than max_len={cfg.max_len}; shorten it")
        lo, hi = min(s), max(s)
        if lo < 0 or hi >= cfg.src_vocab_size:
            raise ValueError(f"source {i} holds token id {lo if lo < 0 else hi}, outside the source vocabulary [0, {cfg.src_vocab_size})")
        if cfg.pad_id in s:
            raise ValueError(f"source {i} holds pad_id={cfg.pad_id}; sources are given unpadded")


def _padded(sources: List[List[int]], pad_id: int, device) -> torch.Tensor:
    S = max(len(s) for s in sources)
    out = torch.full((len(sources), S), pad_id, dtype=torch.int64)
    for i, s in enumerate(sources):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return out.to(device)


def _decode_args(model: nn.Module, sources, max_new_tokens: Optional[int], batch_size: int):
    if not getattr(model, "is_encoder_decoder", False):
        raise TypeError(f"decoding needs a ferrolm encoder-decoder model, got {type(model).__name__}")
    srcs = _as_sources(model, sources)
    _check_sources(model, srcs)
    cfg = model.config  # type: ignore[attr-defined]
    limit = cfg.max_len if max_new_tokens is None else max_new_tokens
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= cfg.max_len:
        raise ValueError(f"max_new_tokens must be an int in [1, max_len={cfg.max_len}], got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return srcs, limit


def _length_order(sources: List[List[int]]) -> List[int]:
    """Sources sorted by length (longest first), so each batch pads little."""
    return sorted(range(len(sources)), key=lambda i: -len(sources[i]))


@torch.no_grad()
def greedy_decode(model: nn.Module, sources, max_new_tokens: Optional[int] = None, batch_size: int = 64) -> List[List[int]]:
    """Greedy translation: the target ids of each source, without BOS and EOS.

    Sources of different lengths run together in length-sorted batches (right-padded, pads
    masked); each decoder step feeds one token per row through the Transformer's KV cache or
    the LSTM's carried state. A row stops at EOS or after ``max_new_tokens`` tokens.

    Args:
        model: a :class:`Seq2SeqTransformer` or :class:`Seq2SeqLSTM`.
        sources: a list of source id lists (or one list, or a (B, S) tensor padded with pad_id).
        max_new_tokens: the most target tokens per source, EOS included (default and most:
            ``config.max_len``).

    Raises:
        ValueError: an empty source, one longer than max_len, ids outside the source vocabulary.
    """
    srcs, limit = _decode_args(model, sources, max_new_tokens, batch_size)
    cfg = model.config  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    out: List[List[int]] = [[] for _ in srcs]
    order = _length_order(srcs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            memory = model.encode(_padded([srcs[i] for i in idx], cfg.pad_id, device))  # type: ignore[operator]
            state = model.start(memory, limit)  # type: ignore[operator]
            tok = torch.full((len(idx),), cfg.bos_id, dtype=torch.int64, device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            steps: List[torch.Tensor] = []
            for _ in range(limit):
                tok = model.step(state, tok).argmax(-1)  # type: ignore[operator]
                steps.append(tok)
                done |= tok == cfg.eos_id
                if bool(done.all()):
                    break
            rows = torch.stack(steps, 1).tolist()
            for r, i in enumerate(idx):
                seq = rows[r]
                out[i] = seq[: seq.index(cfg.eos_id)] if cfg.eos_id in seq else seq
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def beam_search(model: nn.Module, sources, beam_size: int = 4, max_new_tokens: Optional[int] = None, length_penalty: float = 1.0,
                batch_size: int = 16) -> List[List[int]]:
    """Beam-search translation: the best target ids of each source, without BOS and EOS.

    Each source keeps ``beam_size`` running hypotheses; at each step the ``2 * beam_size``
    best extensions are taken, those ending in EOS among the top ``beam_size`` become finished
    hypotheses scored ``sum of log-probs / length ** length_penalty`` (length = tokens
    generated, EOS included), the others continue. A source is done once it holds
    ``beam_size`` finished hypotheses and its best running one cannot beat the worst of them
    at the current length (transformers' default stopping rule); at ``max_new_tokens`` the
    running hypotheses are scored as they stand. ``beam_size=1`` gives exactly
    :func:`greedy_decode`. Sources of different lengths share batches as in greedy decoding.

    Raises:
        ValueError: ``beam_size`` < 1, and the bad inputs :func:`greedy_decode` rejects.
    """
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    srcs, limit = _decode_args(model, sources, max_new_tokens, batch_size)
    cfg = model.config  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    K, eos = beam_size, cfg.eos_id
    out: List[List[int]] = [[] for _ in srcs]
    order = _length_order(srcs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            B = len(idx)
            memory = model.repeat_memory(model.encode(_padded([srcs[i] for i in idx], cfg.pad_id, device)), K)  # type: ignore[operator]
            state = model.start(memory, limit)  # type: ignore[operator]
            scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
            scores[:, 0] = 0.0  # one live beam per source at the start
            seqs = torch.zeros(B * K, 0, dtype=torch.int64)
            tok = torch.full((B * K,), cfg.bos_id, dtype=torch.int64, device=device)
            finished: List[List[Tuple[float, List[int]]]] = [[] for _ in range(B)]
            done = [False] * B
            for t in range(limit):
                logp = F.log_softmax(model.step(state, tok).double(), dim=-1).cpu()  # type: ignore[operator]
                V = logp.size(-1)
                cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
                top, pos = cand.topk(min(2 * K, K * V), dim=1)  # best first
                beam_of, token_of = pos // V, pos % V
                new_scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
                rows = torch.zeros(B, K, dtype=torch.int64)
                toks = torch.full((B, K), eos, dtype=torch.int64)
                length = t + 1
                for b in range(B):
                    if done[b]:
                        rows[b] = b * K  # keep a harmless row; its results are ignored
                        continue
                    k = 0
                    for rank in range(top.size(1)):
                        s = float(top[b, rank])
                        if s == float("-inf"):
                            break
                        src_row = b * K + int(beam_of[b, rank])
                        if int(token_of[b, rank]) == eos:
                            if rank < K:
                                hyp = seqs[src_row].tolist()
                                finished[b].append((s / length**length_penalty, hyp))
                            continue
                        new_scores[b, k], rows[b, k], toks[b, k] = s, src_row, int(token_of[b, rank])
                        k += 1
                        if k == K:
                            break
                    if len(finished[b]) >= K:
                        finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                        best_running = float(new_scores[b].max())
                        if best_running == float("-inf") or finished[b][-1][0] >= best_running / length**length_penalty:
                            done[b] = True
                    elif k == 0:
                        done[b] = True
                scores = new_scores
                flat = rows.view(-1)
                seqs = torch.cat([seqs.index_select(0, flat), toks.view(-1, 1)], dim=1)
                if all(done) or t == limit - 1:
                    break
                model.reorder(state, flat.to(device))  # type: ignore[operator]
                tok = toks.view(-1).to(device)
            for b in range(B):
                pool = list(finished[b])
                if not done[b]:  # out of steps: the running hypotheses count as they stand
                    for k in range(K):
                        s = float(scores[b, k])
                        if s > float("-inf"):
                            pool.append((s / seqs.size(1) ** length_penalty, seqs[b * K + k].tolist()))
                best = max(pool, key=lambda h: h[0]) if pool else (0.0, [])
                out[idx[b]] = best[1]
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def decode_uncached(model: nn.Module, sources, max_new_tokens: Optional[int] = None) -> List[List[int]]:
    """Greedy translation the plain way: every step re-runs the whole model on the source and
    the target so far (no cache, no carried state). The reference that the cached decoding is
    tested and benchmarked against."""
    srcs, limit = _decode_args(model, sources, max_new_tokens, 1 << 30)
    cfg = model.config  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        src = _padded(srcs, cfg.pad_id, device)
        tgt = torch.full((len(srcs), 1), cfg.bos_id, dtype=torch.int64, device=device)
        done = torch.zeros(len(srcs), dtype=torch.bool, device=device)
        for _ in range(limit):
            logits, _ = model(src, tgt)
            nxt = logits[:, -1].argmax(-1)
            tgt = torch.cat([tgt, nxt[:, None]], dim=1)
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    out = []
    for row in tgt[:, 1:].tolist():
        out.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return out


def _register() -> None:
    from . import models

    models._CONFIGS.update(seq2seq_transformer=Seq2SeqTransformerConfig, seq2seq_lstm=Seq2SeqLSTMConfig, attention_lstm=AttentionLSTMConfig)
    models._MODELS.update(seq2seq_transformer=Seq2SeqTransformer, seq2seq_lstm=Seq2SeqLSTM, attention_lstm=AttentionLSTM)


_register()
