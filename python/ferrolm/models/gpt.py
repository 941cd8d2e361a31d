"""GPT: a decoder-only transformer in GPT-2's layout on ferrolm's attention kernels (learned,
sinusoidal or rotary positions, grouped-query attention), with conversion to and from
transformers' ``GPT2LMHeadModel`` (same logits).

Example:
    >>> import torch
    >>> from ferrolm.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16))
    >>> logits, loss = model(torch.randint(0, 100, (2, 8)), targets=torch.randint(0, 100, (2, 8)))
    >>> logits.shape
    torch.Size([2, 8, 100])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._config import Config
from ..nn import Dropout, KVCache, MultiheadSelfAttention, SinusoidalPositionalEncoding
from .common import CachedDecoder, Checkpointable, check_lengths, input_shape, lengths_to_padding_mask, lm_loss

__all__ = ["GPTConfig", "GPT"]

POSITIONS = ("learned", "sinusoidal", "rotary")


@dataclass
class GPTConfig(Config):
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
            raise ValueError(
                f"rotary positions need an even head size, got n_embd/n_head = {self.n_embd // self.n_head}"
            )
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        self._dropout(self.dropout)


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
        self.attn = MultiheadSelfAttention(
            config.n_embd,
            config.n_head,
            config.n_kv_head,
            causal=True,
            bias=config.bias,
            dropout=config.dropout,
            rope=config.positions == "rotary",
            rope_base=config.rope_base,
        )
        if config.mlp:
            self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
            self.mlp = MLP(config)

    def forward(self, x, padding_mask=None, cache=None, positions=None, lengths=None):
        x = x + self.attn(
            self.ln_1(x), key_padding_mask=padding_mask, cache=cache, positions=positions, lengths=lengths
        )
        return x + self.mlp(self.ln_2(x)) if hasattr(self, "mlp") else x


class GPT(CachedDecoder, Checkpointable, nn.Module):
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

    def _positions(
        self, B: int, T: int, padding_mask, cache: Optional[List[KVCache]], device
    ) -> Optional[torch.Tensor]:
        """(B, T) position ids, or None for the plain 0..T-1 of every row."""
        if cache is not None:
            # each row from its own length (rows of different lengths take a block as one: KVCache.append_block)
            pos = cache[0].lengths.view(B, 1).to(device) + torch.arange(T, device=device).view(1, T)
        elif padding_mask is not None:
            pos = ((~padding_mask).long().cumsum(1) - 1).clamp_min(0)
        else:
            if T > self.config.block_size:
                raise ValueError(
                    f"sequence length {T} exceeds block_size={self.config.block_size}; "
                    "crop the input or raise GPTConfig.block_size"
                )
            return None
        top = int(pos.max()) if pos.numel() else 0
        if top >= self.config.block_size:
            raise ValueError(
                f"position {top} exceeds block_size={self.config.block_size}; "
                "crop the input or raise GPTConfig.block_size"
            )
        return pos

    def hidden_states(
        self,
        idx: Optional[torch.Tensor],
        padding_mask: Optional[torch.Tensor] = None,
        lengths=None,
        cache: Optional[List[KVCache]] = None,
        prefix_embeds: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
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
        B, T, device = input_shape(idx, inputs_embeds, self.config)
        P = 0
        if prefix_embeds is not None:
            if cache is not None:
                raise ValueError("prefix_embeds cannot be combined with a KV cache")
            if prefix_embeds.dim() not in (2, 3) or prefix_embeds.size(-1) != self.config.n_embd:
                raise ValueError(
                    f"prefix_embeds must be (P, {self.config.n_embd}) or (B, P, {self.config.n_embd}), "
                    f"got {tuple(prefix_embeds.shape)}"
                )
            P = prefix_embeds.size(-2)
            if padding_mask is not None:
                padding_mask = torch.cat(
                    [torch.zeros(B, P, dtype=torch.bool, device=padding_mask.device), padding_mask], 1
                )
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
                raise ValueError(
                    f"padding_mask must be a bool tensor of shape ({B}, {T}), "
                    f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            if cache is not None:
                raise ValueError(
                    "padding_mask is not supported with a KV cache; right-pad the prompts and pass lengths="
                )
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

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        lengths=None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(logits (B, T, V), loss)``; ``loss`` is the mean cross-entropy against
        ``targets`` (B, T) (-100 ignored), or None without targets."""
        logits = self.lm_head(self.hidden_states(idx, padding_mask=padding_mask, lengths=lengths))
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def _attention_layers(self) -> List[MultiheadSelfAttention]:
        return [blk.attn for blk in self.transformer.h]

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
                raise ValueError(
                    f"GPT-2 activation {act!r} is not supported (ferrolm's GPT uses the tanh GELU, 'gelu_new')"
                )
            for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
                if getattr(cfg, flag, False):
                    raise ValueError(f"GPT-2 option {flag}=True is not supported")
            if not getattr(cfg, "scale_attn_weights", True):
                raise ValueError("GPT-2 option scale_attn_weights=False is not supported")
            n_head = cfg.n_head
            eps = cfg.layer_norm_epsilon
        else:
            if not isinstance(model_or_state_dict, Mapping):
                raise TypeError(
                    f"expected a transformers GPT-2 model or its state dict, got {type(model_or_state_dict).__name__}"
                )
            sd = dict(model_or_state_dict)
            if n_head is None:
                raise ValueError(
                    "from_hf_gpt2 with a bare state dict needs n_head= (the weights do not tell the head count)"
                )
            eps = 1e-5
        sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        try:
            V, C = sd["transformer.wte.weight"].shape
            block = sd["transformer.wpe.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"not a GPT-2 state dict: {e.args[0]!r} is missing") from None
        n_layer = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")), default=-1)
        tied = (
            "lm_head.weight" not in sd
            or sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
            or torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
        )
        config = GPTConfig(
            vocab_size=V,
            block_size=block,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=C,
            bias=True,
            positions="learned",
            tie_weights=tied,
            layer_norm_eps=eps,
        )
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
        hf = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=c.vocab_size,
                n_positions=c.block_size,
                n_embd=c.n_embd,
                n_layer=c.n_layer,
                n_head=c.n_head,
                layer_norm_epsilon=c.layer_norm_eps,
                activation_function="gelu_new",
                resid_pdrop=c.dropout,
                embd_pdrop=c.dropout,
                attn_pdrop=0.0,
                tie_word_embeddings=c.tie_weights,
            )
        )
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
