"""String requests in :class:`ferrolm.icl.LM`: lm-evaluation-harness's encoding of causal
requests, ``(logprob, is_greedy)`` results, and continuations of several contexts scored in one
pass (a Llama and a GPT against full forwards)."""

from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")

from ferrolm import Tokenizer  # noqa: E402
from ferrolm.icl import LM, LogLikelihood  # noqa: E402
from ferrolm.models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402

TEXTS = ["The capital of France is Paris. The capital of Spain is Madrid."] * 3 + [
    "one two three four five six seven eight nine ten",
    "Q: what is two plus two?\nA: four\n\nQ: what is one plus one?\nA: two",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, 300, special_tokens=["<|endoftext|>"])


def _llama(vocab: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    m = Llama(LlamaConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ff_size=48))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def test_string_requests_encode_as_lm_eval_does(tok):
    lm = LM(_llama(tok.n_vocab), tok)
    # Trailing whitespace of the context moves to the continuation; the pair is encoded as one
    # text and the continuation is what follows the context's own ids.
    ctx, cont = lm.encode_pair("The capital of France is ", "Paris")
    assert ctx == tok.encode_ordinary("The capital of France is")
    assert cont == tok.encode_ordinary("The capital of France is Paris")[len(ctx) :]
    assert lm.encode_pair("Q: two plus two?\nA:", " four") == (
        tok.encode_ordinary("Q: two plus two?\nA:"),
        tok.encode_ordinary("Q: two plus two?\nA: four")[len(tok.encode_ordinary("Q: two plus two?\nA:")) :],
    )
    # An empty context is the prefix token: bos, else eos, else <|endoftext|>.
    assert lm.encode_pair("", "Paris") == ([tok.eot_token], tok.encode_ordinary("Paris"))
    assert LM(lm.model, tok, prefix_token_id=7).encode_pair("", "x")[0] == [7]
    # Special-token texts become their tokens, as transformers' encode(add_special_tokens=False).
    assert lm.encode("a<|endoftext|>") == tok.encode_ordinary("a") + [tok.eot_token]


def test_string_requests_score_as_their_ids(tok):
    lm = LM(_llama(tok.n_vocab), tok)
    reqs = [("The capital of France is", " Paris"), ("The capital of France is ", "Madrid"), ("", "one two")]
    got = lm.loglikelihood(reqs)
    want = lm.loglikelihood([lm.encode_pair(c, x) for c, x in reqs], reuse_prefix=False)
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4) and g.is_greedy == w.is_greedy
    # The results are (logprob, is_greedy) pairs, as lm-eval's loglikelihood returns.
    lp, greedy = got[0]
    assert (lp, greedy) == tuple(got[0]) and isinstance(greedy, bool) and len(got[0]) == 2
    assert got[0].n_tokens == len(lm.encode_pair(*reqs[0])[1]) and not got[0].truncated
    # multiple_choice and generate_until take strings too.
    best, scores = lm.multiple_choice([("The capital of France is", [" Paris", " Madrid"])])[0]
    assert best == max(range(2), key=lambda j: scores[j].logprob)
    assert isinstance(lm.generate_until([("The capital of", ["."], 3)])[0], str)
    r = lm.loglikelihood_rolling("one two three")
    assert r.n_tokens == len(tok.encode_ordinary("one two three"))


def test_loglikelihood_result_is_a_pair_with_attributes():
    r = LogLikelihood(-3.0, 2, False, truncated=True)
    assert r == (-3.0, False) and r.mean_logprob == -1.5 and r.truncated and r.n_tokens == 2
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.n_tokens == 2 and back.truncated
    assert "n_tokens=2" in repr(r)


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_continuations_of_several_contexts_run_together_and_score_as_full_forwards(arch, monkeypatch):
    torch.manual_seed(1)
    if arch == "llama":
        model = _llama(90, seed=2)
    else:
        model = GPT(GPTConfig(vocab_size=90, block_size=64, n_layer=2, n_head=4, n_embd=32, positions="rotary")).eval()
    g = torch.Generator().manual_seed(3)
    reqs = []
    for q in range(6):  # contexts of different lengths, continuations of 1 to 3 tokens
        ctx = torch.randint(0, 90, (3 + 4 * q,), generator=g).tolist()
        reqs += [(ctx, torch.randint(0, 90, (1 + (c + q) % 3,), generator=g).tolist()) for c in range(4)]
    want = LM(model, batch_size=1).loglikelihood(reqs, reuse_prefix=False)
    passes = []
    real = LM._continue_rows

    def spy(self, state, rows, conts):
        passes.append(len(conts))
        return real(self, state, rows, conts)

    monkeypatch.setattr(LM, "_continue_rows", spy)
    for bs in (1, 5, 32):
        passes.clear()
        got = LM(model, batch_size=bs).loglikelihood(reqs)
        for g_, w in zip(got, want):
            assert g_.logprob == pytest.approx(w.logprob, abs=1e-4) and g_.is_greedy == w.is_greedy
        if bs == 32:  # one prefill batch: its multi-token continuations of all 6 contexts in one pass
            assert passes == [sum(len(c) > 1 for _, c in reqs)]


def test_bad_requests_say_what_to_give(tok):
    lm = LM(_llama(tok.n_vocab), tok)
    with pytest.raises(TypeError, match=r"\(context, continuation\) pairs"):
        lm.loglikelihood(["just a string"])
    with pytest.raises(TypeError, match="both as str"):
        lm.loglikelihood([("text", [1, 2])])
    with pytest.raises(TypeError, match="needs the model's tokenizer"):
        LM(lm.model).loglikelihood([("a", "b")])
    with pytest.raises(TypeError, match="max_length="):
        LM(lm.model, 32)
