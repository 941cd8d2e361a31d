"""Attention workloads: ferrolm.kernels.attention against torch's ``scaled_dot_product_attention`` (its CPU flash
kernel) with the same threads: causal and full, forward and forward + backward, 40% key padding, and one decode step
over a KV cache (ferrolm.kernels.decode_attention), each sized in GFLOP where the count is plain.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from ..harness import Result, Workload, measure

__all__ = ["attention_workloads", "run"]


def attention_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The attention comparisons at B=2 H=8 D=64, T in {512, 1024} (and 2048 with ``full``), then decode at B=8
    H=12 D=64 over a 2048-token cache; ``smoke`` runs T=64 and decodes at B=2 H=4 D=16 over a 64-token cache."""
    import torch
    import torch.nn.functional as F

    from ...kernels import attention, decode_attention

    g = torch.Generator().manual_seed(0)
    lengths = [64] if smoke else [512, 1024] + ([2048] if full else [])
    out = []
    for t in lengths:
        b, h, d = 2, 8, 64
        q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
        for causal in (True, False):
            flops = 4.0 * b * h * t * t * d * (0.5 if causal else 1.0)
            tag = "causal" if causal else "full"

            def fwd_ours(causal=causal, q=q, k=k, v=v):
                return attention(q, k, v, causal=causal)

            def fwd_torch(causal=causal, q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def bwd_ours(causal=causal, q=qg, k=kg, v=vg):
                attention(q, k, v, causal=causal).sum().backward()

            def bwd_torch(causal=causal, q=qg, k=kg, v=vg):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

            shape = f"B={b} H={h} T={t} D={d}"
            out.append(
                Workload(
                    f"attention {tag} {shape}: forward",
                    {"ferrolm": fwd_ours, "torch_sdpa": fwd_torch},
                    f"{flops / 1e9:.2f} GFLOP",
                    {"gflop": flops / 1e9},
                )
            )
            out.append(
                Workload(
                    f"attention {tag} {shape}: forward+backward",
                    {"ferrolm": bwd_ours, "torch_sdpa": bwd_torch},
                    f"{3.5 * flops / 1e9:.2f} GFLOP",
                    {"gflop": 3.5 * flops / 1e9},
                )
            )
        pad = torch.zeros(b, t, dtype=torch.bool)
        pad[:, int(t * 0.6) :] = True
        allowed = ~pad[:, None, None, :]

        def pad_ours(q=q, k=k, v=v, pad=pad):
            return attention(q, k, v, key_padding_mask=pad)

        def pad_torch(q=q, k=k, v=v, allowed=allowed):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

        out.append(
            Workload(
                f"attention 40% key padding B={b} H={h} T={t} D={d}: forward",
                {"ferrolm": pad_ours, "torch_sdpa": pad_torch},
                "-",
            )
        )
    b, h, cap, d = (2, 4, 64, 16) if smoke else (8, 12, 2048, 64)
    qd = torch.randn(b, h, 1, d, generator=g)
    kc, vc = torch.randn(b, h, cap, d, generator=g), torch.randn(b, h, cap, d, generator=g)
    cache_lengths = [cap] * b

    def dec_ours(qd=qd, kc=kc, vc=vc, lengths=cache_lengths):
        return decode_attention(qd, kc, vc, lengths)

    def dec_torch(qd=qd, kc=kc, vc=vc):
        return F.scaled_dot_product_attention(qd, kc, vc)

    mb = 2 * b * h * cap * d * 4 / 1e6
    out.append(
        Workload(
            f"decode B={b} H={h} cache={cap} D={d} ({mb:.0f} MB of cache)",
            {"ferrolm": dec_ours, "torch_sdpa": dec_torch},
            "-",
        )
    )
    return out


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The attention rows of ``ferrolm bench``, each yielded as soon as it is timed."""
    for w in attention_workloads(full=full):
        yield measure("attention", w, repeats)
