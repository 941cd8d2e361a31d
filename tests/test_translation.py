"""The embedded translation task (number words against num2words, the held-out split), chrF
against sacrebleu, the seq2seq batches, and the translate/evaluate recipe."""

import random

import pytest

from ferrolm.metrics import corpus_chrf
from ferrolm.recipes.numwords import MAX_NUMBER, english, french
from ferrolm.recipes.translation import BLOCK, held_out_blocks, load_pairs, number_task

EDGES = [
    0,
    1,
    10,
    16,
    17,
    20,
    21,
    30,
    70,
    71,
    72,
    77,
    80,
    81,
    90,
    91,
    99,
    100,
    101,
    110,
    180,
    200,
    201,
    280,
    1000,
    1001,
    1080,
    2000,
    21000,
    71000,
    80000,
    80080,
    100000,
    180000,
    200000,
    200200,
    999999,
]


def _sample(n=4000, seed=0):
    rng = random.Random(seed)
    return EDGES + list(range(1000)) + [rng.randrange(MAX_NUMBER + 1) for _ in range(n)]


def test_french_equals_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in _sample():
        assert french(n) == num2words(n, lang="fr"), n


def test_english_equals_num2words_without_and_or_commas():
    num2words = pytest.importorskip("num2words").num2words
    for n in _sample(seed=1):
        assert english(n) == num2words(n, lang="en").replace(" and", "").replace(",", ""), n


def test_number_words_reject_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        french(MAX_NUMBER + 1)
    with pytest.raises(TypeError):
        english(3.0)


def test_split_holds_out_whole_blocks():
    task = number_task(n_train=20000, n_valid=500, n_test=1000)
    held = set(held_out_blocks())
    assert len(held) == 100 and 0 not in held
    # Recover each pair's number from the reference table to check which block it came from.
    table = {french(n): n for n in range(0, MAX_NUMBER + 1)}
    train_n = [table[t] for _, t in task.train]
    test_n = [table[t] for _, t in task.test]
    valid_n = [table[t] for _, t in task.valid]
    assert all(n // BLOCK in held for n in test_n)
    assert not any(n // BLOCK in held for n in train_n + valid_n)
    assert len(set(train_n) | set(valid_n)) == len(train_n) + len(valid_n)  # disjoint, no repeats
    assert [english(n) for n in test_n[:5]] == [s for s, _ in task.test[:5]]
    again = number_task(n_train=20000, n_valid=500, n_test=1000)
    assert again.train == task.train and again.test == task.test  # deterministic
    with pytest.raises(ValueError, match="unknown language"):
        number_task(source="de")


def test_chrf_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.metrics import CHRF

    rng = random.Random(0)
    words = "le chat, noir! est. sur (la) table? un deux trois quatre-vingts cent mille 語境 学习".split()
    for _ in range(40):
        n = rng.randint(1, 8)
        hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(n)]
        refs = [
            [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(n)]
            for _ in range(rng.randint(1, 2))
        ]
        for kw in (dict(), dict(word_order=2), dict(lowercase=True), dict(whitespace=True)):
            assert corpus_chrf(hyps, refs, **kw) == pytest.approx(CHRF(**kw).corpus_score(hyps, refs).score, abs=1e-9)
    assert sacrebleu is not None
    with pytest.raises(ValueError, match="one string per hypothesis"):
        corpus_chrf(["a", "b"], [["a"]])


def test_load_pairs_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("one\tun\n\ntwo\tdeux\n", encoding="utf-8")
    assert load_pairs(tsv) == [("one", "un"), ("two", "deux")]
    js = tmp_path / "p.jsonl"
    js.write_text('{"source": "three", "target": "trois"}\n{"src": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="p.jsonl:2"):
        load_pairs(js)
    bad = tmp_path / "b.tsv"
    bad.write_text("a\tb\tc\n", encoding="utf-8")
    with pytest.raises(ValueError, match="b.tsv:1: expected two tab-separated columns"):
        load_pairs(bad)


def test_seq2seq_batches_layout_and_resume():
    torch = pytest.importorskip("torch")
    from ferrolm.training import Seq2SeqBatches

    pairs = [([5 + i % 7] * (1 + i % 4), [9] * (1 + i % 3)) for i in range(40)]
    b = Seq2SeqBatches(pairs, batch_size=8, pad_id=0, bos_id=1, eos_id=2, seed=3)
    (src, tgt_in), y = b.next()
    for r in range(8):
        s_len = int((src[r] != 0).sum())
        t_len = int((y[r] != -100).sum())
        assert s_len >= 1 and tgt_in[r, 0] == 1 and y[r, t_len - 1] == 2
        assert torch.equal(tgt_in[r, 1:t_len], y[r, : t_len - 1])  # teacher forcing: shifted by one
        assert bool((tgt_in[r, t_len:] == 0).all())
    state = b.state_dict()
    want = b.next()
    c = Seq2SeqBatches(pairs, batch_size=8, pad_id=0, bos_id=1, eos_id=2, seed=3)
    c.load_state_dict(state)
    got = c.next()
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="pad_id=0"):
        Seq2SeqBatches([([0, 3], [4])] * 8, batch_size=8, pad_id=0, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="max_len=3"):
        Seq2SeqBatches([([3, 3, 3, 3], [4])] * 8, batch_size=8, pad_id=0, bos_id=1, eos_id=2, max_len=3)


def test_translate_and_evaluate_recipe_end_to_end():
    torch = pytest.importorskip("torch")
    from ferrolm.models import Seq2SeqTransformer, Seq2SeqTransformerConfig
    from ferrolm.recipes.translation import (
        encode_pairs,
        evaluate_translation,
        special_ids,
        train_tokenizer,
        translate_texts,
    )
    from ferrolm.training import TrainConfig, train

    task = number_task(n_train=3000, n_valid=50, n_test=40)
    tok = train_tokenizer(task.train, vocab_size=400)
    ids = special_ids(tok)
    cfg = Seq2SeqTransformerConfig(
        src_vocab_size=tok.n_vocab,
        tgt_vocab_size=tok.n_vocab,
        n_layer=1,
        n_head=2,
        n_embd=32,
        ff_size=64,
        dropout=0.0,
        max_len=48,
        shared_embeddings=True,
        **ids,
    )
    torch.manual_seed(0)
    m = Seq2SeqTransformer(cfg)
    res = train(
        m,
        encode_pairs(tok, task.train),
        config=TrainConfig(max_steps=40, batch_size=32, lr=3e-3, warmup_steps=5, progress=False),
    )
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 1.0
    out = evaluate_translation(m, tok, task.test[:20])
    hyps = translate_texts(m, tok, [s for s, _ in task.test[:20]])
    from ferrolm.metrics import corpus_bleu

    assert out["bleu"] == pytest.approx(corpus_bleu(hyps, [[t for _, t in task.test[:20]]]))
    assert 0.0 <= out["exact_match"] <= 1.0 and out["n"] == 20
    with pytest.raises(ValueError, match="text 0 is empty"):
        translate_texts(m, tok, [""])
    small = train_tokenizer(task.train[:50], vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer"):
        translate_texts(m, small, ["one"])


def test_train_seq2seq_rejects_a_tokenizer_without_its_special_tokens():
    pytest.importorskip("torch")
    from ferrolm import Tokenizer
    from ferrolm.recipes.translation import train_seq2seq

    task = number_task(n_train=200, n_valid=0, n_test=10)
    plain = Tokenizer.train([s for s, _ in task.train], vocab_size=300)
    with pytest.raises(ValueError, match="special tokens"):
        train_seq2seq("transformer", task, tokenizer=plain, steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="unknown seq2seq model"):
        train_seq2seq("rnn", task, steps=1)
