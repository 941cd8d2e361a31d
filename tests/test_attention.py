"""ferrolm.kernels.attention against torch (float64 reference math and SDPA), gradcheck, bad input."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from ferrolm import kernels
from ferrolm.testing import reference  # noqa: E402


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_matches_reference(q, k, v, causal, mask):
    """ferrolm's fp32 output and the gradients of q, k, v equal the float64 reference math to
    1e-5."""
    ours_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
    out = kernels.attention(*ours_in, causal=causal, key_padding_mask=mask)
    ref = reference.attention(*ref_in, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = rand(*out.shape, seed=4)
    out.backward(g)
    ref.backward(g.double())
    for a, r in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


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
    assert_matches_reference(q, k, v, causal, mask)


def test_matches_sdpa_and_fully_masked_rows_are_zero():
    q, k, v = rand(2, 4, 6, 32, seed=5), rand(2, 4, 6, 32, seed=6), rand(2, 4, 6, 32, seed=7)
    torch.testing.assert_close(
        kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        kernels.attention(q, k, v, causal=True),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        rtol=1e-5,
        atol=1e-6,
    )
    # Causal with Tq < Tk is aligned to the end (the KV-cache case): the last query row of a
    # block equals full attention's last row.
    full = kernels.attention(q, k, v, causal=True)
    tail = kernels.attention(q[:, :, -2:], k, v, causal=True)
    torch.testing.assert_close(tail, full[:, :, -2:], rtol=1e-5, atol=1e-6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = kernels.attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))
    qq = q.clone().requires_grad_(True)
    kernels.attention(qq, k, v, key_padding_mask=mask).sum().backward()
    assert torch.equal(qq.grad, torch.zeros_like(q))


@pytest.mark.parametrize("causal", [False, True])
def test_long_rows_with_interior_padding_match_reference(causal):
    """Rows long enough for the vector loops and their tails (133 keys), padded keys scattered
    inside the rows as well as a padded suffix."""
    b, h, t, d = 2, 2, 133, 64
    q, k, v = rand(b, h, t, d, seed=21), rand(b, h, t, d, seed=22), rand(b, h, t, d, seed=23)
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(24)) < 0.3
    mask[1, -40:] = True
    assert_matches_reference(q, k, v, causal, mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(1, 1), (2, 1)])
def test_batch_one_split_over_query_blocks_matches_reference(causal, heads):
    """One (batch, kv head) task: its query blocks are dealt to both threads (the backward's
    dK/dV parts summed after), with a ragged last block and interior padding."""
    (hq, hk), t = heads, 200
    q, k, v = rand(1, hq, t, 64, seed=31), rand(1, hk, t, 64, seed=32), rand(1, hk, t, 64, seed=33)
    mask = torch.zeros(1, t, dtype=torch.bool)
    mask[0, 7] = mask[0, 90] = True
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_matches_reference(q, k, v, causal, mask)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("causal", [False, True])
def test_nan_scores_propagate_like_sdpa(causal):
    q, k, v = rand(1, 2, 70, 32, seed=25), rand(1, 2, 70, 32, seed=26), rand(1, 2, 70, 32, seed=27)
    k[0, 1, 50] = float("nan")
    out = kernels.attention(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any()
    ok = ~ref.isnan()
    torch.testing.assert_close(out[ok], ref[ok], rtol=1e-5, atol=1e-6)


def test_non_cpu_tensors_delegate_to_sdpa():
    """Off the CPU, attention is torch's SDPA: on the "meta" device (no data, so the Rust kernel
    cannot have run) the result has SDPA's shape, causal, padded and grouped-query."""
    q, kv = torch.randn(2, 4, 6, 8, device="meta"), torch.randn(2, 2, 9, 8, device="meta")
    assert kernels.attention(q, kv, kv, causal=True).shape == (2, 4, 6, 8)
    pad = torch.zeros(2, 9, dtype=torch.bool, device="meta")
    out = kernels.attention(q, kv, kv, key_padding_mask=pad)
    assert out.device.type == "meta" and out.shape == (2, 4, 6, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q = rand(1, 4, 3, 5, dtype=torch.float64, seed=8).requires_grad_(True)
    k = rand(1, 2, 4, 5, dtype=torch.float64, seed=9).requires_grad_(True)
    v = rand(1, 2, 4, 3, dtype=torch.float64, seed=10).requires_grad_(True)
    mask = torch.tensor([[False, False, True, False]])
    assert torch.autograd.gradcheck(
        lambda a, b, c: kernels.attention(a, b, c, causal=causal, key_padding_mask=mask), (q, k, v)
    )


def test_bad_input():
    q, k, v = rand(2, 4, 5, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8)
    with pytest.raises(ValueError, match="must divide"):
        kernels.attention(q, rand(2, 3, 6, 8), rand(2, 3, 6, 8))
    with pytest.raises(ValueError, match="4-D"):
        kernels.attention(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.attention(q, rand(2, 2, 6, 7), v)
    with pytest.raises(TypeError, match="share a dtype"):
        kernels.attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"expected \(2, 6\)"):
        kernels.attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        kernels.attention(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="batch"):
        kernels.attention(q, rand(1, 2, 6, 8), rand(1, 2, 6, 8))


def test_other_dtypes_use_torch_with_same_semantics():
    q, k, v = rand(1, 2, 4, 8), rand(1, 1, 4, 8), rand(1, 1, 4, 8)
    mask = torch.tensor([[True, True, True, True]])
    out = kernels.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.zeros_like(out))
    a = kernels.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True).float()
    torch.testing.assert_close(a, kernels.attention(q, k, v, causal=True), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("heads", [(4, 4), (12, 4), (8, 1)])
def test_decode_equals_full_attention_on_the_last_position(heads):
    hq, hk = heads
    b, cap, d = 4, 300, 64
    q = rand(b, hq, d, seed=11)
    kc, vc = rand(b, hk, cap, d, seed=12), rand(b, hk, cap, d, seed=13)
    lengths = [300, 17, 0, 256]
    out = kernels.decode_attention(q, kc, vc, lengths)
    pad = torch.arange(cap)[None, :] >= torch.tensor(lengths)[:, None]
    ref = reference.attention(q[:, :, None].double(), kc.double(), vc.double(), key_padding_mask=pad)[:, :, 0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # The KV-cache case end to end: the last row of causal attention over a sequence equals
    # decoding its last token against the cache of the whole sequence.
    t = 37
    qs, ks, vs = rand(1, hq, t, d, seed=14), rand(1, hk, t, d, seed=15), rand(1, hk, t, d, seed=16)
    full = kernels.attention(qs, ks, vs, causal=True)[:, :, -1]
    torch.testing.assert_close(kernels.decode_attention(qs[:, :, -1], ks, vs, [t]), full, rtol=1e-5, atol=1e-6)
    assert kernels.decode_attention(qs[:, :, -1:], ks, vs, [t]).shape == (1, hq, 1, d)


def test_decode_bad_input():
    q, kc, vc = rand(2, 4, 8), rand(2, 2, 10, 8), rand(2, 2, 10, 8)
    with pytest.raises(ValueError, match="cache_lengths"):
        kernels.decode_attention(q, kc, vc, [11, 2])
    with pytest.raises(ValueError, match="cache_lengths"):
        kernels.decode_attention(q, kc, vc, [1])
    with pytest.raises(ValueError, match="must divide"):
        kernels.decode_attention(rand(2, 3, 8), kc, vc, [1, 2])
    with pytest.raises(ValueError, match="one query"):
        kernels.decode_attention(rand(2, 4, 2, 8), kc, vc, [1, 2])


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_cross_row_blocks(causal):
    """Tq > 64 exercises several query blocks, each with its own key limit (causal, padded
    suffix, and a hole in the padding mask that is not a suffix)."""
    b, hq, hk, tq, tk, d = 2, 2, 1, 150, 170, 32
    q, k, v = rand(b, hq, tq, d, seed=21), rand(b, hk, tk, d, seed=22), rand(b, hk, tk, d, seed=23)
    mask = torch.zeros(b, tk, dtype=torch.bool)
    mask[0, 100:] = True
    mask[1, 3:9] = True
    assert_matches_reference(q, k, v, causal, mask)
