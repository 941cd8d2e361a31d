"""Positional encodings: the Transformer's fixed sinusoids, a learned table, and rotary
embeddings (RoPE) applied to queries and keys."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "RotaryEmbedding"]


class SinusoidalPositionalEncoding(torch.nn.Module):
    """The Transformer's fixed encoding: ``pe[p, 2i] = sin(p / 10000^(2i/C))``,
    ``pe[p, 2i+1] = cos(...)``; ``forward(x, offset=0)`` returns ``x + pe[offset:offset+T]``
    for x (B, T, C)."""

    def __init__(self, n_embd: int, max_len: int = 4096, base: float = 10000.0) -> None:
        super().__init__()
        if n_embd % 2:
            raise ValueError(f"n_embd must be even for sinusoidal positions, got {n_embd}")
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        inv = base ** (-torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)
        pe = torch.zeros(max_len, n_embd, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * inv)
        pe[:, 1::2] = torch.cos(pos * inv)
        self.register_buffer("pe", pe.float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.size(1)
        if offset + t > self.pe.size(0):
            raise ValueError(f"positions up to {offset + t} exceed max_len={self.pe.size(0)}; raise max_len")
        return x + self.pe[offset : offset + t].to(x.dtype)


class LearnedPositionalEmbedding(torch.nn.Module):
    """A learned position table (GPT-2's ``wpe``); ``forward(x, offset=0)`` adds it."""

    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.weight = torch.nn.Parameter(torch.randn(block_size, n_embd) * 0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.size(1)
        if offset + t > self.block_size:
            raise ValueError(
                f"sequence length {offset + t} exceeds block_size={self.block_size}; crop the input or raise block_size"
            )
        return x + self.weight[offset : offset + t].to(x.dtype)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoPE, Su et al.): rotates pairs ``(x[2i], x[2i+1])`` of each
    head's vector by ``p * base^(-2i/D)``, so ``<rope(q, m), rope(k, n)>`` depends only on
    ``m - n``. ``forward(x, offset=0, positions=None)`` for x (B, H, T, D); ``positions``
    (B, T) int64 gives each token's position (left-padded or ragged batches), else
    ``offset + arange(T)``."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = x.size(-2)
        inv = self.inv_freq.to(x.device)
        if positions is None:
            pos = torch.arange(offset, offset + t, dtype=torch.float64, device=x.device)
            ang = pos[:, None] * inv[None, :]  # (T, D/2)
        else:
            ang = (positions.to(x.device, torch.float64)[:, :, None] * inv)[:, None]  # (B, 1, T, D/2)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out
