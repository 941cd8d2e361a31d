"""ferrolm.ops.attention against torch (float64 reference math and SDPA), gradcheck, bad input."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from ferrolm import ops, reference  # noqa: E402


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


GRID = list(
    itertools.product(
        [(1, 1), (7, 7), (5, 9), (16, 16)],  # (Tq, Tk)
        [32, 64, 128],  # head_dim
        [(2, 2), (4, 2), (4, 1)],  # (Hq, Hk): MHA, GQA, MQA
        [False, True],  # causal
        [False, True],  # key padding
    )
)


@pytest.mark.parametrize("times,d,heads,causal,padded", GRID)
def test_forward_and_gradients_match_float64_reference(times, d, heads, causal, padded):
    (tq, tk), (hq, hk) = times, heads
    b = 2
    q, k, v = rand(b, hq, tq, d, seed=1), rand(b, hk, tk, d, seed=2), rand(b, hk, tk, d, seed=3)
    mask = None
    if padded:
        mask = torch.zeros(b, tk, dtype=torch.bool)
        mask[1, tk // 2 :] = True  # second sequence: the later half of the keys is padding
        mask[0, 0] = tk > 1
    ours_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
    out = ops.attention(*ours_in, causal=causal, key_padding_mask=mask)
    ref = reference.attention(*ref_in, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = rand(*out.shape, seed=4)
    out.backward(g)
    ref.backward(g.double())
    for a, r in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def test_matches_sdpa_and_fully_masked_rows_are_zero():
    q, k, v = rand(2, 4, 6, 32, seed=5), rand(2, 4, 6, 32, seed=6), rand(2, 4, 6, 32, seed=7)
    torch.testing.assert_close(ops.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)
    # Causal with Tq < Tk is aligned to the end (the KV-cache case): the last query row of a
    # block equals full attention's last row.
    full = ops.attention(q, k, v, causal=True)
    tail = ops.attention(q[:, :, -2:], k, v, causal=True)
    torch.testing.assert_close(tail, full[:, :, -2:], rtol=1e-5, atol=1e-6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = ops.attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))
    qq = q.clone().requires_grad_(True)
    ops.attention(qq, k, v, key_padding_mask=mask).sum().backward()
    assert torch.equal(qq.grad, torch.zeros_like(q))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q = rand(1, 4, 3, 5, dtype=torch.float64, seed=8).requires_grad_(True)
    k = rand(1, 2, 4, 5, dtype=torch.float64, seed=9).requires_grad_(True)
    v = rand(1, 2, 4, 3, dtype=torch.float64, seed=10).requires_grad_(True)
    mask = torch.tensor([[False, False, True, False]])
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, causal=causal, key_padding_mask=mask), (q, k, v))


def test_bad_input():
    q, k, v = rand(2, 4, 5, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8)
    with pytest.raises(ValueError, match="must divide"):
        ops.attention(q, rand(2, 3, 6, 8), rand(2, 3, 6, 8))
    with pytest.raises(ValueError, match="4-D"):
        ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention(q, rand(2, 2, 6, 7), v)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"expected \(2, 6\)"):
        ops.attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        ops.attention(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="batch"):
        ops.attention(q, rand(1, 2, 6, 8), rand(1, 2, 6, 8))


def test_other_dtypes_use_torch_with_same_semantics():
    q, k, v = rand(1, 2, 4, 8), rand(1, 1, 4, 8), rand(1, 1, 4, 8)
    mask = torch.tensor([[True, True, True, True]])
    out = ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.zeros_like(out))
    a = ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True).float()
    torch.testing.assert_close(a, ops.attention(q, k, v, causal=True), rtol=0.05, atol=0.05)
