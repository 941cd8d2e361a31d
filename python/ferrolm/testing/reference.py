"""Pure-PyTorch twins of ferrolm's fused kernels, with identical semantics and layouts.

Tests compare the kernels with these (and with torch's own modules); benchmarks use torch's
modules as the baseline. The models (:class:`GPT`, :class:`LSTMLanguageModel`,
:class:`SequenceClassifier`) are ``ferrolm.models``' architectures written the plain-PyTorch
way — ``torch.nn.LSTM`` and ``scaled_dot_product_attention`` — with identical parameter names,
so one state dict loads into either.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = [
    "lstm_layer",
    "gru_layer",
    "attention",
    "GPT",
    "LSTMLanguageModel",
    "SequenceClassifier",
    "Seq2SeqTransformer",
    "Seq2SeqLSTM",
    "AttentionLSTM",
]


def _steps(batch_sizes: Sequence[int], reverse: bool):
    offsets = [0]
    for b in batch_sizes:
        offsets.append(offsets[-1] + int(b))
    order = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    return offsets, order


def lstm_layer(
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer direction over packed rows, step by step in torch ops (see
    :func:`ferrolm.kernels.lstm_layer` for the layout)."""
    offsets, order = _steps(batch_sizes, reverse)
    h, c = h0.clone(), c0.clone()
    ys = [None] * len(batch_sizes)
    for t in order:
        bs = int(batch_sizes[t])
        g = x[offsets[t] : offsets[t] + bs] @ w_ih.t() + h[:bs] @ w_hh.t()
        if b_ih is not None:
            g = g + b_ih
        if b_hh is not None:
            g = g + b_hh
        i, f, gg, o = g.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[:bs] + torch.sigmoid(i) * torch.tanh(gg)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        h = torch.cat([h_new, h[bs:]])
        c = torch.cat([c_new, c[bs:]])
        ys[t] = h_new
    return torch.cat(ys), h, c


def gru_layer(x, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer direction over packed rows, step by step in torch ops."""
    offsets, order = _steps(batch_sizes, reverse)
    h = h0.clone()
    ys = [None] * len(batch_sizes)
    for t in order:
        bs = int(batch_sizes[t])
        gx = x[offsets[t] : offsets[t] + bs] @ w_ih.t()
        gh = h[:bs] @ w_hh.t()
        if b_ih is not None:
            gx = gx + b_ih
        if b_hh is not None:
            gh = gh + b_hh
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h_new = (1 - z) * n + z * h[:bs]
        h = torch.cat([h_new, h[bs:]])
        ys[t] = h_new
    return torch.cat(ys), h


def attention(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """Scaled-dot-product attention in plain torch ops (the math of
    :func:`ferrolm.kernels.attention`: end-aligned causal mask, True = padded key, GQA, zeros for a
    query that sees no key)."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    group = hq // hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = (1.0 / d**0.5) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        allowed = allowed & (j <= i + (tk - tq))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~any_key, 0.0), dim=-1).masked_fill(~allowed, 0.0)
    return (p @ v).masked_fill(~any_key, 0.0)


# --------------------------------------------------------------------------- models

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on (B, H, T, D) at positions (B, T) or (T,), interleaved pairs."""
    d = x.size(-1)
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    ang = pos.to(torch.float64)[..., None] * inv  # (..., T, D/2)
    if ang.dim() == 3:
        ang = ang[:, None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x2 = x.reshape(*x.shape[:-1], d // 2, 2)
    a, b = x2[..., 0], x2[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)


class CausalSelfAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.rope = config.positions == "rotary"
        self.rope_base = config.rope_base
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, padding_mask=None, pos=None):
        B, T, C = x.size()
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hk * D, Hk * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hk, D).transpose(1, 2)
        v = v.view(B, T, Hk, D).transpose(1, 2)
        if self.rope:
            p = torch.arange(T, device=x.device) if pos is None else pos
            q, k = _rope(q, p, self.rope_base), _rope(k, p, self.rope_base)
        if Hk != H:
            k = k.repeat_interleave(H // Hk, dim=1)
            v = v.repeat_interleave(H // Hk, dim=1)
        if padding_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            allowed = causal[None, None] & ~padding_mask[:, None, None, :]  # (B, 1, T, T)
            seen = allowed.any(-1, keepdim=True)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~seen)
            y = y.masked_fill(~seen, 0.0)  # a query that sees no key gives zeros
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.dropout(self.c_proj(y))


class _MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class _Block(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.has_mlp = config.mlp
        if config.mlp:
            self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
            self.mlp = _MLP(config)

    def forward(self, x, padding_mask=None, pos=None):
        x = x + self.attn(self.ln_1(x), padding_mask, pos)
        return x + self.mlp(self.ln_2(x)) if self.has_mlp else x


class GPT(nn.Module):
    """nanoGPT-style GPT on ``scaled_dot_product_attention``; same names and math as
    :class:`ferrolm.models.GPT` (``forward(idx, targets=None, padding_mask=None)``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        d = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.positions == "learned":
            d["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        d["drop"] = nn.Dropout(config.dropout)
        d["h"] = nn.ModuleList([_Block(config) for _ in range(config.n_layer)])
        d["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.transformer = nn.ModuleDict(d)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def _sinusoid(self, pos: torch.Tensor) -> torch.Tensor:
        C = self.config.n_embd
        inv = 10000.0 ** (-torch.arange(0, C, 2, dtype=torch.float64, device=pos.device) / C)
        ang = pos.to(torch.float64)[..., None] * inv
        pe = torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)
        return pe.float()

    def hidden_states(self, idx, padding_mask=None, lengths=None):
        B, T = idx.size()
        if lengths is not None:
            padding_mask = torch.arange(T)[None, :] >= torch.as_tensor(lengths)[:, None]
        pos = None if padding_mask is None else ((~padding_mask).long().cumsum(1) - 1).clamp_min(0)
        p = torch.arange(T, device=idx.device) if pos is None else pos
        x = self.transformer.wte(idx)
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(p)
        elif self.config.positions == "sinusoidal":
            x = x + self._sinusoid(p).to(x.dtype)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, padding_mask, pos)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, padding_mask=None, lengths=None):
        logits = self.lm_head(self.hidden_states(idx, padding_mask, lengths))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


class LSTMLanguageModel(nn.Module):
    """Embedding -> ``torch.nn.LSTM``/``GRU`` -> Linear; same names and math as
    :class:`ferrolm.models.LSTMLanguageModel`."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        cls = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = cls(
            config.n_embd,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.head.weight = self.embed.weight

    def hidden_states(self, idx, lengths=None, state=None):
        x = self.drop(self.embed(idx))
        if lengths is None:
            out, _ = self.rnn(x, state)
        else:
            T = idx.size(1)
            packed = nn.utils.rnn.pack_padded_sequence(
                x, torch.as_tensor(lengths).cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = self.rnn(packed, state)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        return self.drop(out)

    def forward(self, idx, targets=None, lengths=None, state=None):
        logits = self.head(self.hidden_states(idx, lengths, state))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


class SequenceClassifier(nn.Module):
    """A reference backbone, pooling and a linear head (``backbone``, ``head``)."""

    def __init__(self, config) -> None:
        super().__init__()
        from ..models import GPTConfig

        self.config = config
        from ..models import LSTMConfig
        from ..models.classifier import backbone_width

        bc = config.backbone
        self.backbone = (
            GPT(bc)
            if isinstance(bc, GPTConfig)
            else LSTMLanguageModel(bc)
            if isinstance(bc, LSTMConfig)
            else AttentionLSTM(bc)
        )
        width = backbone_width(bc)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(width, config.num_classes)

    def forward(self, idx, labels=None, lengths=None):
        B, T = idx.shape
        h = self.backbone.hidden_states(idx, lengths=lengths)
        lens = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
        real = (torch.arange(T)[None, :] < lens[:, None])[:, :, None]
        how = self.config.pooling
        if how == "last":
            pooled = h[torch.arange(B), lens - 1]
        elif how == "first":
            pooled = h[:, 0]
        elif how == "mean":
            pooled = (h * real).sum(1) / lens[:, None].to(h.dtype)
        else:
            pooled = h.masked_fill(~real, -math.inf).amax(1)
        logits = self.head(self.drop(pooled))
        return logits, (F.cross_entropy(logits, torch.as_tensor(labels)) if labels is not None else None)


# --------------------------------------------------------------------------- seq2seq and hybrid models


def _sinusoid_table(T: int, C: int, offset: int = 0) -> torch.Tensor:
    pos = torch.arange(offset, offset + T, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, C, 2, dtype=torch.float64) / C)
    pe = torch.zeros(T, C, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)
    return pe.float()


class _PositionTable(nn.Module):
    def __init__(self, n: int, C: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, C) * 0.02)


class Seq2SeqTransformer(nn.Module):
    """Embeddings (scaled by sqrt(C)) + positions + ``torch.nn.Transformer`` itself (batch first,
    causal target mask, source padding masks) + a linear generator: the plain-PyTorch twin of
    :class:`ferrolm.models.seq2seq.Seq2SeqTransformer`, with identical parameter names
    (:func:`ferrolm.decoding.decode_uncached` decodes with it)."""

    is_encoder_decoder = True

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.src_embed = nn.Embedding(config.src_vocab_size, C)
        self.tgt_embed = self.src_embed if config.shared_embeddings else nn.Embedding(config.tgt_vocab_size, C)
        if config.positions == "learned":
            self.src_pos = _PositionTable(config.max_len, C)
            self.tgt_pos = _PositionTable(config.max_len, C)
        self.drop = nn.Dropout(config.dropout)
        self.transformer = nn.Transformer(
            d_model=C,
            nhead=config.n_head,
            num_encoder_layers=config.n_layer,
            num_decoder_layers=config.decoder_layers,
            dim_feedforward=config.ff_size,
            dropout=config.dropout,
            activation=config.activation,
            layer_norm_eps=config.layer_norm_eps,
            batch_first=True,
            norm_first=config.norm_first,
            bias=config.bias,
        )
        for (
            mha
        ) in self.transformer.modules():  # attention-weight dropout as the config says (torch ties it to `dropout`)
            if isinstance(mha, nn.MultiheadAttention):
                mha.dropout = config.attention_dropout
        self.generator = nn.Linear(C, config.tgt_vocab_size, bias=config.bias)
        if config.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def _embed(self, idx, side: str):
        emb = self.src_embed if side == "src" else self.tgt_embed
        x = emb(idx) * math.sqrt(self.config.n_embd)
        T = idx.size(1)
        if self.config.positions == "learned":
            x = x + (self.src_pos if side == "src" else self.tgt_pos).weight[:T]
        else:
            x = x + _sinusoid_table(T, self.config.n_embd).to(x.device, x.dtype)
        return self.drop(x)

    def forward(self, src, tgt, targets=None):
        pad = src == self.config.pad_id
        T = tgt.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tgt.device)
        h = self.transformer(
            self._embed(src, "src"),
            self._embed(tgt, "tgt"),
            tgt_mask=causal,
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
            tgt_is_causal=True,
        )
        logits = self.generator(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
            )
        return logits, loss


class Seq2SeqLSTM(nn.Module):
    """``torch.nn.LSTM`` encoder (bidirectional, packed) and decoder with Luong attention in
    explicit torch ops: the twin of :class:`ferrolm.models.seq2seq.Seq2SeqLSTM`, identical names."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        E, H, L = config.n_embd, config.hidden_size, config.num_layers
        drop = config.dropout if L > 1 else 0.0
        self.src_embed = nn.Embedding(config.src_vocab_size, E)
        self.tgt_embed = self.src_embed if config.shared_embeddings else nn.Embedding(config.tgt_vocab_size, E)
        self.encoder = nn.LSTM(E, H // 2, num_layers=L, batch_first=True, bidirectional=True, dropout=drop)
        self.decoder = nn.LSTM(E, H, num_layers=L, batch_first=True, dropout=drop)
        if config.attention == "general":
            self.attn_proj = nn.Linear(H, H, bias=False)
        self.combine = nn.Linear(2 * H, H, bias=False)
        self.drop = nn.Dropout(config.dropout)
        self.generator = nn.Linear(H, config.tgt_vocab_size)
        if config.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def forward(self, src, tgt, targets=None):
        B, S = src.shape
        L = self.config.num_layers
        lengths = (src != self.config.pad_id).sum(1)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.src_embed(src)), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        enc, (h_n, c_n) = self.encoder(packed)
        enc, _ = nn.utils.rnn.pad_packed_sequence(enc, batch_first=True, total_length=S)  # (B, S, H)
        join = lambda s: s.view(L, 2, B, -1).transpose(1, 2).reshape(L, B, -1)  # noqa: E731
        out, _ = self.decoder(self.drop(self.tgt_embed(tgt)), (join(h_n), join(c_n)))  # (B, T, H)
        keys = self.attn_proj(enc) if self.config.attention == "general" else enc
        scores = out @ keys.transpose(1, 2)  # (B, T, S)
        scores = scores.masked_fill((src == self.config.pad_id)[:, None, :], float("-inf"))
        ctx = torch.softmax(scores, dim=-1) @ enc  # (B, T, H)
        logits = self.generator(self.drop(torch.tanh(self.combine(torch.cat([ctx, out], dim=-1)))))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
            )
        return logits, loss


class _SelfAttention(nn.Module):
    """GPT-2-named (``c_attn``, ``c_proj``) multi-head self-attention on SDPA, causal or with
    key padding."""

    def __init__(self, n_embd: int, n_head: int, causal: bool, dropout: float) -> None:
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, padding_mask=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if self.causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if padding_mask is None else ~padding_mask[:, None, None, :]
            )
        return self.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class AttentionLSTM(nn.Module):
    """Embedding -> self-attention (pre-norm, residual) -> ``torch.nn.LSTM`` -> head: the twin of
    :class:`ferrolm.models.AttentionLSTM`, identical names."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.embed = nn.Embedding(config.vocab_size, C)
        self.ln = nn.LayerNorm(C)
        self.attn = _SelfAttention(C, config.n_head, config.causal, config.dropout)
        self.rnn = nn.LSTM(
            C,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.output_size, config.vocab_size)

    def hidden_states(self, idx, lengths=None):
        B, T = idx.shape
        pad = None if lengths is None else torch.arange(T)[None, :] >= torch.as_tensor(lengths)[:, None]
        x = self.drop(self.embed(idx))
        x = x + self.attn(self.ln(x), pad)
        if lengths is None:
            out, _ = self.rnn(x)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(
                x, torch.as_tensor(lengths).cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=T)
        return self.drop(out)

    def forward(self, idx, targets=None, lengths=None):
        logits = self.head(self.hidden_states(idx, lengths))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss
