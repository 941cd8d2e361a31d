"""What every ferrolm model shares: input checks, the language-model loss, padding masks,
pooling, and :class:`Checkpointable` (``save``/``load`` and a readable ``load_state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._io import PathLike
from ..decoding import generate
from ..nn import KVCache

__all__ = [
    "KV_DTYPES",
    "check_ids",
    "lm_loss",
    "input_shape",
    "lengths_to_padding_mask",
    "check_lengths",
    "pool",
    "Checkpointable",
    "RecurrentState",
]


#: The dtypes a KV cache may be asked for (``generate(..., kv_dtype=)``).
KV_DTYPES = (torch.float16, torch.float32)


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
            raise ValueError(
                f"token id {bad} in {what} is out of range for vocab_size={vocab_size} "
                f"(ids must be in [0, {vocab_size}))"
            )


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to -100 are ignored."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} (batch, time)"
        )
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1).long(), ignore_index=-100)


def input_shape(
    idx: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor], config
) -> Tuple[int, int, torch.device]:
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
        raise ValueError(
            f"lengths must be in [1, {T}] (the padded length), got min {int(lengths.min())}, max {int(lengths.max())}"
        )
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


class Checkpointable:
    """``save``/``load`` and the shared state-dict checks for the model classes."""

    config: Any

    def save(self, path: PathLike) -> None:
        """Writes a safetensors checkpoint (see :func:`save_model`); with LoRA layers
        (``apply_lora``/``load_lora``) the merged weights, which load as the plain architecture."""
        from .checkpoint import save_model  # checkpoint reads the architecture table, which names this class

        save_model(self, path)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: PathLike, map_location: Union[str, torch.device] = "cpu"):
        """Loads a checkpoint written by :meth:`save`; another architecture raises ValueError."""
        from .checkpoint import load_model

        return load_model(path, expect=cls, map_location=map_location)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """``nn.Module.load_state_dict`` with a readable error: the missing and unexpected keys
        and mismatched shapes are listed together."""
        if strict:
            own = self.state_dict()  # type: ignore[attr-defined]
            missing = sorted(set(own) - set(state_dict))
            extra = sorted(set(state_dict) - set(own))
            shapes = [
                f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                for k in own
                if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
            ]
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


@dataclass
class RecurrentState:
    """A recurrent language model's decoding state: ``value`` is ``(h, c)`` (LSTM) or ``h``
    (GRU), each (num_layers, B, H), or None before the first token (zeros)."""

    value: Any = None

    def select(self, rows: torch.Tensor) -> "RecurrentState":
        """A new state of rows ``rows`` (N,) (None stays None: zeros for any batch)."""
        v = self.value
        if v is None:
            return RecurrentState()
        if isinstance(v, tuple):
            return RecurrentState(tuple(t.index_select(1, rows.to(t.device)) for t in v))
        return RecurrentState(v.index_select(1, rows.to(v.device)))


class CachedDecoder:
    """The decoding protocol (:class:`ferrolm.decoding.Decoder`) for decoder-only transformers:
    one :class:`~ferrolm.nn.KVCache` per layer with a length per row. The model provides
    ``config.block_size``, ``lm_head``, ``hidden_states(idx, lengths=, cache=)`` and
    ``_attention_layers()`` (each with ``new_cache(batch, capacity, dtype, device)``)."""

    config: Any
    lm_head: Any
    window_name = "block_size"

    def _attention_layers(self) -> List[Any]:
        raise NotImplementedError

    def new_cache(self, batch: int, capacity: int, kv_dtype: Optional[torch.dtype] = None) -> List[KVCache]:
        """One empty KV cache per layer, ``capacity`` positions long (at most block_size), in
        ``kv_dtype`` (torch.float16 or torch.float32; None: the model's dtype)."""
        if capacity > self.config.block_size:
            raise ValueError(f"cache capacity {capacity} exceeds block_size={self.config.block_size}")
        # A float parameter gives the cache's dtype and device (a quantized head has none).
        p = next(t for t in self.parameters() if t.is_floating_point())
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise TypeError(
                f"kv_dtype must be torch.float16 or torch.float32 (or None for the model's dtype), got {kv_dtype!r}"
            )
        dtype = p.dtype if kv_dtype is None else kv_dtype
        return [attn.new_cache(batch, capacity, dtype, p.device) for attn in self._attention_layers()]

    @property
    def context_window(self) -> int:
        """The longest sequence (``config.block_size``)."""
        return self.config.block_size

    def start(self, batch: int, capacity: int, memory=None, kv_dtype: Optional[torch.dtype] = None) -> List[KVCache]:
        """Empty KV caches (one per layer) for ``batch`` rows and ``capacity`` positions, in
        ``kv_dtype`` (see :meth:`new_cache`)."""
        if memory is not None:
            raise TypeError(f"{type(self).__name__} is a decoder-only model: it takes no encoder memory")
        return self.new_cache(batch, capacity, kv_dtype)

    def advance(self, state: List[KVCache], idx: torch.Tensor, lengths=None) -> torch.Tensor:
        """Hidden states (B, T, C) of ``idx`` (B, T) after the cached positions, appended to the
        caches (``lengths``: each right-padded row's real tokens)."""
        return self.hidden_states(idx, lengths=lengths, cache=state)  # type: ignore[attr-defined]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer (``lm_head``): (..., C) -> (..., V)."""
        return self.lm_head(hidden)

    @staticmethod
    def select(state: List[KVCache], rows: torch.Tensor) -> List[KVCache]:
        """New caches holding rows ``rows`` (N,) of ``state``."""
        return [c.select(rows) for c in state]

    def generate(self, idx, max_new_tokens: int, **kwargs) -> List[List[int]]:
        """Continues each prompt; see :func:`ferrolm.decoding.generate`."""
        return generate(self, idx, max_new_tokens, **kwargs)
