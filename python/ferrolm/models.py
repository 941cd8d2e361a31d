"""Language models on ferrolm's kernels: :class:`GPT`, :class:`LSTMLanguageModel` and
:class:`SequenceClassifier`, each a ``torch.nn.Module`` with a config dataclass.

``forward(idx, targets=None, ...) -> (logits, loss)`` as in nanoGPT. ``ferrolm.reference``
holds the same architectures in plain PyTorch (``torch.nn.LSTM``, SDPA) with identical
parameter names; tests and benchmarks compare the two on the same weights. Checkpoints are
single safetensors files with the config as JSON metadata (:func:`save_model`,
:func:`load_model`): no pickle is ever read.

Example:
    >>> import torch
    >>> from ferrolm.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16))
    >>> logits, loss = model(torch.randint(0, 100, (2, 8)), targets=torch.randint(0, 100, (2, 8)))
    >>> logits.shape
    torch.Size([2, 8, 100])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._config import Config as _Config
from ._io import PathLike, atomic_write
from .errors import FormatError
from .nn import GRU, LSTM, Dropout, KVCache, MultiheadSelfAttention, SinusoidalPositionalEncoding

__all__ = [
    "GPTConfig",
    "LSTMConfig",
    "ClassifierConfig",
    "GPT",
    "LSTMLanguageModel",
    "SequenceClassifier",
    "save_model",
    "load_model",
    "config_from_dict",
    "Seq2SeqTransformerConfig",
    "Seq2SeqLSTMConfig",
    "AttentionLSTMConfig",
    "Seq2SeqTransformer",
    "Seq2SeqLSTM",
    "AttentionLSTM",
]

# The encoder-decoder and hybrid models live in ferrolm.seq2seq (which builds on this module);
# they are importable from here too, loaded on first use.
_SEQ2SEQ_NAMES = ("Seq2SeqTransformerConfig", "Seq2SeqLSTMConfig", "AttentionLSTMConfig", "Seq2SeqTransformer", "Seq2SeqLSTM", "AttentionLSTM")


def __getattr__(name: str):
    if name in _SEQ2SEQ_NAMES:
        from . import seq2seq

        return getattr(seq2seq, name)
    raise AttributeError(f"module 'ferrolm.models' has no attribute {name!r}")


def _with_seq2seq() -> None:
    """Registers the seq2seq architectures (their module adds them to the tables below)."""
    from . import seq2seq  # noqa: F401

POSITIONS = ("learned", "sinusoidal", "rotary")
POOLINGS = ("last", "mean", "max", "first")
FORMAT = "ferrolm-model-1"


# --------------------------------------------------------------------------- configs


@dataclass
class GPTConfig(_Config):
    """A decoder-only transformer (GPT-2's layout).

    Args:
        vocab_size: V. block_size: the longest sequence (positions 0..block_size-1).
        n_layer, n_head, n_embd: depth, heads, width C (n_head divides n_embd).
        n_kv_head: key/value heads (grouped-query attention); default n_head.
        dropout: on embeddings, attention output and MLP output.
        bias: biases in the linear layers and layer norms.
        positions: "learned" (GPT-2's ``wpe``), "sinusoidal" or "rotary".
        tie_weights: the output layer shares the token embedding.
        layer_norm_eps, rope_base: numerical constants.
        mlp: the feed-forward half of each block; False gives attention-only blocks (the
            models of Olsson et al. 2022's induction-head study).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: Optional[int] = None
    dropout: float = 0.0
    bias: bool = True
    positions: str = "learned"
    tie_weights: bool = True
    layer_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    mlp: bool = True
    architecture: str = field(default="gpt", init=False, repr=False)

    def __post_init__(self) -> None:
        self._positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if kv <= 0 or self.n_head % kv:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.positions not in POSITIONS:
            raise ValueError(f"GPTConfig.positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        self._dropout(self.dropout)



@dataclass
class LSTMConfig(_Config):
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


@dataclass
class ClassifierConfig(_Config):
    """A language-model backbone, a pooling of its hidden states and a linear head.

    Args:
        backbone: a :class:`GPTConfig` or :class:`LSTMConfig` (or its dict with an
            ``"architecture"`` key).
        num_classes: output classes. pooling: "last" (the last real token; right for causal
            models), "mean", "max" or "first". dropout: before the head.
    """

    backbone: Union[GPTConfig, LSTMConfig] = field(default_factory=GPTConfig)
    num_classes: int = 2
    pooling: str = "last"
    dropout: float = 0.0
    architecture: str = field(default="classifier", init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, Mapping):
            self.backbone = config_from_dict(self.backbone)  # type: ignore[assignment]
        if getattr(self.backbone, "architecture", None) not in _BACKBONES:
            raise TypeError(f"ClassifierConfig.backbone must be a GPTConfig, LSTMConfig or AttentionLSTMConfig, got {type(self.backbone).__name__}")
        self._positive("num_classes")
        if self.pooling not in POOLINGS:
            raise ValueError(f"ClassifierConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self._dropout(self.dropout)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "backbone": {"architecture": self.backbone.architecture, **self.backbone.to_dict()},
            "num_classes": self.num_classes,
            "pooling": self.pooling,
            "dropout": self.dropout,
        }


_CONFIGS: Dict[str, Type[_Config]] = {"gpt": GPTConfig, "lstm": LSTMConfig, "classifier": ClassifierConfig}
_BACKBONES = ("gpt", "lstm", "attention_lstm")


def backbone_width(config) -> int:
    """The width of the hidden states a backbone with this config returns."""
    if isinstance(config, GPTConfig):
        return config.n_embd
    if isinstance(config, LSTMConfig):
        return config.hidden_size
    return config.output_size


def config_from_dict(d: Mapping[str, Any]) -> Union[GPTConfig, LSTMConfig, ClassifierConfig]:
    """A config from ``{"architecture": "gpt" | "lstm" | "classifier" | "seq2seq_transformer" |
    "seq2seq_lstm" | "attention_lstm", **fields}``."""
    _with_seq2seq()
    if not isinstance(d, Mapping) or "architecture" not in d:
        raise ValueError(f"a model config needs an 'architecture' key (one of {sorted(_CONFIGS)})")
    arch = d["architecture"]
    if arch not in _CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(_CONFIGS)}")
    rest = {k: v for k, v in d.items() if k != "architecture"}
    return _CONFIGS[arch].from_dict(rest)  # type: ignore[return-value]


# --------------------------------------------------------------------------- shared helpers


def check_ids(idx: torch.Tensor, vocab_size: int, what: str = "idx") -> None:
    """Raises a clear error unless ``idx`` is a (B, T) integer tensor with ids in [0, V)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{what} must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{what} must be 2-D (batch, time), got shape {tuple(idx.shape)}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} in {what} is out of range for vocab_size={vocab_size} (ids must be in [0, {vocab_size}))")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to -100 are ignored."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} (batch, time)")
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1).long(), ignore_index=-100)


def _input_shape(idx: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor], config) -> Tuple[int, int, torch.device]:
    """(B, T, device) of a model input given as token ids or as ``inputs_embeds`` (B, T, n_embd),
    exactly one of them, checked."""
    if inputs_embeds is not None:
        if idx is not None:
            raise ValueError("pass idx or inputs_embeds, not both")
        if inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != config.n_embd:
            raise ValueError(f"inputs_embeds must be (B, T, {config.n_embd}), got {tuple(inputs_embeds.shape)}")
        return inputs_embeds.size(0), inputs_embeds.size(1), inputs_embeds.device
    if idx is None:
        raise ValueError("give idx (token ids) or inputs_embeds")
    check_ids(idx, config.vocab_size)
    return idx.size(0), idx.size(1), idx.device


def lengths_to_padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool, True past each row's length (right padding)."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


def check_lengths(lengths, B: int, T: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
    if lengths.shape != (B,):
        raise ValueError(f"lengths has shape {tuple(lengths.shape)}, expected ({B},) (one length per sequence)")
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must be in [1, {T}] (the padded length), got min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths


def pool(hidden: torch.Tensor, lengths: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """(B, C) from hidden states (B, T, C) of right-padded rows with ``lengths`` (None = all T)."""
    B, T, C = hidden.shape
    if how == "first":
        return hidden[:, 0]
    if lengths is None:
        if how == "last":
            return hidden[:, -1]
        if how == "mean":
            return hidden.mean(1)
        return hidden.amax(1)
    lengths = lengths.to(hidden.device)
    if how == "last":
        return hidden[torch.arange(B, device=hidden.device), lengths - 1]
    real = ~lengths_to_padding_mask(lengths, T)  # (B, T)
    if how == "mean":
        return (hidden * real[:, :, None]).sum(1) / lengths[:, None].to(hidden.dtype)
    return hidden.masked_fill(~real[:, :, None], float("-inf")).amax(1)


class _Checkpointable:
    """``save``/``load`` and the shared state-dict checks for the model classes."""

    config: Any

    def save(self, path: PathLike) -> None:
        """Writes a safetensors checkpoint (see :func:`save_model`)."""
        save_model(self, path)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: PathLike, map_location: Union[str, torch.device] = "cpu"):
        """Loads a checkpoint written by :meth:`save`; another architecture raises ValueError."""
        return load_model(path, expect=cls, map_location=map_location)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """``nn.Module.load_state_dict`` with a readable error: the missing and unexpected keys
        and mismatched shapes are listed together."""
        if strict:
            own = self.state_dict()  # type: ignore[attr-defined]
            missing = sorted(set(own) - set(state_dict))
            extra = sorted(set(state_dict) - set(own))
            shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
            if missing or extra or shapes:
                parts = []
                if missing:
                    parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
                if extra:
                    parts.append(f"unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")
                if shapes:
                    parts.append(f"shape mismatches {shapes[:4]}")
                raise ValueError(f"state dict does not fit {type(self).__name__}: " + "; ".join(parts))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]


# --------------------------------------------------------------------------- GPT


class MLP(nn.Module):
    """GPT-2's feed-forward block: c_fc (C -> 4C), GELU (tanh form), c_proj (4C -> C), dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (attention only
    when ``config.mlp`` is False)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = MultiheadSelfAttention(config.n_embd, config.n_head, config.n_kv_head, causal=True, bias=config.bias,
                                           dropout=config.dropout, rope=config.positions == "rotary", rope_base=config.rope_base)
        if config.mlp:
            self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
            self.mlp = MLP(config)

    def forward(self, x, padding_mask=None, cache=None, positions=None, lengths=None):
        x = x + self.attn(self.ln_1(x), key_padding_mask=padding_mask, cache=cache, positions=positions, lengths=lengths)
        return x + self.mlp(self.ln_2(x)) if hasattr(self, "mlp") else x


class GPT(_Checkpointable, nn.Module):
    """A GPT-2-style decoder on ferrolm's attention kernels (parameter names as GPT-2's:
    ``transformer.wte``, ``transformer.h.0.attn.c_attn``, ..., ``lm_head``).

    ``forward(idx, targets=None, padding_mask=None)`` -> ``(logits (B, T, V), loss or None)``.
    ``padding_mask`` (B, T) bool marks pad tokens (True); with it, positions count only real
    tokens, so left- and right-padded rows both get their own positions.

    Example:
        >>> m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8))
        >>> m.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)[0].__len__()
        4
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        modules: Dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = Dropout(config.dropout)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        modules["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.positions == "sinusoidal":
            self.sinusoid = SinusoidalPositionalEncoding(config.n_embd, max_len=config.block_size)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(_init_weights)
        # GPT-2's scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    # ---- forward

    def _positions(self, B: int, T: int, padding_mask, cache: Optional[List[KVCache]], device) -> Optional[torch.Tensor]:
        """(B, T) position ids, or None for the plain 0..T-1 of every row."""
        if cache is not None:
            if T == 1 and padding_mask is None:
                pos = cache[0].lengths.view(B, 1).to(device)
            else:
                pos = cache[0].length + torch.arange(T, device=device).view(1, T).expand(B, T)
        elif padding_mask is not None:
            pos = ((~padding_mask).long().cumsum(1) - 1).clamp_min(0)
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}; crop the input or raise GPTConfig.block_size")
            return None
        top = int(pos.max()) if pos.numel() else 0
        if top >= self.config.block_size:
            raise ValueError(f"position {top} exceeds block_size={self.config.block_size}; crop the input or raise GPTConfig.block_size")
        return pos

    def hidden_states(self, idx: Optional[torch.Tensor], padding_mask: Optional[torch.Tensor] = None, lengths=None,
                      cache: Optional[List[KVCache]] = None, prefix_embeds: Optional[torch.Tensor] = None,
                      inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, C), or (B, P + T, C) with ``prefix_embeds``.

        Args:
            idx: (B, T) int64 in [0, V). padding_mask: (B, T) bool, True = pad.
            lengths: (B,) real lengths of right-padded rows (instead of ``padding_mask``).
            cache: one :class:`~ferrolm.nn.KVCache` per layer (see :meth:`new_cache`).
            prefix_embeds: (P, C) or (B, P, C) vectors placed before the tokens' embeddings
                (prompt tuning's virtual tokens); they take positions 0..P-1.
            inputs_embeds: (B, T, C) vectors used in place of the token embeddings, with
                ``idx=None`` (models that read something other than tokens, such as the
                vector sequences of in-context regression); positions are added as usual.
        """
        B, T, device = _input_shape(idx, inputs_embeds, self.config)
        P = 0
        if prefix_embeds is not None:
            if cache is not None:
                raise ValueError("prefix_embeds cannot be combined with a KV cache")
            if prefix_embeds.dim() not in (2, 3) or prefix_embeds.size(-1) != self.config.n_embd:
                raise ValueError(f"prefix_embeds must be (P, {self.config.n_embd}) or (B, P, {self.config.n_embd}), got {tuple(prefix_embeds.shape)}")
            P = prefix_embeds.size(-2)
            if padding_mask is not None:
                padding_mask = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=padding_mask.device), padding_mask], 1)
        if lengths is not None:
            if padding_mask is not None:
                raise ValueError("pass padding_mask or lengths, not both")
            lengths = check_lengths(lengths, B, T) + P
        T = T + P
        if lengths is not None:
            if cache is None:
                padding_mask = None if bool((lengths == T).all()) else lengths_to_padding_mask(lengths, T).to(device)
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (B, T):
                raise ValueError(f"padding_mask must be a bool tensor of shape ({B}, {T}), got {padding_mask.dtype} {tuple(padding_mask.shape)}")
            if cache is not None:
                raise ValueError("padding_mask is not supported with a KV cache; right-pad the prompts and pass lengths=")
        if cache is not None and len(cache) != self.config.n_layer:
            raise ValueError(f"cache has {len(cache)} layers, the model {self.config.n_layer}")
        pos = self._positions(B, T, padding_mask, cache, device)
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if P:
            pre = prefix_embeds if prefix_embeds.dim() == 3 else prefix_embeds[None].expand(B, P, -1)
            x = torch.cat([pre.to(x.dtype), x], dim=1)  # (B, P + T, C)
        if self.config.positions == "learned":
            x = x + (self.transformer.wpe.weight[:T] if pos is None else self.transformer.wpe(pos))
        elif self.config.positions == "sinusoidal":
            pe = self.sinusoid.pe.to(x.dtype)
            x = x + (pe[:T] if pos is None else pe[pos])
        x = self.transformer.drop(x)
        rope_pos = pos if self.config.positions == "rotary" else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, padding_mask, None if cache is None else cache[i], rope_pos, lengths)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, padding_mask: Optional[torch.Tensor] = None,
                lengths=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(logits (B, T, V), loss)``; ``loss`` is the mean cross-entropy against
        ``targets`` (B, T) (-100 ignored), or None without targets."""
        logits = self.lm_head(self.hidden_states(idx, padding_mask=padding_mask, lengths=lengths))
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def new_cache(self, batch: int, capacity: int) -> List[KVCache]:
        """One empty KV cache per layer, ``capacity`` positions long (at most block_size)."""
        if capacity > self.config.block_size:
            raise ValueError(f"cache capacity {capacity} exceeds block_size={self.config.block_size}")
        p = self.lm_head.weight
        return [blk.attn.new_cache(batch, capacity, p.dtype, p.device) for blk in self.transformer.h]

    def generate(self, idx, max_new_tokens: int, **kwargs) -> List[List[int]]:
        """Continues each prompt; see :func:`ferrolm.generate.generate`."""
        from .generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (shared tensors once); without the position table by default."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.positions == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    # ---- Hugging Face GPT-2

    _HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf_gpt2(cls, model_or_state_dict, n_head: Optional[int] = None) -> "GPT":
        """A GPT with the weights of a Hugging Face ``GPT2LMHeadModel`` (or ``GPT2Model``), or of
        its state dict; logits equal transformers' to float rounding.

        Args:
            model_or_state_dict: a transformers GPT-2 model, or its ``state_dict()``.
            n_head: heads, needed with a bare state dict (the shapes do not tell it).

        Raises:
            ValueError: a state dict that is not GPT-2's layout, or options this model lacks
                (another activation, scaled or upcast attention).
        """
        cfg = getattr(model_or_state_dict, "config", None)
        if cfg is not None:
            sd = model_or_state_dict.state_dict()
            act = getattr(cfg, "activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"GPT-2 activation {act!r} is not supported (ferrolm's GPT uses the tanh GELU, 'gelu_new')")
            for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
                if getattr(cfg, flag, False):
                    raise ValueError(f"GPT-2 option {flag}=True is not supported")
            if not getattr(cfg, "scale_attn_weights", True):
                raise ValueError("GPT-2 option scale_attn_weights=False is not supported")
            n_head = cfg.n_head
            eps = cfg.layer_norm_epsilon
        else:
            if not isinstance(model_or_state_dict, Mapping):
                raise TypeError(f"expected a transformers GPT-2 model or its state dict, got {type(model_or_state_dict).__name__}")
            sd = dict(model_or_state_dict)
            if n_head is None:
                raise ValueError("from_hf_gpt2 with a bare state dict needs n_head= (the weights do not tell the head count)")
            eps = 1e-5
        sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        try:
            V, C = sd["transformer.wte.weight"].shape
            block = sd["transformer.wpe.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"not a GPT-2 state dict: {e.args[0]!r} is missing") from None
        n_layer = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")), default=-1)
        tied = "lm_head.weight" not in sd or sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr() \
            or torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
        config = GPTConfig(vocab_size=V, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=C, bias=True,
                           positions="learned", tie_weights=tied, layer_norm_eps=eps)
        ours = {}
        for k, v in sd.items():
            v = v.detach()
            if k.endswith(cls._HF_TRANSPOSED):
                v = v.t()
            ours[k] = v.contiguous().float()
        if tied:
            ours.pop("lm_head.weight", None)
        model = cls(config)
        own = set(model.state_dict())
        if tied:
            own.discard("lm_head.weight")
        missing, extra = sorted(own - set(ours)), sorted(set(ours) - own)
        if missing or extra:
            raise ValueError(f"not a GPT-2 state dict for this shape: missing {missing[:6]}, unexpected {extra[:6]}")
        nn.Module.load_state_dict(model, ours, strict=False)
        return model

    def to_hf_gpt2_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights in Hugging Face ``GPT2LMHeadModel``'s layout (Conv1D weights transposed)."""
        c = self.config
        if c.positions != "learned" or not c.bias or (c.n_kv_head not in (None, c.n_head)):
            raise ValueError("only GPT-2's own layout exports (learned positions, biases, no grouped-query attention)")
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach()
            out[k] = (v.t() if k.endswith(self._HF_TRANSPOSED) else v).contiguous().clone()
        return out

    def to_hf_gpt2(self):
        """A transformers ``GPT2LMHeadModel`` with these weights (needs transformers installed)."""
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_hf_gpt2 needs the transformers package; pip install transformers") from e
        c = self.config
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                                        n_head=c.n_head, layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
                                        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=0.0,
                                        tie_word_embeddings=c.tie_weights))
        sd = self.to_hf_gpt2_state_dict()
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
        if bad or unexpected:
            raise ValueError(f"export to GPT2LMHeadModel failed: missing {bad}, unexpected {unexpected}")
        return hf


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


# --------------------------------------------------------------------------- LSTM language model


class LSTMLanguageModel(_Checkpointable, nn.Module):
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
        self.rnn = rnn_cls(config.n_embd, config.hidden_size, num_layers=config.num_layers, batch_first=True,
                           dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.drop = Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.head.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)
        if config.tie_weights:
            self.head.weight = self.embed.weight

    def forward_state(self, idx: Optional[torch.Tensor], state=None, lengths=None, inputs_embeds: Optional[torch.Tensor] = None):
        """``(hidden (B, T, H), final state)``; the state is ``(h, c)`` for an LSTM, ``h`` for a
        GRU, each (num_layers, B, H); with ``lengths`` it is each row's state at its last real
        token and hidden states past it are 0. ``inputs_embeds`` (B, T, n_embd), with
        ``idx=None``, replaces the token embeddings (models reading vectors, not tokens)."""
        B, T, _ = _input_shape(idx, inputs_embeds, self.config)
        if lengths is not None:
            lengths = check_lengths(lengths, B, T)
            if bool((lengths == T).all()):
                lengths = None
        x = self.drop(self.embed(idx) if inputs_embeds is None else inputs_embeds)
        out, state = self.rnn(x, state, lengths=lengths)
        return self.drop(out), state

    def hidden_states(self, idx: Optional[torch.Tensor], lengths=None, state=None, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The top layer's outputs (B, T, H)."""
        return self.forward_state(idx, state, lengths, inputs_embeds)[0]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, lengths=None, state=None):
        """Returns ``(logits (B, T, V), loss or None)``."""
        logits = self.head(self.forward_state(idx, state, lengths)[0])
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def generate(self, idx, max_new_tokens: int, **kwargs) -> List[List[int]]:
        """Continues each prompt; see :func:`ferrolm.generate.generate`."""
        from .generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)


# --------------------------------------------------------------------------- classifier


def build_backbone(config) -> nn.Module:
    _with_seq2seq()
    return _MODELS[config.architecture](config)  # type: ignore[call-arg]


class SequenceClassifier(_Checkpointable, nn.Module):
    """A language-model backbone (``backbone``), pooling of its hidden states, dropout and a
    linear head (``head``).

    ``forward(idx, labels=None, lengths=None)`` -> ``(logits (B, num_classes), loss or None)``;
    ``lengths`` marks the real tokens of right-padded rows.
    """

    def __init__(self, config: ClassifierConfig, backbone: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"SequenceClassifier needs a ClassifierConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        width = backbone_width(config.backbone)
        self.drop = Dropout(config.dropout)
        self.head = nn.Linear(width, config.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, num_classes: int, pooling: str = "last", dropout: float = 0.0) -> "SequenceClassifier":
        """A classifier on a (pretrained) :class:`GPT`, :class:`LSTMLanguageModel` or
        :class:`~ferrolm.seq2seq.AttentionLSTM`."""
        if getattr(getattr(backbone, "config", None), "architecture", None) not in _BACKBONES or not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a ferrolm GPT, LSTMLanguageModel or AttentionLSTM, got {type(backbone).__name__}")
        return cls(ClassifierConfig(backbone.config, num_classes, pooling, dropout), backbone=backbone)

    def forward(self, idx: torch.Tensor, labels: Optional[torch.Tensor] = None, lengths=None):
        B, T = idx.shape if isinstance(idx, torch.Tensor) and idx.dim() == 2 else (None, None)
        if lengths is not None and B is not None:
            lengths = check_lengths(lengths, B, T)
        hidden = self.backbone.hidden_states(idx, lengths=lengths)
        logits = self.head(self.drop(pool(hidden, lengths, self.config.pooling)))
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long()
            if labels.shape != (logits.size(0),):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({logits.size(0)},)")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.config.num_classes):
                raise ValueError(f"labels must be in [0, {self.config.num_classes}), got {labels.tolist()[:8]}")
            loss = F.cross_entropy(logits, labels)
        return logits, loss


# --------------------------------------------------------------------------- checkpoints

_MODELS: Dict[str, Type[nn.Module]] = {"gpt": GPT, "lstm": LSTMLanguageModel, "classifier": SequenceClassifier}


def _arch_of(model: nn.Module) -> str:
    _with_seq2seq()
    for arch, cls in _MODELS.items():
        if type(model) is cls:
            return arch
    raise TypeError(f"save_model takes a ferrolm model ({', '.join(c.__name__ for c in _MODELS.values())}), got {type(model).__name__}")


def save_model(model: nn.Module, path: PathLike) -> None:
    """Writes ``model``'s weights and config to one safetensors file, atomically (temporary
    name, then rename). Shared (tied) tensors are stored once."""
    from safetensors.torch import save

    arch = _arch_of(model)
    tensors: Dict[str, torch.Tensor] = {}
    seen: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().cpu().contiguous()
    meta = {"format": FORMAT, "architecture": arch, "config": json.dumps(model.config.to_dict()), "aliases": json.dumps(aliases)}
    atomic_write(path, save(tensors, metadata=meta))


def _read_checkpoint(path: PathLike):
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; expected a .safetensors checkpoint file") from None
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not a valid safetensors checkpoint: {e}") from None
    return tensors, meta


def load_model(path: PathLike, expect: Optional[Type[nn.Module]] = None, map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """The model saved at ``path`` by :func:`save_model` (safetensors only; no pickle).

    Args:
        expect: a model class; a checkpoint of another architecture raises ValueError.

    Raises:
        FileNotFoundError, FormatError (not a ferrolm checkpoint), ValueError (wrong
        architecture, unknown config keys, missing/extra weights).
    """
    _with_seq2seq()
    tensors, meta = _read_checkpoint(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise FormatError(f"{path} is a safetensors file but not a ferrolm model checkpoint (no '{FORMAT}' metadata)")
    arch = meta.get("architecture")
    if arch not in _MODELS:
        raise FormatError(f"{path}: unknown architecture {arch!r}")
    if expect is not None and _MODELS[arch] is not expect:
        raise ValueError(f"{path} holds a {_MODELS[arch].__name__} ({arch!r}) checkpoint, not a {expect.__name__}")
    config = config_from_dict({"architecture": arch, **json.loads(meta["config"])})
    model = _MODELS[arch](config)  # type: ignore[call-arg]
    for alias, source in json.loads(meta.get("aliases", "{}")).items():
        if source in tensors:
            tensors[alias] = tensors[source]
    model.load_state_dict(tensors)
    return model.to(map_location)
