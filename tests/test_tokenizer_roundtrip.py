"""Any Unicode text round-trips, on real and trained vocabularies (property tests)."""

from __future__ import annotations

import pickle

import pytest
from conftest import ADVERSARIAL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrolm import Tokenizer

# Every code point but surrogates (a Python str may hold them; they are tested separately).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
WHITESPACE_HEAVY = st.text(st.sampled_from(list(" \t\n\r\u3000\u00a0\u0085ab'sS1中👍!")), max_size=60)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(TEXT)
def test_trained_round_trip(trained, text):
    ids = trained.encode_ordinary(text)
    assert trained.decode(ids) == text
    assert "".join(trained.pre_tokenize(text)) == text
    assert all(0 <= i < trained.n_vocab for i in ids)


@pytest.mark.parametrize("which", ["gpt2_pair", "cl100k_pair"])
@PROPERTY
@given(text=st.one_of(TEXT, WHITESPACE_HEAVY))
def test_real_vocab_round_trip_and_parity(request, which, text):
    tok, enc = request.getfixturevalue(which)
    ids = tok.encode_ordinary(text)
    assert ids == enc.encode_ordinary(text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_round_trip(trained, text):
    assert trained.decode(trained.encode(text, allowed_special="all")) == text
    assert trained.decode_bytes(trained.encode_ordinary(text)) == text.encode("utf-8")


def test_lone_surrogates_become_replacement_chars(trained):
    text = "a\ud800b"
    ids = trained.encode(text)
    assert trained.decode(ids) == "a\ufffdb"
    assert trained.encode_batch([text, "x"]) == [ids, trained.encode("x")]


def test_partial_utf8_follows_errors(cl100k_pair):
    tok, _ = cl100k_pair
    ids = tok.encode("👍")
    assert len(ids) == 3
    assert tok.decode(ids[:2]) == "\ufffd"
    assert tok.decode(ids[:2], errors="ignore") == ""
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids[:2], errors="strict")


def test_linear_worst_case_is_exact(gpt2_pair):
    """A long piece with no split point (tiktoken <0.13 went quadratic) encodes exactly; the
    timing lives in benchmarks/bench_tokenizer.py."""
    tok, enc = gpt2_pair
    text = "x" * 1_000_000
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert ids == enc.encode_ordinary(text)
    sym = "\u2603" * 17_000  # ~50 KB of one 3-byte symbol
    assert tok.encode_ordinary(sym) == enc.encode_ordinary(sym)


def test_pickle_round_trip(trained, gpt2_pair):
    for tok in (trained, gpt2_pair[0]):
        back = pickle.loads(pickle.dumps(tok))
        assert back.merge_rule == tok.merge_rule
        assert back.special_tokens == tok.special_tokens
        text = "pickled tokenizers <|endoftext|> keep their ids 12345"
        assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_vocab_lookups(trained):
    tok: Tokenizer = trained
    for i in [0, 65, 255, 256, 1000, tok.vocab_size - 3]:
        t = tok.id_to_token(i)
        assert tok.token_to_id(t) == i
        assert tok.token_to_id(tok.decode_single_token_bytes(i)) == i
    assert tok.token_to_id("<|pad|>") == tok.special_tokens["<|pad|>"]
    assert tok.id_to_token(tok.special_tokens["<|pad|>"]) == "<|pad|>"
    assert tok.token_to_id("Ġ") == 32
    assert len(tok.get_vocab()) == tok.vocab_size == len(tok)
    assert tok.decode_tokens_bytes([104, 105]) == [b"h", b"i"]
