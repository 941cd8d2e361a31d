"""A block appended to KV-cache rows of different lengths (``KVCache.append_block``): each row's
block attends to exactly that row's past, so scores equal transformers' full forward of each
row alone; a cache left with gaps refuses to grow."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ferrolm.models import GPT, Llama, LlamaConfig  # noqa: E402
from ferrolm.nn import KVCache  # noqa: E402


def _gpt():
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=70, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    ).eval()
    return hf, GPT.from_hf_gpt2(hf).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ragged_block_equals_each_row_alone(arch, hf_llama):
    if arch == "llama":
        hf = hf_llama(vocab_size=70, rope_theta=500.0)
        ours = Llama.from_hf(hf).eval()
    else:
        hf, ours = _gpt()
    g = torch.Generator().manual_seed(5)
    ctx_lens, block_lens = [3, 11, 7, 11], [4, 2, 5, 1]
    ctxs = [torch.randint(0, 70, (n,), generator=g).tolist() for n in ctx_lens]
    blocks = [torch.randint(0, 70, (n,), generator=g).tolist() for n in block_lens]
    with torch.no_grad():
        state = ours.start(len(ctxs), max(ctx_lens) + max(block_lens))
        idx = torch.zeros(len(ctxs), max(ctx_lens), dtype=torch.int64)
        for i, c in enumerate(ctxs):
            idx[i, : len(c)] = torch.tensor(c)
        ours.advance(state, idx, torch.tensor(ctx_lens))
        assert state[0].lengths.tolist() == ctx_lens
        blk = torch.zeros(len(blocks), max(block_lens), dtype=torch.int64)
        for i, b in enumerate(blocks):
            blk[i, : len(b)] = torch.tensor(b)
        rows = []
        if isinstance(ours, Llama):  # its per-token layers see the real tokens only
            proj = ours.model.layers[0].self_attn.q_proj
            hook = proj.register_forward_hook(lambda m, a, out: rows.append(a[0].reshape(-1, a[0].size(-1)).size(0)))
        got = ours.logits(ours.advance(state, blk, torch.tensor(block_lens)))
        if isinstance(ours, Llama):
            hook.remove()
            assert rows == [sum(block_lens)]
        assert state[0].lengths.tolist() == [max(ctx_lens) + n for n in block_lens]
        for i, (c, b) in enumerate(zip(ctxs, blocks)):
            want = hf(torch.tensor([c + b])).logits[0, len(c) :]
            torch.testing.assert_close(got[i, : len(b)], want, rtol=1e-5, atol=1e-5)


def test_append_block_mask_and_a_cache_with_gaps_refuses_to_grow():
    c = KVCache(3, 1, 10, 2)
    c.lengths = torch.tensor([2, 5, 4])
    k = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 1, 2, 2)
    ks, vs, mask = c.append_block(k, -k, torch.tensor([2, 1, 2]))
    assert ks.shape == (3, 1, 7, 2) and vs.shape == (3, 1, 7, 2)
    torch.testing.assert_close(ks[:, :, 5:], k)
    torch.testing.assert_close(vs[:, :, 5:], -k)
    want = torch.zeros(3, 7, dtype=torch.bool)
    want[0, 2:5] = True
    want[2, 4:5] = True
    assert torch.equal(mask, want)
    assert c.lengths.tolist() == [7, 6, 7]
    sub = c.select(torch.tensor([2, 0]))
    assert sub.gap is not None and sub.gap[0].tolist() == [4, 2] and sub.gap[1] == 5
    for cache in (c, sub):
        with pytest.raises(ValueError, match="ragged block"):
            cache.append_step(k[: cache.k.size(0), :, :1], k[: cache.k.size(0), :, :1])
        with pytest.raises(ValueError, match="ragged block"):
            cache.append(k[: cache.k.size(0)], k[: cache.k.size(0)])
    with pytest.raises(ValueError, match="overflows"):
        _overflow()
    # equal rows: the plain append, no mask and no gap
    e = KVCache(2, 1, 6, 2)
    _, _, m = e.append_block(torch.ones(2, 1, 3, 2), torch.ones(2, 1, 3, 2))
    assert m is None and e.gap is None and e.lengths.tolist() == [3, 3]


def _overflow():
    c = KVCache(2, 1, 6, 2)
    c.lengths = torch.tensor([1, 5])
    c.append_block(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))


def test_fused_step_refuses_a_cache_with_gaps():
    m = Llama(LlamaConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16, ff_size=32)).eval()
    with torch.no_grad():
        st = m.start(2, 16)
        m.advance(st, torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]))
        m.advance(st, torch.tensor([[6, 7], [8, 9]]))
        assert st[0].gap is not None
        with pytest.raises(ValueError, match="ragged block"):
            m.step_logits(st, torch.tensor([[1], [2]]))
