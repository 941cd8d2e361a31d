"""Seq2SeqTransformer against torch.nn.Transformer itself, Seq2SeqLSTM and AttentionLSTM against
their plain-torch twins (same weights, padded batches, outputs and every gradient), cached
decoding against uncached, beam search against exhaustive search, checkpoints, bad input."""

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from ferrolm.decoding import beam_search, decode_uncached, greedy_decode  # noqa: E402
from ferrolm.models import (  # noqa: E402
    GPT,
    AttentionLSTM,
    AttentionLSTMConfig,
    ClassifierConfig,
    Seq2SeqLSTM,
    Seq2SeqLSTMConfig,
    Seq2SeqTransformer,
    Seq2SeqTransformerConfig,
    SequenceClassifier,
    load_model,
)
from ferrolm.testing import reference  # noqa: E402

PAD, BOS, EOS = 0, 1, 2


def _batch(V_src, V_tgt, src_lens, tgt_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(src_lens)
    src = torch.full((B, max(src_lens)), PAD)
    tgt = torch.full((B, max(tgt_lens)), PAD)
    y = torch.full((B, max(tgt_lens)), -100)
    for b, (s, t) in enumerate(zip(src_lens, tgt_lens)):
        src[b, :s] = torch.randint(3, V_src, (s,), generator=g)
        tgt[b, 0] = BOS
        tgt[b, 1:t] = torch.randint(3, V_tgt, (t - 1,), generator=g)
        y[b, : t - 1] = tgt[b, 1:t]
        y[b, t - 1] = EOS
    return src, tgt, y


def _perturb(model, seed=1):
    """Non-trivial biases and norms (zeros and ones would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _compare(ours, ref, src, tgt, y, atol_out, rtol_grad, atol_grad):
    """Logits at the real target positions (ferrolm computes no others), the loss, and the
    gradients of both through every parameter."""
    real = tgt != PAD
    lo, l1 = ours(src, tgt, targets=y)
    ro, r1 = ref(src, tgt, targets=y)
    torch.testing.assert_close(lo[real], ro[real], atol=atol_out, rtol=atol_out)
    torch.testing.assert_close(l1, r1, atol=atol_out, rtol=atol_out)
    (lo[real].sum() * 0.01 + l1).backward()
    (ro[real].sum() * 0.01 + r1).backward()
    rp = dict(ref.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, rp[name].grad, rtol=rtol_grad, atol=atol_grad, msg=name)
        n += 1
    assert n == len(rp)


TRANSFORMER_CASES = [
    dict(),
    dict(norm_first=True, activation="gelu"),
    dict(positions="learned", shared_embeddings=True, tie_output=True),
    dict(n_decoder_layer=1, bias=False, norm_first=True),
]


@pytest.mark.parametrize(
    "extra", TRANSFORMER_CASES, ids=["post-relu", "pre-gelu", "learned-shared-tied", "asym-nobias"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transformer_equals_torch_nn_transformer(extra, dtype):
    V = 37
    cfg = Seq2SeqTransformerConfig(
        src_vocab_size=V,
        tgt_vocab_size=V,
        n_layer=2,
        n_head=4,
        n_embd=32,
        ff_size=48,
        dropout=0.0,
        max_len=16,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        label_smoothing=0.1,
        **extra,
    )
    torch.manual_seed(0)
    ours = Seq2SeqTransformer(cfg).to(dtype)
    _perturb(ours)
    ref = reference.Seq2SeqTransformer(cfg).to(dtype)
    ref.load_state_dict(ours.state_dict())
    src, tgt, y = _batch(V, V, [7, 3, 5, 1], [6, 2, 4, 5])
    if dtype == torch.float32:
        _compare(ours, ref, src, tgt, y, 1e-5, 1e-4, 1e-5)
    else:
        _compare(ours, ref, src, tgt, y, 1e-10, 1e-8, 1e-10)


def test_transformer_weights_load_both_ways_with_torch_transformer():
    cfg = Seq2SeqTransformerConfig(
        src_vocab_size=20, tgt_vocab_size=30, n_layer=2, n_head=2, n_embd=16, ff_size=24, dropout=0.0, max_len=12
    )
    torch.manual_seed(0)
    theirs = torch.nn.Transformer(16, 2, 2, 2, 24, dropout=0.0, batch_first=True)
    ours = Seq2SeqTransformer(cfg)
    ours.transformer.load_state_dict(theirs.state_dict())  # torch -> ferrolm
    ref = reference.Seq2SeqTransformer(cfg)
    ref.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ref.transformer.state_dict()[k], v)
    back = torch.nn.Transformer(16, 2, 2, 2, 24, dropout=0.0, batch_first=True)
    back.load_state_dict(ours.transformer.state_dict())  # ferrolm -> torch (strict)
    src, tgt, _ = _batch(20, 30, [5, 2], [4, 3])
    ours.eval(), ref.eval()
    real = tgt != PAD
    torch.testing.assert_close(ours(src, tgt)[0][real], ref(src, tgt)[0][real], atol=1e-5, rtol=1e-5)
    assert bool((ours(src, tgt)[0][~real] == 0).all())  # pads are not computed


def test_transformer_separate_vocabularies_and_padding_does_not_leak():
    cfg = Seq2SeqTransformerConfig(
        src_vocab_size=50, tgt_vocab_size=23, n_layer=1, n_head=2, n_embd=16, ff_size=32, dropout=0.0, max_len=20
    )
    torch.manual_seed(0)
    m = Seq2SeqTransformer(cfg).eval()
    src, tgt, _ = _batch(50, 23, [4, 9], [5, 5])
    with pytest.raises(ValueError, match="must be -100"):
        m(src, torch.tensor([[BOS, 3, PAD], [BOS, 4, 5]]), targets=torch.tensor([[3, 4, 5], [4, 5, 2]]))
    full = m(src, tgt)[0]
    alone = m(src[:1, :4], tgt[:1])[0]  # the first source without its pads
    torch.testing.assert_close(full[:1], alone, atol=1e-5, rtol=1e-5)
    assert full.shape == (2, 5, 23)


def test_transformer_attention_dropout_trains_through_sdpa():
    cfg = Seq2SeqTransformerConfig(
        src_vocab_size=20,
        tgt_vocab_size=20,
        n_layer=1,
        n_head=2,
        n_embd=16,
        ff_size=16,
        dropout=0.0,
        attention_dropout=0.5,
        max_len=12,
    )
    torch.manual_seed(0)
    m = Seq2SeqTransformer(cfg)
    src, tgt, y = _batch(20, 20, [5, 3], [4, 4])
    a = m(src, tgt)[0]
    b = m(src, tgt)[0]
    assert not torch.allclose(a, b)  # dropout on the weights is live in training
    m.eval()
    torch.testing.assert_close(m(src, tgt)[0], m(src, tgt)[0])


LSTM_CASES = [
    dict(attention="general"),
    dict(attention="dot", num_layers=1),
    dict(shared_embeddings=True, tie_output=True, n_embd=24),
]


@pytest.mark.parametrize("extra", LSTM_CASES, ids=["general-2layer", "dot-1layer", "shared-tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seq2seq_lstm_equals_reference(extra, dtype):
    V = 29
    kw = dict(src_vocab_size=V, tgt_vocab_size=V, n_embd=16, hidden_size=24, num_layers=2, dropout=0.0, max_len=16)
    kw.update(extra)
    cfg = Seq2SeqLSTMConfig(**kw)
    torch.manual_seed(0)
    ours = Seq2SeqLSTM(cfg).to(dtype)
    _perturb(ours)
    ref = reference.Seq2SeqLSTM(cfg).to(dtype)
    ref.load_state_dict(ours.state_dict())
    src, tgt, y = _batch(V, V, [6, 2, 4], [3, 5, 1])
    if dtype == torch.float32:
        _compare(ours, ref, src, tgt, y, 1e-5, 1e-4, 1e-5)
    else:
        _compare(ours, ref, src, tgt, y, 1e-10, 1e-8, 1e-10)


def test_seq2seq_lstm_gradcheck_float64():
    cfg = Seq2SeqLSTMConfig(
        src_vocab_size=11, tgt_vocab_size=11, n_embd=4, hidden_size=6, num_layers=1, dropout=0.0, max_len=8
    )
    torch.manual_seed(0)
    m = Seq2SeqLSTM(cfg).double()
    src, tgt, _ = _batch(11, 11, [4, 2], [3, 2])
    mem_in = m.src_embed(src).detach().requires_grad_(True)
    tgt_in = m.tgt_embed(tgt).detach().requires_grad_(True)

    def f(a, b):
        enc, _ = m.encoder(a, lengths=torch.tensor([4, 2]))
        out, _ = m.decoder(b)
        keys = m.attn_proj(enc)
        from ferrolm.kernels import attention

        pad = src == PAD
        return attention(out[:, None], keys[:, None], enc[:, None], key_padding_mask=pad, scale=1.0)

    assert torch.autograd.gradcheck(f, (mem_in, tgt_in), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bidirectional,causal", [(True, False), (False, True)])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_attention_lstm_equals_reference(bidirectional, causal, with_lengths):
    cfg = AttentionLSTMConfig(
        vocab_size=31,
        n_embd=16,
        n_head=4,
        hidden_size=12,
        num_layers=2,
        bidirectional=bidirectional,
        causal=causal,
        dropout=0.0,
        block_size=16,
    )
    torch.manual_seed(0)
    ours = AttentionLSTM(cfg)
    _perturb(ours)
    ref = reference.AttentionLSTM(cfg)
    ref.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 31, (3, 9))
    lengths = torch.tensor([9, 4, 6]) if with_lengths else None
    ho = ours.hidden_states(idx, lengths)
    hr = ref.hidden_states(idx, lengths)
    torch.testing.assert_close(ho, hr, atol=1e-5, rtol=1e-5)
    (ho**2).sum().backward()
    (hr**2).sum().backward()
    rp = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("head"):
            continue
        torch.testing.assert_close(p.grad, rp[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    if causal:
        y = torch.randint(0, 31, (3, 9))
        torch.testing.assert_close(ours(idx, targets=y)[1], ref(idx, targets=y)[1], atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="causal=True, bidirectional=False"):
            ours(idx, targets=torch.randint(0, 31, (3, 9)))


def test_attention_lstm_as_classifier_backbone():
    bc = AttentionLSTMConfig(vocab_size=31, n_embd=16, n_head=2, hidden_size=8, num_layers=1)
    cfg = ClassifierConfig(backbone=bc, num_classes=3, pooling="mean")
    torch.manual_seed(0)
    ours = SequenceClassifier(cfg)
    ref = reference.SequenceClassifier(cfg)
    ref.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 31, (4, 7))
    lengths = torch.tensor([7, 2, 5, 3])
    labels = torch.tensor([0, 2, 1, 1])
    lo, l1 = ours(idx, labels, lengths)
    ro, r1 = ref(idx, labels, lengths)
    assert lo.shape == (4, 3)
    torch.testing.assert_close(lo, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, r1, atol=1e-5, rtol=1e-5)
    same = SequenceClassifier.from_backbone(ours.backbone, num_classes=3, pooling="mean")
    assert same.backbone is ours.backbone


# --------------------------------------------------------------------------- decoding


def _models(V=23, max_len=24):
    torch.manual_seed(3)
    t = Seq2SeqTransformer(
        Seq2SeqTransformerConfig(
            src_vocab_size=V, tgt_vocab_size=V, n_layer=2, n_head=2, n_embd=16, ff_size=32, dropout=0.0, max_len=max_len
        )
    )
    lstm = Seq2SeqLSTM(
        Seq2SeqLSTMConfig(
            src_vocab_size=V, tgt_vocab_size=V, n_embd=12, hidden_size=16, num_layers=2, dropout=0.0, max_len=max_len
        )
    )
    for m in (t, lstm):
        _perturb(m, 5)
        with torch.no_grad():
            m.generator.weight.mul_(8.0)  # peaked distributions: continuations differ by source
    with torch.no_grad():
        lstm.src_embed.weight.mul_(20.0)
        lstm.tgt_embed.weight.mul_(20.0)
    return [t, lstm]


SOURCES = [[5, 6, 7, 8, 9, 10, 11], [3], [12, 13, 14], [20, 4, 4, 4, 21], [7, 7]]


@pytest.mark.parametrize("which", [0, 1], ids=["transformer", "lstm"])
def test_cached_greedy_equals_uncached(which):
    m = _models()[which]
    ours = greedy_decode(m, SOURCES, max_new_tokens=12, batch_size=2)
    plain = decode_uncached(m, SOURCES, max_new_tokens=12)
    assert ours == plain
    one_by_one = [greedy_decode(m, [s], max_new_tokens=12)[0] for s in SOURCES]
    assert ours == one_by_one
    assert len({tuple(o) for o in ours}) > 1  # not a degenerate constant output


@pytest.mark.parametrize("which", [0, 1], ids=["transformer", "lstm"])
def test_step_logits_equal_full_forward(which):
    m = _models()[which].eval()
    src = torch.tensor([[5, 6, 7, 8], [9, 3, PAD, PAD]])
    tgt = torch.tensor([[BOS, 4, 9, 11, 3], [BOS, 7, 7, 8, 12]])
    with torch.no_grad():
        full = m(src, tgt)[0]
        state = m.start(2, 8, m.encode(src))
        steps = torch.stack([m.logits(m.advance(state, tgt[:, t : t + 1]))[:, 0] for t in range(tgt.size(1))], 1)
        # The same tokens fed in one advance call.
        block = m.logits(m.advance(m.start(2, 8, m.encode(src)), tgt))
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", [0, 1], ids=["transformer", "lstm"])
def test_beam_one_equals_greedy(which):
    m = _models()[which]
    assert beam_search(m, SOURCES, beam_size=1, max_new_tokens=10) == greedy_decode(m, SOURCES, max_new_tokens=10)
    assert m.translate(SOURCES, max_new_tokens=10) == greedy_decode(m, SOURCES, max_new_tokens=10)


def _exhaustive(m, src, V, max_new, lp):
    """The best hypothesis by brute force: every sequence that ends in EOS within max_new
    tokens, or runs max_new tokens without one, scored sum log p / length ** lp."""
    m.eval()
    best, best_seq = -math.inf, None
    s = torch.tensor([src])
    for n in range(1, max_new + 1):
        for body in itertools.product(range(V), repeat=n):
            if EOS in body[:-1]:
                continue
            ended = body[-1] == EOS
            if not ended and n < max_new:
                continue
            with torch.no_grad():
                logits = m(s, torch.tensor([[BOS, *body[:-1]]]))[0].double()
            logp = torch.log_softmax(logits[0], -1)
            total = float(sum(logp[i, t] for i, t in enumerate(body)))
            score = total / n**lp
            if score > best:
                best, best_seq = score, list(body[:-1]) if ended else list(body)
    return best_seq


@pytest.mark.parametrize("which", [0, 1], ids=["transformer", "lstm"])
@pytest.mark.parametrize("lp", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_exhaustive_optimum(which, lp):
    V = 5
    m = _models(V=V)[which]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # flatter, source-dependent distributions: the greedy path is not the best
        m.generator.weight.copy_(torch.randn(m.generator.weight.shape, generator=g) * 0.5)
        m.generator.bias.zero_()
    srcs = [[3, 4, 3], [4], [3, 3, 3, 3]]
    best = [_exhaustive(m, s, V, 3, lp) for s in srcs]
    assert best != greedy_decode(m, srcs, max_new_tokens=3)  # the search has something to find
    assert beam_search(m, srcs, beam_size=V**3, max_new_tokens=3, length_penalty=lp) == best


def test_beam_search_batches_sources_of_different_lengths():
    m = _models()[0]
    together = beam_search(m, SOURCES, beam_size=3, max_new_tokens=8, batch_size=4)
    alone = [beam_search(m, [s], beam_size=3, max_new_tokens=8)[0] for s in SOURCES]
    assert together == alone


# --------------------------------------------------------------------------- checkpoints, bad input, training


def test_checkpoints_round_trip(tmp_path):
    for m in _models() + [AttentionLSTM(AttentionLSTMConfig(vocab_size=20, n_embd=8, n_head=2, hidden_size=6))]:
        path = tmp_path / f"{type(m).__name__}.safetensors"
        m.save(path)
        back = load_model(path)
        assert type(back) is type(m) and back.config == m.config
        for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    with pytest.raises(ValueError, match="not a Seq2SeqTransformer"):
        Seq2SeqTransformer.load(tmp_path / "Seq2SeqLSTM.safetensors")
    GPT_path = tmp_path / "gpt.safetensors"
    from ferrolm.models import GPTConfig

    GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8)).save(GPT_path)
    with pytest.raises(ValueError, match="holds a GPT"):
        Seq2SeqLSTM.load(GPT_path)


def test_bad_input_is_a_clear_error():
    t = _models(max_len=10)[0]
    with pytest.raises(ValueError, match="max_len=10"):
        greedy_decode(t, [[3] * 11])
    with pytest.raises(ValueError, match="source 1 is empty"):
        greedy_decode(t, [[3], []])
    with pytest.raises(ValueError, match="beam_size must be a positive int"):
        beam_search(t, [[3]], beam_size=0)
    with pytest.raises(ValueError, match="outside the source vocabulary"):
        greedy_decode(t, [[3, 99]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(t, [[3]], max_new_tokens=0)
    with pytest.raises(ValueError, match="out of range for vocab_size=23"):
        t(torch.tensor([[3, 4]]), torch.tensor([[BOS, 40]]))
    with pytest.raises(ValueError, match="source row 1 is empty"):
        t(torch.tensor([[3, 4], [PAD, PAD]]), torch.tensor([[BOS], [BOS]]))
    with pytest.raises(ValueError, match="more than max_len=10"):
        t(torch.full((1, 11), 3), torch.tensor([[BOS]]))
    with pytest.raises(ValueError, match="pair up"):
        t(torch.tensor([[3, 4]]), torch.tensor([[BOS], [BOS]]))
    with pytest.raises(ValueError, match="pad_id"):
        Seq2SeqTransformerConfig(pad_id=1, bos_id=1)
    with pytest.raises(ValueError, match="shared_embeddings needs one vocabulary"):
        Seq2SeqTransformerConfig(src_vocab_size=10, tgt_vocab_size=12, shared_embeddings=True)
    with pytest.raises(ValueError, match="target-vocabulary id"):
        Seq2SeqLSTMConfig(tgt_vocab_size=10, eos_id=10)
    with pytest.raises(ValueError, match="unknown Seq2SeqLSTMConfig keys"):
        Seq2SeqLSTMConfig.from_dict({"hidden": 3})


def test_short_training_lowers_loss():
    from ferrolm.training import TrainConfig, train

    rng = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(256):  # reverse a short sequence: needs the source, not just the target prefix
        n = int(torch.randint(2, 6, (1,), generator=rng))
        s = torch.randint(3, 12, (n,), generator=rng).tolist()
        pairs.append((s, s[::-1]))
    for m in _models(V=12):
        res = train(
            m,
            pairs,
            config=TrainConfig(max_steps=60, batch_size=32, lr=3e-3, warmup_steps=5, progress=False, weight_decay=0.0),
        )
        first = sum(h["loss"] for h in res.history[:5]) / 5
        last = sum(h["loss"] for h in res.history[-5:]) / 5
        assert last < first - 0.5, (type(m).__name__, first, last)


def test_attention_lstm_trains_as_a_language_model():
    from ferrolm.training import TrainConfig, train

    cfg = AttentionLSTMConfig(
        vocab_size=16, n_embd=32, n_head=4, hidden_size=32, bidirectional=False, causal=True, block_size=32
    )
    torch.manual_seed(0)
    m = AttentionLSTM(cfg)
    tokens = torch.arange(16).repeat(400)  # a fixed cycle: learnable in a few dozen steps
    res = train(
        m,
        tokens.numpy(),
        config=TrainConfig(max_steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, progress=False),
    )
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
