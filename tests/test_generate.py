"""Generation: greedy equals the argmax of full forwards exactly, batched ragged prompts equal
one-by-one runs, transformers' greedy generate on the same GPT-2 weights, seeded sampling."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ferrolm.decoding import generate, sample_next  # noqa: E402
from ferrolm.models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel  # noqa: E402


def _gpt(positions="learned", **kw):
    torch.manual_seed(10)
    cfg = dict(vocab_size=53, block_size=40, n_layer=2, n_head=4, n_embd=32, positions=positions, tie_weights=False)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # sharper logits: no near-ties, and continuations that do not repeat one token
        model.lm_head.weight.mul_(30)
    return model


def _lstm(cell="lstm"):
    torch.manual_seed(11)
    model = LSTMLanguageModel(LSTMConfig(vocab_size=53, n_embd=16, hidden_size=24, num_layers=2, cell=cell)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(10)
        model.head.weight.mul_(20)
        for p in model.rnn.parameters():
            p.mul_(4)
    return model


def _greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


MODELS = [
    pytest.param(lambda: _gpt("learned"), id="gpt-learned"),
    pytest.param(lambda: _gpt("rotary", n_kv_head=2), id="gpt-rotary-gqa"),
    pytest.param(lambda: _gpt("sinusoidal"), id="gpt-sinusoidal"),
    pytest.param(lambda: _lstm("lstm"), id="lstm"),
    pytest.param(lambda: _lstm("gru"), id="gru"),
]


@pytest.mark.parametrize("make", MODELS)
def test_greedy_equals_argmax_of_full_forward(make):
    model = make()
    prompts = [[5, 9, 1, 33, 2, 7, 7], [4], [12, 40, 3]]
    got = generate(model, prompts, max_new_tokens=12, temperature=0)
    assert len({t for g in got for t in g}) > 4, f"degenerate test model: {got}"
    for p, g in zip(prompts, got):
        assert g == _greedy_by_full_forward(model, p, 12)
    # One at a time gives the same as the ragged batch.
    for p, g in zip(prompts, got):
        assert generate(model, [p], max_new_tokens=12, temperature=0)[0] == g


@pytest.mark.parametrize("make", MODELS[:2])
def test_left_padded_tensor_with_mask_equals_lists(make):
    model = make()
    prompts = [[5, 9, 1, 33], [4, 8]]
    idx = torch.tensor([[5, 9, 1, 33], [0, 0, 4, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert generate(model, idx, 6, temperature=0, attention_mask=mask) == generate(model, prompts, 6, temperature=0)


def test_matches_transformers_greedy_generate():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(12)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=101,
            n_positions=64,
            n_embd=48,
            n_layer=2,
            n_head=4,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(30)
    ours = GPT.from_hf_gpt2(hf)
    prompt = [3, 14, 15, 92, 65]
    want = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        attention_mask=torch.ones(1, 5, dtype=torch.long),
    )[0, 5:].tolist()
    got = generate(ours, prompt, 20, temperature=0)[0]
    assert len(set(got)) > 3, "degenerate test: the continuation repeats one token"
    assert got == want


def test_sampling_is_seeded_and_filters_apply():
    model = _gpt()
    a = generate(model, [[1, 2, 3]] * 3, 15, temperature=1.0, seed=7)
    b = generate(model, [[1, 2, 3]] * 3, 15, temperature=1.0, seed=7)
    assert a == b
    assert a != generate(model, [[1, 2, 3]] * 3, 15, temperature=1.0, seed=8)
    assert generate(model, [[1, 2, 3]], 10, top_k=1, seed=3) == generate(model, [[1, 2, 3]], 10, temperature=0)
    assert generate(model, [[1, 2, 3]], 10, top_p=1e-6, seed=3) == generate(model, [[1, 2, 3]], 10, temperature=0)


def test_sample_next_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits.expand(1000, 4), 1.0, generator=gen) for _ in range(10)]).flatten()
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.02, rtol=0)
    # top_p=0.7 keeps {0, 1} (0.5 + 0.3 reaches 0.7), renormalised to 5/8, 3/8.
    draws = torch.stack(
        [sample_next(logits.expand(1000, 4), 1.0, top_p=0.7, generator=gen) for _ in range(10)]
    ).flatten()
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=0.02, rtol=0)
    draws = sample_next(logits.expand(5000, 4), 1.0, top_k=2, generator=gen)
    assert set(draws.tolist()) == {0, 1}


def test_stop_ids_end_each_row():
    model = _gpt()
    free = generate(model, [[1, 2, 3], [9, 8]], 12, temperature=0)
    stop = free[0][4]
    got = generate(model, [[1, 2, 3], [9, 8]], 12, temperature=0, stop_ids=[stop])
    assert got[0] == free[0][: free[0].index(stop) + 1]
    row1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert got[1] == row1


def test_generate_errors():
    model = _gpt()
    with pytest.raises(ValueError, match="exceeds block_size=40"):
        generate(model, [list(range(30))], 11)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 53]], 2)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], -1)
    with pytest.raises(TypeError, match="GPT or LSTMLanguageModel"):
        generate(torch.nn.Linear(2, 2), [[1]], 2)
    assert generate(model, [[1]], 0) == [[]]


def test_truncate_drops_the_oldest_prompt_tokens():
    model = _gpt()  # block_size 40
    long = [int(t) % 50 for t in range(3, 3 + 45)]
    with pytest.raises(ValueError, match="truncate=True"):
        generate(model, [long], 5, temperature=0)
    got = generate(model, [long, [4, 5]], 5, temperature=0, truncate=True)
    # the same as the prompt's last 35 tokens given by hand; the short prompt is untouched
    assert got[0] == generate(model, [long[-35:]], 5, temperature=0)[0] == _greedy_by_full_forward(model, long[-35:], 5)
    assert got[1] == generate(model, [[4, 5]], 5, temperature=0)[0]
    with pytest.raises(ValueError, match="no room"):
        generate(model, [long], 40, temperature=0, truncate=True)
