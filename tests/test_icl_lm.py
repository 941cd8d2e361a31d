"""ICL scoring requests: log-likelihoods against transformers' own log-probs, the cached
(shared-prefix) path against full forwards, batch-size invariance, rolling windows."""

from __future__ import annotations

import functools
import math

import pytest

torch = pytest.importorskip("torch")

from ferrolm.decoding import generate  # noqa: E402
from ferrolm.icl import LM  # noqa: E402
from ferrolm.models import GPT, GPTConfig, Llama, LlamaConfig, LSTMConfig, LSTMLanguageModel  # noqa: E402


def _requests(seed=0, vocab=90, n_ctx=4, choices=4):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for q in range(n_ctx):
        ctx = torch.randint(0, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        for c in range(choices):
            cont = torch.randint(0, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
            reqs.append((ctx, cont))
    return reqs


@pytest.fixture(scope="module")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=90, n_positions=40, n_embd=32, n_layer=2, n_head=4)
    ).eval()
    return hf, GPT.from_hf_gpt2(hf).eval()


def _direct(hf, ctx, cont):
    """log P(cont | ctx) computed the plain way from transformers' logits, in float64."""
    ids = torch.tensor([ctx + cont[:-1]])  # the last token is only predicted
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits.double(), -1)[0]
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_loglikelihood_equals_transformers_logprobs(hf_pair):
    hf, ours = hf_pair
    reqs = _requests()
    for lm in (LM(ours), LM(hf)):
        for reuse in (True, False):
            got = lm.loglikelihood(reqs, reuse_prefix=reuse)
            for (ctx, cont), r in zip(reqs, got):
                assert r.n_tokens == len(cont)
                assert r.logprob == pytest.approx(_direct(hf, ctx, cont), rel=1e-4, abs=1e-4)


MODELS = [
    pytest.param(lambda: GPT(GPTConfig(vocab_size=90, block_size=40, n_layer=2, n_head=4, n_embd=32)), id="gpt"),
    pytest.param(
        lambda: GPT(
            GPTConfig(vocab_size=90, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, positions="rotary")
        ),
        id="gpt-rope-gqa",
    ),
    pytest.param(
        lambda: Llama(
            LlamaConfig(vocab_size=90, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ff_size=48)
        ),
        id="llama",
    ),
    pytest.param(
        lambda: LSTMLanguageModel(LSTMConfig(vocab_size=90, n_embd=16, hidden_size=24, num_layers=2)), id="lstm"
    ),
    pytest.param(lambda: LSTMLanguageModel(LSTMConfig(vocab_size=90, n_embd=16, hidden_size=24, cell="gru")), id="gru"),
]


@pytest.mark.parametrize("make", MODELS)
def test_shared_prefix_scores_equal_full_forwards_at_any_batch_size(make):
    torch.manual_seed(4)
    model = make().eval()
    reqs = _requests(seed=1)
    want = LM(model, batch_size=1).loglikelihood(reqs, reuse_prefix=False)
    for bs in (1, 8, 32):
        for reuse in (True, False):
            got = LM(model, batch_size=bs).loglikelihood(reqs, reuse_prefix=reuse)
            for a, b in zip(got, want):
                assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-5)
                assert a.is_greedy == b.is_greedy and a.n_tokens == b.n_tokens


def test_context_longer_than_the_window_is_cut_from_the_left(hf_pair):
    hf, ours = hf_pair
    ctx, cont = list(range(1, 60)), [5, 6, 7]
    for reuse in (True, False):
        r = LM(ours).loglikelihood([(ctx, cont)], reuse_prefix=reuse)[0]
        assert r.truncated
        # The model's input is the context and every continuation token but the last (as lm-eval cuts it).
        assert r.logprob == pytest.approx(_direct(hf, ctx[-38:], cont), rel=1e-4, abs=1e-4)


def test_is_greedy_marks_the_models_own_continuation():
    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=90, block_size=40, n_layer=2, n_head=4, n_embd=32, tie_weights=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    ctx = [3, 1, 4, 1, 5]
    cont = generate(model, ctx, 4, temperature=0)[0]
    other = cont[:-1] + [(cont[-1] + 1) % 90]
    got = LM(model).loglikelihood([(ctx, cont), (ctx, other)])
    assert got[0].is_greedy and not got[1].is_greedy
    assert got[0].logprob > got[1].logprob


def test_rolling_loglikelihood_scores_every_token_once(hf_pair):
    hf, ours = hf_pair
    g = torch.Generator().manual_seed(6)
    short = torch.randint(0, 90, (30,), generator=g).tolist()
    r = LM(ours).loglikelihood_rolling(short)
    assert r.n_tokens == 29
    assert r.logprob == pytest.approx(sum(_direct(hf, short[:i], [short[i]]) for i in range(1, 30)), rel=1e-4)
    # Longer than the window (40): windows of 39 predictions, each with its own context.
    long = torch.randint(0, 90, (100,), generator=g).tolist()
    for stride in (None, 10):
        r = LM(ours).loglikelihood_rolling(long, stride=stride)
        step = 39 if stride is None else stride
        want, scored = 0.0, 1
        while scored < 100:
            end = min(100, scored + step)
            start = max(0, end - 40)
            want += sum(_direct(hf, long[start:i], [long[i]]) for i in range(scored, end))
            scored = end
        assert r.n_tokens == 99
        assert r.logprob == pytest.approx(want, rel=1e-4)
        assert math.exp(-r.logprob / r.n_tokens) > 1


def test_request_errors(hf_pair):
    _, ours = hf_pair
    lm = LM(ours)
    with pytest.raises(ValueError, match="context is empty"):
        lm.loglikelihood([([], [1])])
    with pytest.raises(ValueError, match="continuation is empty"):
        lm.loglikelihood([([1], [])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.loglikelihood([([1], [90])])
    with pytest.raises(ValueError, match="does not fit the window"):
        lm.loglikelihood([([1], list(range(41)))])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lm.loglikelihood_rolling([1])
    with pytest.raises(TypeError, match="int token ids"):
        lm.loglikelihood([("abc", [1])])


def test_generate_until_stops_at_strings_and_matches_transformers(hf_pair):
    from ferrolm import Tokenizer

    hf, ours = hf_pair
    # Byte ids: the model's 90 ids decode to bytes 0..89; "\x02" and "\x0c" occur in its
    # greedy continuations of the first and third prompts.
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})
    reqs = [([5, 6, 7, 8], ["\x02", "zz"], 12), ([1, 2], [], 6), ([40] * 50, ["\x0c"], 5)]
    got = LM(ours, batch_size=2).generate_until(reqs, tok)
    eot = 256
    cuts = 0
    for (ctx, stops, n), text in zip(reqs, got):
        ctx = ctx[-(40 - n) :]
        ids = [t for t in generate(ours, ctx, n, temperature=0, stop_ids=[eot])[0] if t != eot]
        full = tok.decode(ids)
        cut = min((full.find(s) for s in stops if s in full), default=-1)
        assert text == (full[:cut] if cut >= 0 else full)
        assert not any(s in text for s in stops)
        cuts += cut >= 0
    assert cuts == 2, "the stop strings must actually end two of the continuations"
    assert LM(hf, batch_size=2).generate_until(reqs, tok) == got
    with pytest.raises(ValueError, match="max_tokens"):
        LM(ours).generate_until([([1], [], 0)], tok)


@pytest.mark.parametrize("make", MODELS)
def test_a_prefix_shared_by_all_contexts_runs_once_and_scores_the_same(make, monkeypatch):
    torch.manual_seed(8)
    model = make().eval()
    g = torch.Generator().manual_seed(9)
    demos = torch.randint(0, 90, (24,), generator=g).tolist()
    reqs = [(demos, [3, 4])]  # a context equal to the shared prefix itself
    for q in range(5):
        query = torch.randint(0, 90, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        reqs += [
            (demos + query, torch.randint(0, 90, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
            for _ in range(3)
        ]
    lm = LM(model, batch_size=4)
    calls = []
    original = LM._prefix_batch

    def spy(self, ctxs, room, base=None):
        calls.append(([len(c) for c in ctxs], base[0] if base else 0))
        return original(self, ctxs, room, base)

    monkeypatch.setattr(LM, "_prefix_batch", spy)
    got = lm.loglikelihood(reqs)
    # The shared prefix (23 tokens: one short of the context that equals the demonstrations,
    # so every context keeps a token of its own) runs once; then the 6 distinct contexts run
    # after it in batches of at most 4, each once.
    assert calls[0] == ([23], 0)
    assert all(done == 23 for _, done in calls[1:])
    assert sorted(n for lens, _ in calls[1:] for n in lens) == sorted(len(c) for c in {tuple(c) for c, _ in reqs})
    assert len(calls) == 1 + 2 and all(len(lens) <= 4 for lens, _ in calls)
    want = lm.loglikelihood(reqs, reuse_prefix=False)
    for a, b in zip(got, want):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-5) and a.is_greedy == b.is_greedy


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_transformers_models_reuse_the_context_cache_too(hf_pair, which, monkeypatch, hf_llama):
    """Contexts of different lengths batched with right padding, then their continuations as one
    block at their own positions: the same scores as one full forward per request, at every
    batch size, in fewer forwards than one per context."""
    hf = hf_pair[0] if which == "gpt2" else hf_llama(vocab_size=90, seed=7)
    reqs = _requests(seed=2, n_ctx=6)
    lm = LM(hf, batch_size=3)
    assert lm._hf_cache_ok(), "this transformers version should offer a copyable KV cache"
    want = [_direct(hf, ctx, cont) for ctx, cont in reqs]
    calls = []
    real = type(hf).forward

    @functools.wraps(real)  # keeps the signature (position_ids) the LM looks for
    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(type(hf), "forward", counted)
    for bs in (1, 3, 16):
        lm = LM(hf, batch_size=bs)
        lm._hf_cache_ok()  # its one-token probe forward, before counting
        calls.clear()
        got = lm.loglikelihood(reqs)
        for a, b in zip(got, want):
            assert a.logprob == pytest.approx(b, rel=1e-5, abs=1e-5)
        if bs == 16:  # one batch of the 6 contexts, one block of their continuations
            assert len(calls) == 2
    plain = LM(hf, batch_size=1).loglikelihood(reqs, reuse_prefix=False)
    assert [a.is_greedy for a in got] == [b.is_greedy for b in plain]


def test_multiple_choice_picks_the_choice_transformers_scores_highest(hf_pair):
    hf, ours = hf_pair
    g = torch.Generator().manual_seed(12)
    questions = []
    for _ in range(6):
        ctx = torch.randint(0, 90, (int(torch.randint(3, 15, (1,), generator=g)),), generator=g).tolist()
        choices = [
            torch.randint(0, 90, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist() for _ in range(4)
        ]
        questions.append((ctx, choices))
    for normalise in (False, True):
        got = LM(ours, batch_size=3).multiple_choice(questions, normalise=normalise)
        for (ctx, choices), (best, scores) in zip(questions, got):
            direct = [_direct(hf, ctx, c) / (len(c) if normalise else 1) for c in choices]
            assert best == max(range(4), key=lambda j: direct[j])
            assert [s.n_tokens for s in scores] == [len(c) for c in choices]
    with pytest.raises(ValueError, match="question 1: the choice list is empty"):
        LM(ours).multiple_choice([([1, 2], [[3]]), ([1, 2], [])])
