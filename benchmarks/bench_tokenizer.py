"""Tokenizer benchmarks: ferrolm vs tiktoken vs HF tokenizers (vs rustbpe for training), same
vocabulary, same text, same run. The workloads are ferrolm.bench's, shared with
``ferrolm bench``.

Targets on this 2-core machine (issue 2): encode on one thread >= 3x tiktoken and >= 8x HF,
long and short documents; encode_batch on 2 threads >= 3x tiktoken, 10,000 tiny strings
>= 10x; training a 32k vocabulary on >= 100 MB >= 4x HF's BpeTrainer and >= 2x rustbpe.
"""

from __future__ import annotations

import pytest

from conftest import FULL
from ferrolm import Tokenizer
from ferrolm.bench import find_data_dir, tokenizer_peers
from ferrolm.corpus import chinese_text, stdlib_texts

VOCABS = ["gpt2", "cl100k_base"] if find_data_dir() else ["trained32k"]
IMPLS = ["ferrolm", "tiktoken", "hf_tokenizers"]


@pytest.fixture(scope="module")
def texts(smoke):
    docs = stdlib_texts(500_000 if smoke else None if FULL else 6_000_000)
    long_docs = [d for d in docs if len(d.encode()) >= 4096][: 20 if smoke else None if FULL else 300]
    lines = [ln for d in docs[:400] for ln in d.splitlines() if 40 <= len(ln) <= 200]
    short = (lines + chinese_text().splitlines())[: 200 if smoke else 5000]
    words = [w for ln in lines for w in ln.split()]
    tiny = (words * (10_000 // max(1, len(words)) + 1))[:10_000]
    return {"long": long_docs, "short": short, "tiny": tiny}


_PEERS = {}


@pytest.fixture(scope="module", params=VOCABS)
def peers(request, tmp_path_factory):
    if request.param not in _PEERS:
        _PEERS[request.param] = tokenizer_peers(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, _PEERS[request.param]


def _encoder(impl, peers, batch):
    tok, tt, hf = peers
    if impl == "ferrolm":
        return (lambda docs: tok.encode_ordinary_batch(docs, num_threads=2)) if batch else tok.encode_ordinary
    if impl == "tiktoken":
        if tt is None:
            pytest.skip("tiktoken is not installed")
        return (lambda docs: tt.encode_ordinary_batch(docs, num_threads=2)) if batch else tt.encode_ordinary
    if hf is None:
        pytest.skip("tokenizers is not installed")
    return (lambda docs: hf.encode_batch(docs, add_special_tokens=False)) if batch else (lambda d: hf.encode(d, add_special_tokens=False))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["long", "short"])
def test_encode_one_thread(benchmark, peers, texts, impl, kind):
    vocab, p = peers
    enc = _encoder(impl, p, batch=False)
    docs = texts[kind]
    benchmark.group = f"{vocab}: encode {kind} docs, 1 thread ({len(docs)} docs)"
    benchmark(lambda: [enc(d) for d in docs])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["long", "tiny"])
def test_encode_batch_two_threads(benchmark, peers, texts, impl, kind):
    vocab, p = peers
    enc = _encoder(impl, p, batch=True)
    docs = texts[kind]
    benchmark.group = f"{vocab}: encode_batch {kind}, 2 threads ({len(docs)} texts)"
    benchmark(enc, docs)


@pytest.mark.parametrize("impl", ["ferrolm", "tiktoken"])
def test_worst_case_no_split_point(benchmark, peers, impl, smoke):
    """1 MB of one letter: one piece (tiktoken before 0.13 took minutes here)."""
    vocab, p = peers
    enc = _encoder(impl, p, batch=False)
    text = "x" * (100_000 if smoke else 1_000_000)
    benchmark.group = f"{vocab}: worst case, {len(text)} bytes with no split point"
    benchmark(enc, text)


@pytest.fixture(scope="module")
def training_data(smoke):
    docs = stdlib_texts()
    train = [chinese_text()] + docs[:-50]
    target = 2_000_000 if smoke else 100_000_000 if FULL else 20_000_000
    data, total = [], 0
    while total < target:
        for d in train:
            data.append(d)
            total += len(d.encode())
            if total >= target:
                break
    return data, total


@pytest.mark.parametrize("impl", ["ferrolm", "hf_tokenizers", "rustbpe"])
def test_train(benchmark, training_data, impl, smoke):
    data, total = training_data
    vocab_size = 2048 if smoke else 32_000
    benchmark.group = f"train {vocab_size} vocab on {total / 1e6:.0f} MB"
    if impl == "ferrolm":
        fn = lambda: Tokenizer.train(data, vocab_size, show_progress=False)  # noqa: E731
    elif impl == "hf_tokenizers":
        tokenizers = pytest.importorskip("tokenizers")
        from tokenizers import models, pre_tokenizers, trainers

        def fn():
            t = tokenizers.Tokenizer(models.BPE())
            t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            t.train_from_iterator(
                data, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            )
    else:
        rustbpe = pytest.importorskip("rustbpe")

        def fn():
            rustbpe.Tokenizer().train_from_iterator(iter(data), vocab_size)

    benchmark.pedantic(fn, rounds=1 if smoke else 3, iterations=1, warmup_rounds=0)
