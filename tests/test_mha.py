"""MultiheadSelfAttention against torch.nn.MultiheadAttention, KV-cache generation against the
full forward, and the positional encodings against their formulas."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from ferrolm.nn import LearnedPositionalEmbedding, MultiheadSelfAttention, RotaryEmbedding, SinusoidalPositionalEncoding  # noqa: E402


@pytest.mark.parametrize("causal", [False, True])
def test_equals_torch_multihead_attention(causal):
    torch.manual_seed(0)
    C, H = 32, 4
    ours = MultiheadSelfAttention(C, H, causal=causal)
    ref = torch.nn.MultiheadAttention(C, H, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.c_attn.weight)
        ref.in_proj_bias.copy_(ours.c_attn.bias)
        ref.out_proj.weight.copy_(ours.c_proj.weight)
        ref.out_proj.bias.copy_(ours.c_proj.bias)
    x = torch.randn(3, 7, C, requires_grad=True)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[2, 5:] = True
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1) if causal else None
    a = ours(x, key_padding_mask=pad)
    b, _ = ref(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.sum(), [x] + list(ours.parameters()))
    gb = torch.autograd.grad(b.sum(), [x, ref.in_proj_weight, ref.in_proj_bias, ref.out_proj.weight, ref.out_proj.bias])
    for u, w in zip(ga, gb):
        torch.testing.assert_close(u, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rope,n_kv_head", [(False, 4), (True, 2), (True, 1)])
def test_kv_cache_generation_equals_full_forward(rope, n_kv_head):
    torch.manual_seed(1)
    m = MultiheadSelfAttention(32, 4, n_kv_head=n_kv_head, rope=rope).eval()
    x = torch.randn(2, 9, 32)
    full = m(x)
    cache = m.new_cache(2, 16)
    steps = [m(x[:, :4], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overflows"):
        m(torch.randn(2, 8, 32), cache=cache)


def test_positional_encodings():
    pe = SinusoidalPositionalEncoding(8, max_len=50)
    x = torch.zeros(1, 5, 8)
    out = pe(x, offset=3)
    p, i = 6, 1
    assert math.isclose(out[0, 3, 2 * i].item(), math.sin(p / 10000 ** (2 * i / 8)), rel_tol=1e-6)
    assert math.isclose(out[0, 3, 2 * i + 1].item(), math.cos(p / 10000 ** (2 * i / 8)), rel_tol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        pe(torch.zeros(1, 60, 8))
    wpe = LearnedPositionalEmbedding(4, 8)
    with pytest.raises(ValueError, match="block_size=4"):
        wpe(torch.zeros(1, 5, 8))
    rope = RotaryEmbedding(16)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    # The score depends only on the distance between positions, and norms are kept.
    s1 = (rope(q, 5) * rope(k, 2)).sum()
    s2 = (rope(q, 13) * rope(k, 10)).sum()
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(rope(q, 7).norm(), q.norm())


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadSelfAttention(30, 4)
    with pytest.raises(ValueError, match="must divide"):
        MultiheadSelfAttention(32, 4, n_kv_head=3)
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        MultiheadSelfAttention(32, 4)(torch.randn(2, 5, 16))


@pytest.mark.parametrize("rope,kv,causal", [(False, None, True), (True, 2, True), (False, None, False)])
def test_attention_weights_reproduce_the_layer_output(rope, kv, causal):
    torch.manual_seed(0)
    m = MultiheadSelfAttention(32, 4, n_kv_head=kv, causal=causal, rope=rope)
    x = torch.randn(2, 9, 32)
    w = m.attention_weights(x).detach()
    assert w.shape == (2, 4, 9, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
    if causal:
        assert float(w.triu(1).abs().max()) == 0.0
    hk = kv or 4
    v = m.c_attn(x)[..., (4 + hk) * 8 :].view(2, 9, hk, 8).transpose(1, 2).repeat_interleave(4 // hk, dim=1)
    y = (w @ v).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(m.c_proj(y), m(x), rtol=1e-5, atol=1e-5)
