"""Attention modules on ferrolm's attention and decode kernels: :class:`MultiheadSelfAttention`
(GPT-2's fused ``c_attn``, grouped-query attention, causal, optional RoPE), torch-compatible
:class:`MultiheadAttention` (self and cross attention), the :class:`KVCache` they decode with
(a length per row) and :class:`Packed` (the real tokens of a padded batch, so per-token layers
run on real tokens only)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels import attention, decode_attention
from ..kernels.attention import attention_mask
from .dropout import Dropout
from .positions import RotaryEmbedding

__all__ = ["KVCache", "MultiheadSelfAttention", "MultiheadAttention", "Packed"]


class KVCache:
    """Keys and values of past positions for generation: ``k``, ``v`` (B, Hk, capacity, D), and
    ``lengths``, the number of positions each sequence has filled.

    The cache may hold a narrower dtype than the model (float16 under a float32 model: half the
    memory and the bytes each decoding step reads); values are rounded when written, and read
    back in the model's dtype.

    A block of T > 1 tokens (a prompt) is appended at the same position for every row
    (``append``; with ``lengths=`` only the first ``lengths[b]`` of them count as real for row b,
    for right-padded prompts). A single token per row is written at each row's own length
    (``append_step``), so sequences of different lengths decode together without padding.

    Rows of different lengths take a block together with :meth:`append_block`: it is written
    after the longest row, and the positions between each shorter row's length and that point
    (a gap) are masked from the block's queries. A cache with such a gap can be read (the block's
    attention) but not appended to again: scoring several continuations of several contexts in
    one forward uses it on copies (:meth:`select`) that are then dropped.
    """

    def __init__(
        self, batch: int, n_kv_head: int, capacity: int, head_dim: int, dtype=torch.float32, device="cpu"
    ) -> None:
        self.k = torch.zeros(batch, n_kv_head, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, dtype=torch.int64)
        #: (each row's length before a ragged block (B,), where the block starts), or None.
        self.gap: Optional[Tuple[torch.Tensor, int]] = None

    @property
    def capacity(self) -> int:
        return self.k.size(2)

    @property
    def length(self) -> int:
        """The common length of all rows (ValueError when rows differ)."""
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if lo != hi:
            raise ValueError(
                f"the cache rows hold different lengths ({lo}..{hi}); append one token per row with append_step"
            )
        return lo

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding rows ``rows`` (N,) of this one, in that order (rows may repeat:
        one prompt's cache copied for several continuations or beams)."""
        out = KVCache.__new__(KVCache)
        rows_dev = rows.to(self.k.device)
        out.k, out.v = self.k.index_select(0, rows_dev), self.v.index_select(0, rows_dev)
        out.lengths = self.lengths.index_select(0, rows.cpu())
        out.gap = None if self.gap is None else (self.gap[0].index_select(0, rows.cpu()), self.gap[1])
        return out

    def _extendable(self) -> None:
        if self.gap is not None:
            raise ValueError(
                "this KV cache holds a ragged block (rows of different lengths took a block after their longest "
                "row, leaving gaps): it can be read but not appended to; select() the rows from the cache before it"
            )

    def append(
        self, k: torch.Tensor, v: torch.Tensor, lengths: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Appends (B, Hk, T, D) at the common length; returns the filled (B, Hk, L+T, D) views."""
        self._extendable()  # before self.length, which a ragged block's rows would fail first
        return self._write(self.length, k, v, lengths)

    def _write(
        self, start: int, k: torch.Tensor, v: torch.Tensor, lengths: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Writes the block (B, Hk, T, D) at ``start`` for every row, sets each row's length to
        ``start`` + its real tokens, and returns the filled (B, Hk, start + T, D) views."""
        self._extendable()
        t = k.size(2)
        if start + t > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; appending {t} to {start} overflows it")
        self.k[:, :, start : start + t] = k
        self.v[:, :, start : start + t] = v
        real = torch.full_like(self.lengths, t) if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)
        self.lengths = start + real.cpu()
        ks, vs = self.k[:, :, : start + t], self.v[:, :, : start + t]
        if ks.dtype != k.dtype:  # a float16 cache of a float32 model: attend in the model's dtype
            ks, vs = ks.to(k.dtype), vs.to(v.dtype)
        return ks, vs

    def append_block(
        self, k: torch.Tensor, v: torch.Tensor, lengths: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Appends a block (B, Hk, T, D) to rows of the same or of different lengths; returns the
        filled views (B, Hk, S, D) and the key padding mask (B, S) the block's queries need (True
        at the gap between a row's length and the block; None when the rows were equal, as
        :meth:`append`). With causal attention aligned to the end, query t of row b then sees
        exactly its row's positions before the block and the block's first t + 1 tokens.

        ``lengths`` (B,): the real tokens of each right-padded row of the block."""
        before = self.lengths
        lo, hi = int(before.min()), int(before.max())
        ks, vs = self._write(hi, k, v, lengths)
        if lo == hi:
            return ks, vs, None
        at = torch.arange(ks.size(2)).view(1, -1)
        self.gap = (before, hi)
        return ks, vs, ((at >= before.view(-1, 1)) & (at < hi)).to(self.k.device)

    def append_step(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Writes one position per row, (B, Hk, 1, D), at each row's length; returns the new lengths."""
        self._extendable()
        if int(self.lengths.max()) >= self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions and a row is full")
        b = k.size(0)
        if b == 1:
            at = int(self.lengths[0])
            self.k[:, :, at : at + 1] = k
            self.v[:, :, at : at + 1] = v
        else:
            rows = torch.arange(b, device=self.k.device)
            at = self.lengths.to(self.k.device)
            self.k[rows, :, at] = k[:, :, 0].to(self.k.dtype)
            self.v[rows, :, at] = v[:, :, 0].to(self.v.dtype)
        self.lengths = self.lengths + 1
        return self.lengths


class MultiheadSelfAttention(torch.nn.Module):
    """Multi-head (optionally grouped-query) self-attention on ferrolm's attention kernels.

    A fused qkv projection ``c_attn`` (C -> (H + 2*Hk) * D) and an output projection
    ``c_proj``, GPT-2's names. ``forward(x, key_padding_mask=None, cache=None, positions=None,
    lengths=None)``: x (B, T, C). With a :class:`KVCache`, a block of T > 1 tokens is appended
    and attends to the whole cache (causal mask aligned to the end; ``lengths`` marks the real
    tokens of right-padded rows), and a single token per row (T = 1) is written at each row's own
    length and attends to that row's cache (the decode kernel). ``positions`` (B, T) are the
    tokens' positions for RoPE (default: the cache length onwards).

    Args:
        n_embd: C. n_head: H. n_kv_head: Hk (default H; must divide H).
        causal: mask future positions. bias: biases in the projections.
        dropout: dropout on the output projection (the kernel has no attention-weight dropout).
        rope: apply rotary embeddings to q and k (``rope_base``).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: Optional[int] = None,
        causal: bool = True,
        bias: bool = True,
        dropout: float = 0.0,
        rope: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if n_kv_head <= 0 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.c_attn = torch.nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = torch.nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = Dropout(dropout)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def new_cache(self, batch: int, capacity: int, dtype=torch.float32, device="cpu") -> KVCache:
        """An empty :class:`KVCache` for this layer."""
        return KVCache(batch, self.n_kv_head, capacity, self.head_dim, dtype, device)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention pattern (B, H, T, T) this layer computes for x (B, T, C): softmax of
        the scaled query-key products under its mask, in plain torch (for analysis, such as
        finding induction heads; the fused kernels never form this matrix)."""
        if x.dim() != 3 or x.size(-1) != self.n_embd:
            raise ValueError(f"expected x of shape (B, T, {self.n_embd}), got {tuple(x.shape)}")
        B, T, _ = x.size()
        D, H, Hk = self.head_dim, self.n_head, self.n_kv_head
        q, k, _ = self.c_attn(x).split([H * D, Hk * D, Hk * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hk, D).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, 0, None), self.rotary(k, 0, None)
        k = k.repeat_interleave(H // Hk, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        if self.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return scores.softmax(-1)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        positions: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if x.dim() != 3 or x.size(-1) != self.n_embd:
            raise ValueError(f"expected x of shape (B, T, {self.n_embd}), got {tuple(x.shape)}")
        B, T, C = x.size()
        D, H, Hk = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([H * D, Hk * D, Hk * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hk, D).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, Hk, D).transpose(1, 2)
        step = cache is not None and T == 1 and key_padding_mask is None
        if self.rotary is not None:
            if positions is None and cache is not None:
                positions = cache.lengths.view(B, 1) + torch.arange(T).view(1, T)
            q, k = self.rotary(q, 0, positions), self.rotary(k, 0, positions)
        if step:
            assert cache is not None
            lens = cache.append_step(k, v)
            y = decode_attention(q, cache.k, cache.v, lens)  # (B, H, 1, D)
        else:
            if cache is not None:
                k, v, gap = cache.append_block(k, v, lengths)
                if gap is not None:
                    if key_padding_mask is not None:
                        raise ValueError(
                            "key_padding_mask cannot be combined with a cache of rows of different lengths"
                        )
                    key_padding_mask = gap
            y = attention(
                q.contiguous(), k.contiguous(), v.contiguous(), causal=self.causal, key_padding_mask=key_padding_mask
            )
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dropout(self.c_proj(y))


class Packed:
    """The real tokens of a padded (B, T) batch, so that the per-token layers (projections,
    norms, feed-forward, output layer) run on the (N, C) rows of the N real tokens only and
    attention scatters them back to (B, T) around its product: a batch costs in proportion to
    its real tokens, not its padded size.

    Args:
        pad_mask: (B, T) bool, True at pads (None: no padding, packing is a reshape).
        B, T: the padded shape.
    """

    def __init__(self, pad_mask: Optional[torch.Tensor], B: int, T: int) -> None:
        self.B, self.T, self.mask = B, T, pad_mask
        self.rows = None if pad_mask is None else (~pad_mask).reshape(-1).nonzero()[:, 0]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (N, F), the real tokens' rows in row-major order."""
        flat = x.reshape(self.B * self.T, -1)
        return flat if self.rows is None else flat.index_select(0, self.rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (B, T, F) with zeros at the pads."""
        if self.rows is None:
            return x.reshape(self.B, self.T, -1)
        return x.new_zeros(self.B * self.T, x.size(-1)).index_copy(0, self.rows, x).view(self.B, self.T, -1)


class MultiheadAttention(torch.nn.Module):
    """``torch.nn.MultiheadAttention``'s parameters and batch-first layout on ferrolm's kernels:
    self-attention (optionally causal) and cross-attention (queries from one sequence, keys
    and values from another, such as a decoder attending to its encoder's output).

    Parameters as torch's (``in_proj_weight`` (3C, C) holding W_q, W_k, W_v, ``in_proj_bias``,
    ``out_proj``), so ``load_state_dict`` works both ways with ``torch.nn.MultiheadAttention``
    (and inside ``torch.nn.Transformer`` layers). Self-attention projects q, k, v in one GEMM;
    cross-attention projects the keys and values of the memory in one (:meth:`project_kv`, which
    a decoder calls once per source and passes back as ``memory_kv`` at every step).

    ``forward(x, memory=None, key_padding_mask=None, causal=False, cache=None, memory_kv=None,
    memory_lengths=None)``: x (B, T, C). Self-attention when ``memory`` and ``memory_kv`` are
    None: with a :class:`KVCache`, a single token per row (T = 1) is written at each row's
    length and attends to the row's cache (the decode kernel), a block of T > 1 tokens is
    appended and attends causally to the whole cache. Cross-attention otherwise:
    ``key_padding_mask`` (B, S) bool marks the memory's pad positions (True = ignore), or
    ``memory_lengths`` (B,) the real lengths of right-padded memory rows (single-token steps then
    run on the decode kernel).

    Args:
        embed_dim: C. num_heads: H (divides C).
        dropout: dropout on the attention weights, as torch's; while training with dropout > 0
            the product runs on torch's ``scaled_dot_product_attention`` (the fused kernel has
            no weight dropout); in eval mode, or with dropout 0, on ferrolm's.
        bias: biases in the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout = float(dropout)
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = torch.nn.Parameter(torch.zeros(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        torch.nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            torch.nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project_kv(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``memory`` (B, S, C), each (B, H, S, D), in one GEMM."""
        C = self.embed_dim
        if memory.dim() != 3 or memory.size(-1) != C:
            raise ValueError(f"expected memory of shape (B, S, {C}), got {tuple(memory.shape)}")
        b = None if self.in_proj_bias is None else self.in_proj_bias[C:]
        k, v = F.linear(memory, self.in_proj_weight[C:], b).split(C, dim=2)
        return self._split_heads(k), self._split_heads(v)

    def forward_packed(
        self,
        x: torch.Tensor,
        pack: Packed,
        causal: bool = False,
        memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention for the packed real tokens ``x`` (N, C) of a padded batch (see
        :class:`Packed`): self-attention among each row's real tokens (``causal`` optional), or
        cross-attention to ``memory_kv`` (from :meth:`project_kv_packed`) with the memory's
        ``memory_mask``. Returns (N, C)."""
        C = self.embed_dim
        if memory_kv is None:
            qkv = pack.unpack(F.linear(x, self.in_proj_weight, self.in_proj_bias))  # (B, T, 3C)
            q, k, v = (self._split_heads(t) for t in qkv.split(C, dim=2))
            y = self._attend(q, k, v, causal, pack.mask)
        else:
            b = None if self.in_proj_bias is None else self.in_proj_bias[:C]
            q = self._split_heads(pack.unpack(F.linear(x, self.in_proj_weight[:C], b)))
            y = self._attend(q, memory_kv[0], memory_kv[1], False, memory_mask)
        return self.out_proj(pack.pack(y.transpose(1, 2)))  # (N, C)

    def project_kv_packed(self, memory: torch.Tensor, pack: Packed) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, D) of packed memory rows (N, C); zeros at the pads."""
        C = self.embed_dim
        b = None if self.in_proj_bias is None else self.in_proj_bias[C:]
        k, v = pack.unpack(F.linear(memory, self.in_proj_weight[C:], b)).split(C, dim=2)
        return self._split_heads(k), self._split_heads(v)

    def _attend(self, q, k, v, causal: bool, key_padding_mask):
        if self.training and self.dropout > 0:
            mask = attention_mask(q.size(0), q.size(2), k.size(2), causal, key_padding_mask, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
            return y if mask is None else y.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return attention(
            q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, key_padding_mask=key_padding_mask
        )

    def forward(
        self,
        x: torch.Tensor,
        memory: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        cache: Optional[KVCache] = None,
        memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        memory_lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        C = self.embed_dim
        if x.dim() != 3 or x.size(-1) != C:
            raise ValueError(f"expected x of shape (B, T, {C}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if memory is None and memory_kv is None:  # self-attention
            q, k, v = (
                self._split_heads(t) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=2)
            )
            if cache is not None and T == 1 and key_padding_mask is None:
                lens = cache.append_step(k, v)
                y = decode_attention(q, cache.k, cache.v, lens)
            else:
                if cache is not None:
                    k, v = cache.append(k, v)
                    causal = True
                y = self._attend(q, k, v, causal, key_padding_mask)
        else:  # cross-attention
            if cache is not None or causal:
                raise ValueError("cross-attention takes no KV cache and no causal mask (the memory is fixed)")
            b = None if self.in_proj_bias is None else self.in_proj_bias[:C]
            q = self._split_heads(F.linear(x, self.in_proj_weight[:C], b))
            k, v = memory_kv if memory_kv is not None else self.project_kv(memory)  # type: ignore[arg-type]
            if k.size(0) != B:
                raise ValueError(f"the memory holds {k.size(0)} rows, the queries {B}")
            if memory_lengths is not None and T == 1 and not (self.training and self.dropout > 0):
                y = decode_attention(q, k, v, memory_lengths)
            else:
                if memory_lengths is not None and key_padding_mask is None:
                    key_padding_mask = (
                        torch.arange(k.size(2), device=x.device)[None, :] >= memory_lengths.to(x.device)[:, None]
                    )
                y = self._attend(q, k, v, False, key_padding_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)
