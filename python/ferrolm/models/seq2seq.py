"""Sequence-to-sequence models on ferrolm's kernels: :class:`Seq2SeqTransformer`
(encoder-decoder, ``torch.nn.Transformer``'s parameter names) and :class:`Seq2SeqLSTM`
(bidirectional LSTM encoder, LSTM decoder with Luong attention).

Both share one interface: ``forward(src, tgt, targets=None) -> (logits, loss)`` for
teacher-forced training (``src`` (B, S) and ``tgt`` (B, T) right-padded with
``config.pad_id``; ``tgt`` starts with ``bos_id``; ``targets`` (B, T) with -100 where no loss
is wanted), and for decoding ``encode(src) -> memory`` plus the package's decoding protocol
(:class:`ferrolm.decoding.Decoder`: ``start``, ``advance``, ``logits``, ``select``), which
:func:`ferrolm.decoding.greedy_decode` and :func:`~ferrolm.decoding.beam_search` drive. The
Transformer decoder keeps a KV cache for its self-attention and projects each source's
cross-attention keys and values once; the LSTM decoder carries its state.

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
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._config import Config
from ..decoding import beam_search, greedy_decode
from ..kernels import attention, decode_attention
from ..nn import (
    LSTM,
    Dropout,
    KVCache,
    LearnedPositionalEmbedding,
    MultiheadAttention,
    Packed,
    SinusoidalPositionalEncoding,
)
from .common import Checkpointable, check_ids, lengths_to_padding_mask

__all__ = ["Seq2SeqTransformerConfig", "Seq2SeqLSTMConfig", "Seq2SeqTransformer", "Seq2SeqLSTM"]

ACTIVATIONS = ("relu", "gelu")
ATTENTIONS = ("general", "dot")


# --------------------------------------------------------------------------- configs


@dataclass
class _Seq2SeqConfig(Config):
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
                raise ValueError(
                    f"{type(self).__name__}.{name}={v!r} must be a target-vocabulary id in [0, {self.tgt_vocab_size})"
                )
        if self.pad_id in (self.bos_id, self.eos_id):
            raise ValueError(f"{type(self).__name__}: pad_id ({self.pad_id}) must differ from bos_id and eos_id")
        if not self.pad_id < self.src_vocab_size:
            raise ValueError(
                f"{type(self).__name__}.pad_id={self.pad_id} "
                f"must be a source-vocabulary id too (< {self.src_vocab_size})"
            )
        if self.shared_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"shared_embeddings needs one vocabulary, got src_vocab_size={self.src_vocab_size}, "
                f"tgt_vocab_size={self.tgt_vocab_size}"
            )
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
            raise ValueError(
                f"Seq2SeqTransformerConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(
                f"Seq2SeqTransformerConfig.positions must be 'sinusoidal' or 'learned', got {self.positions!r}"
            )
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
            raise ValueError(
                f"Seq2SeqLSTMConfig.hidden_size must be even (H/2 units per encoder direction), got {self.hidden_size}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Seq2SeqLSTMConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.tie_output and self.n_embd != self.hidden_size:
            raise ValueError(f"tie_output needs n_embd == hidden_size, got {self.n_embd} and {self.hidden_size}")
        self._dropout(self.dropout)


# --------------------------------------------------------------------------- shared pieces


def _check_src(model: nn.Module, src: torch.Tensor, what: str = "src") -> None:
    cfg = model.config  # type: ignore[attr-defined]
    check_ids(src, cfg.src_vocab_size if what == "src" else cfg.tgt_vocab_size, what)
    if src.size(1) == 0:
        raise ValueError(f"{what} is empty (0 positions); every sequence needs at least one token")
    if src.size(1) > cfg.max_len:
        raise ValueError(
            f"{what} has {src.size(1)} positions, more than max_len={cfg.max_len}; "
            f"shorten it or raise {type(cfg).__name__}.max_len"
        )


def _pad_info(src: torch.Tensor, pad_id: int) -> Tuple[Optional[torch.Tensor], torch.Tensor, bool]:
    """(key padding mask or None, lengths (B,) = real tokens per row, whether every row is
    right-padded so its real tokens are a prefix)."""
    pad = src == pad_id
    lengths = (~pad).sum(1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0, 0])
        raise ValueError(
            f"source row {row} is empty (only pad_id={pad_id} tokens); every source needs at least one real token"
        )
    prefix = bool((pad == lengths_to_padding_mask(lengths, src.size(1))).all())
    return (pad if bool(pad.any()) else None), lengths, prefix


def _seq2seq_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} (batch, target time)"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1).long(), ignore_index=-100, label_smoothing=smoothing
    )


def _rows(t: Optional[torch.Tensor], rows: torch.Tensor, dim: int = 0) -> Optional[torch.Tensor]:
    """``t.index_select(dim, rows)`` on t's device (None stays None)."""
    return None if t is None else t.index_select(dim, rows.to(t.device))


def _check_memory(memory: Any, batch: int, kind: type) -> None:
    if not isinstance(memory, kind):
        raise TypeError(f"an encoder-decoder model decodes from memory=model.encode(src), got {type(memory).__name__}")
    if memory.batch != batch:
        raise ValueError(f"batch={batch} but the memory holds {memory.batch} sources")


def _check_pair(src: torch.Tensor, tgt: torch.Tensor) -> None:
    """Sources and targets must hold the same number of rows (2-D inputs; others fail later)."""
    pairs = isinstance(src, torch.Tensor) and isinstance(tgt, torch.Tensor) and src.dim() == 2 and tgt.dim() == 2
    if pairs and src.size(0) != tgt.size(0):
        raise ValueError(f"src has {src.size(0)} rows and tgt {tgt.size(0)}; they must pair up")


def _check_equal_lengths(idx: torch.Tensor, lengths: Optional[torch.Tensor]) -> None:
    if lengths is not None and bool((torch.as_tensor(lengths) != idx.size(1)).any()):
        raise ValueError(
            "the encoder-decoder models advance every row by the same number of target tokens; "
            "feed ragged target prefixes one token at a time"
        )


class _EncoderDecoderMixin:
    """The decoding surface both encoder-decoder models share."""

    config: Any
    is_encoder_decoder = True

    def translate(
        self,
        sources: Union[torch.Tensor, Sequence[Sequence[int]]],
        max_new_tokens: Optional[int] = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        batch_size: int = 64,
    ) -> List[List[int]]:
        """Target ids (without BOS/EOS) for each source: greedy with ``beam_size=1``, else
        beam search. See :func:`beam_search`."""
        if beam_size == 1:
            return greedy_decode(self, sources, max_new_tokens, batch_size=batch_size)
        return beam_search(
            self, sources, beam_size, max_new_tokens, length_penalty=length_penalty, batch_size=batch_size
        )

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

    def forward(
        self,
        x: torch.Tensor,
        pack: Packed,
        memory_kv: Tuple[torch.Tensor, torch.Tensor],
        mem_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """x: (N, C), the packed real tokens of the targets (teacher forcing, causal)."""
        return self._residuals(
            x,
            lambda h: self.self_attn.forward_packed(h, pack, causal=True),
            lambda h: self.multihead_attn.forward_packed(h, pack, memory_kv=memory_kv, memory_mask=mem_mask),
        )

    def step(
        self,
        x: torch.Tensor,
        memory_kv: Tuple[torch.Tensor, torch.Tensor],
        mem_mask: Optional[torch.Tensor],
        mem_lengths: Optional[torch.Tensor],
        cache: KVCache,
    ) -> torch.Tensor:
        """x: (B, 1, C), one new token per row, through the self-attention's KV cache."""
        return self._residuals(
            x,
            lambda h: self.self_attn(h, cache=cache),
            lambda h: self.multihead_attn(
                h, memory_kv=memory_kv, key_padding_mask=mem_mask, memory_lengths=mem_lengths
            ),
        )

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


class Seq2SeqTransformer(_EncoderDecoderMixin, Checkpointable, nn.Module):
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
        _check_pair(src, tgt)
        h, pack = self._decode_packed(tgt, self.encode(src))
        logits = self.generator(h)  # (N, V)
        loss = None
        if targets is not None:
            if targets.shape != tgt.shape:
                raise ValueError(
                    f"targets have shape {tuple(targets.shape)}, expected {tuple(tgt.shape)} (batch, target time)"
                )
            if pack.mask is not None and bool((targets[pack.mask] != -100).any()):
                raise ValueError("targets at padded target positions (tgt == pad_id) must be -100")
            loss = _seq2seq_loss(logits, pack.pack(targets[..., None])[:, 0], self.config.label_smoothing)
        return pack.unpack(logits), loss

    # ---- incremental decoding (the protocol of ferrolm.decoding.Decoder)

    window_name = "max_len"

    @property
    def context_window(self) -> int:
        """The longest target sequence (``config.max_len``)."""
        return self.config.max_len

    def start(self, batch: int, capacity: int, memory: Optional[_TransformerMemory] = None) -> _TransformerState:
        """An empty decoder state for the ``batch`` sources of ``memory`` (from :meth:`encode`) and
        ``capacity`` target positions (at most max_len)."""
        _check_memory(memory, batch, _TransformerMemory)
        if capacity > self.config.max_len:
            raise ValueError(f"decoding {capacity} positions exceeds max_len={self.config.max_len}")
        p = self.generator.weight
        caches = [
            KVCache(batch, self.config.n_head, capacity, self.config.n_embd // self.config.n_head, p.dtype, p.device)
            for _ in self.transformer.decoder.layers
        ]
        return _TransformerState(memory, caches)

    def advance(
        self, state: _TransformerState, idx: torch.Tensor, lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Feeds target tokens ``idx`` (B, T), one position at a time through the KV cache, and
        returns the decoder's final-norm hidden states (B, T, C)."""
        _check_equal_lengths(idx, lengths)
        m = state.memory
        out = []
        for t in range(idx.size(1)):
            x = self._embed(idx[:, t : t + 1], "tgt", offset=state.pos)  # (B, 1, C)
            for layer, kv, cache in zip(self.transformer.decoder.layers, m.kv, state.caches):
                x = layer.step(x, kv, m.mask, m.lengths, cache)
            state.pos += 1
            out.append(self.transformer.decoder.norm(x))
        return torch.cat(out, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer (``generator``): (..., C) -> (..., V)."""
        return self.generator(hidden)

    @staticmethod
    def select(state: _TransformerState, rows: torch.Tensor) -> _TransformerState:
        """A new state of decoder rows ``rows`` (N,), with their sources' memory (beams)."""
        m = state.memory
        memory = _TransformerMemory(
            len(rows), [(_rows(k, rows), _rows(v, rows)) for k, v in m.kv], _rows(m.mask, rows), _rows(m.lengths, rows)
        )
        return _TransformerState(memory, [c.select(rows) for c in state.caches], state.pos)


# --------------------------------------------------------------------------- LSTM encoder-decoder


@dataclass
class _LSTMMemory:
    hidden: torch.Tensor  # (B, S, H) encoder outputs
    keys: torch.Tensor  # (B, 1, S, H) attention keys (W_a e_s, or e_s for "dot")
    values: torch.Tensor  # (B, 1, S, H)
    mask: Optional[torch.Tensor]
    lengths: Optional[torch.Tensor]
    state: Tuple[torch.Tensor, torch.Tensor]  # the decoder's initial (h0, c0), (L, B, H)

    @property
    def batch(self) -> int:
        return self.hidden.size(0)


@dataclass
class _LSTMState:
    memory: _LSTMMemory
    state: Tuple[torch.Tensor, torch.Tensor]


class Seq2SeqLSTM(_EncoderDecoderMixin, Checkpointable, nn.Module):
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
        out, (h_n, c_n) = self.encoder(
            x, lengths=None if mask is None else lengths
        )  # out (B, S, H); states (2L, B, H/2)
        L = self.config.num_layers

        def join(s: torch.Tensor) -> torch.Tensor:  # (2L, B, H/2) -> (L, B, H): [forward; backward] per layer
            return s.view(L, 2, B, -1).transpose(1, 2).reshape(L, B, -1)

        keys = self.attn_proj(out) if self.config.attention == "general" else out
        return _LSTMMemory(out, keys[:, None], out[:, None], mask, lengths, (join(h_n), join(c_n)))

    def _attend(self, h: torch.Tensor, memory: _LSTMMemory) -> torch.Tensor:
        """Luong's attentional hidden state for decoder outputs h (B, T, H)."""
        if h.size(1) == 1 and memory.lengths is not None and not torch.is_grad_enabled():
            ctx = decode_attention(h[:, None], memory.keys, memory.values, memory.lengths, scale=1.0)[:, 0]
        else:
            ctx = attention(
                h[:, None].contiguous(),
                memory.keys.contiguous(),
                memory.values.contiguous(),
                key_padding_mask=memory.mask,
                scale=1.0,
            )[:, 0]  # (B, T, H)
        return self.drop(torch.tanh(self.combine(torch.cat([ctx, h], dim=-1))))

    def decode(self, tgt: torch.Tensor, memory: _LSTMMemory, state=None):
        """``(attentional hidden states (B, T, H), final decoder state)`` for target inputs."""
        self._check_tgt(tgt)
        out, state = self.decoder(self.drop(self.tgt_embed(tgt)), memory.state if state is None else state)
        return self._attend(out, memory), state

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Returns ``(logits (B, T, V), loss)`` as :meth:`Seq2SeqTransformer.forward`."""
        _check_pair(src, tgt)
        h, _ = self.decode(tgt, self.encode(src))
        logits = self.generator(h)
        return logits, (_seq2seq_loss(logits, targets, self.config.label_smoothing) if targets is not None else None)

    # ---- incremental decoding (the protocol of ferrolm.decoding.Decoder)

    window_name = "max_len"

    @property
    def context_window(self) -> int:
        """The longest target sequence (``config.max_len``)."""
        return self.config.max_len

    def start(self, batch: int, capacity: int, memory: Optional[_LSTMMemory] = None) -> _LSTMState:
        """The decoder's initial state for the ``batch`` sources of ``memory`` (from :meth:`encode`)."""
        _check_memory(memory, batch, _LSTMMemory)
        if capacity > self.config.max_len:
            raise ValueError(f"decoding {capacity} positions exceeds max_len={self.config.max_len}")
        return _LSTMState(memory, memory.state)

    def advance(self, state: _LSTMState, idx: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feeds target tokens ``idx`` (B, T) and returns the attentional hidden states (B, T, H)."""
        _check_equal_lengths(idx, lengths)
        h, state.state = self.decode(idx, state.memory, state.state)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer (``generator``): (..., H) -> (..., V)."""
        return self.generator(hidden)

    @staticmethod
    def select(state: _LSTMState, rows: torch.Tensor) -> _LSTMState:
        """A new state of decoder rows ``rows`` (N,), with their sources' memory (beams)."""
        m = state.memory
        memory = _LSTMMemory(
            _rows(m.hidden, rows),
            _rows(m.keys, rows),
            _rows(m.values, rows),
            _rows(m.mask, rows),
            _rows(m.lengths, rows),
            (_rows(m.state[0], rows, 1), _rows(m.state[1], rows, 1)),
        )
        return _LSTMState(memory, (_rows(state.state[0], rows, 1), _rows(state.state[1], rows, 1)))
