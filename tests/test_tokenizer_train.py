"""Training: determinism, an independent reference implementation, inputs, HF's trainer."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from ferrolm import GPT2_PATTERN, Tokenizer
from ferrolm.corpus import chinese_text, stdlib_texts


def reference_bpe(docs, vocab_size, min_frequency, pattern):
    """Textbook BPE in pure Python: recount all pairs after every merge; ties to the smaller
    (left, right) id pair. Pre-tokenization by the `regex` module (a third engine)."""
    import regex

    words = collections.Counter()
    for d in docs:
        for m in regex.finditer(pattern, d):
            words[m.group()] += 1
    ws = [[list(w.encode()), c] for w, c in words.items()]
    merges = []
    while 256 + len(merges) < vocab_size:
        counts = collections.Counter()
        for w, c in ws:
            for p in zip(w, w[1:]):
                counts[p] += c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < min_frequency:
            break
        new = 256 + len(merges)
        merges.append(best)
        for item in ws:
            w, out, i = item[0], [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            item[0] = out
    return merges


def test_matches_reference_implementation():
    pytest.importorskip("regex")
    docs = [chinese_text()] + stdlib_texts(max_bytes=60_000)
    ours = Tokenizer.train(docs, vocab_size=256 + 120, min_frequency=2)
    assert ours.merges() == reference_bpe(docs, 256 + 120, 2, GPT2_PATTERN)


def test_min_frequency_stops_training():
    pytest.importorskip("regex")
    docs = ["aaab abab aaab", "zzzz qq"]
    tok = Tokenizer.train(docs, vocab_size=1000, min_frequency=2)
    expect = reference_bpe(docs, 1000, 2, GPT2_PATTERN)
    assert tok.merges() == expect
    assert tok.vocab_size == 256 + len(expect) < 1000


def test_deterministic_across_threads_and_inputs(tmp_path):
    docs = stdlib_texts(max_bytes=1_500_000)
    a = Tokenizer.train(docs, vocab_size=1024, num_threads=1)
    b = Tokenizer.train(docs, vocab_size=1024, num_threads=2)
    c = Tokenizer.train(iter(docs), vocab_size=1024)
    paths = []
    for i, d in enumerate(docs):
        p = tmp_path / f"{i}.txt"
        p.write_text(d, encoding="utf-8")
        paths.append(Path(p))
    d = Tokenizer.train(paths, vocab_size=1024)
    assert a.merges() == b.merges() == c.merges() == d.merges()
    assert a.to_hf_json() == b.to_hf_json()


def test_special_tokens_and_ids():
    tok = Tokenizer.train(["hello world"] * 10, vocab_size=266, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert tok.vocab_size == 266
    assert tok.special_tokens == {"<|endoftext|>": 264, "<|pad|>": 265}
    assert tok.encode("hello<|pad|>", allowed_special="all")[-1] == 265
    assert [tok.decode_single_token_bytes(i) for i in range(3)] == [b"\x00", b"\x01", b"\x02"]


def test_custom_pattern_round_trip():
    tok = Tokenizer.train(["ab ab ab cd cd"] * 5, vocab_size=260, pattern=r"\S+|\s+")
    assert tok.pre_tokenize("ab  cd") == ["ab", "  ", "cd"]
    assert tok.decode(tok.encode("ab  cd")) == "ab  cd"


def test_bytes_per_token_close_to_hf_trainer():
    """Trained on the same 2 MB, ferrolm and HF's BpeTrainer compress held-out text alike."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    docs = [chinese_text()] + stdlib_texts(max_bytes=3_000_000)
    train, held = docs[:-60], docs[-60:]
    ours = Tokenizer.train(train, vocab_size=4096)
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        train,
        trainers.BpeTrainer(
            vocab_size=4096, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    nbytes = sum(len(d.encode()) for d in held)
    ours_bpt = nbytes / sum(len(x) for x in ours.encode_ordinary_batch(held))
    hf_bpt = nbytes / sum(len(e.ids) for e in hf.encode_batch(held))
    assert abs(ours_bpt / hf_bpt - 1) < 0.01, (ours_bpt, hf_bpt)
