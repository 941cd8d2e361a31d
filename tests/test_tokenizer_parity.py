"""ferrolm ids == tiktoken ids == HF tokenizers ids on the same vocabulary."""

from __future__ import annotations

import pytest
from conftest import ADVERSARIAL, CL100K_SPECIALS

from ferrolm import CL100K_PATTERN, Tokenizer

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")


def test_known_vectors(gpt2_pair, cl100k_pair):
    gpt2, _ = gpt2_pair
    cl, _ = cl100k_pair
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, 50256]
    assert gpt2.encode("hello <|endoftext|>", allowed_special={"<|endoftext|>"}) == [31373, 220, 50256]
    assert cl.encode("hello world") == [15339, 1917]
    assert cl.encode("👍") == [9468, 239, 235]
    assert gpt2.n_vocab == 50257 and cl.n_vocab == 100277
    assert gpt2.eot_token == 50256


@pytest.mark.parametrize("which", ["gpt2_pair", "cl100k_pair"])
def test_real_vocab_matches_tiktoken_on_corpus(which, request, corpus_docs):
    tok, enc = request.getfixturevalue(which)
    text = "".join(corpus_docs)
    assert len(text.encode()) > 3_000_000
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    # Per document too (document boundaries change the last whitespace piece).
    for doc in corpus_docs[:400]:
        assert tok.encode_ordinary(doc) == enc.encode_ordinary(doc)


@pytest.mark.parametrize("which", ["gpt2_pair", "cl100k_pair"])
@pytest.mark.parametrize("text", ADVERSARIAL)
def test_real_vocab_matches_tiktoken_adversarial(which, text, request):
    tok, enc = request.getfixturevalue(which)
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert tok.decode(tok.encode_ordinary(text)) == text


@pytest.mark.parametrize("which", ["gpt2_pair", "cl100k_pair"])
def test_special_token_semantics_match_tiktoken(which, request):
    tok, enc = request.getfixturevalue(which)
    text = "a<|endoftext|>b <|endoftext|>"
    for kwargs in [dict(allowed_special="all"), dict(allowed_special={"<|endoftext|>"}), dict(disallowed_special=())]:
        assert tok.encode(text, **kwargs) == enc.encode(text, **kwargs)
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(text)
    with pytest.raises(ValueError):
        enc.encode(text)
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    assert list(tok.encode_to_numpy(text, allowed_special="all")) == enc.encode(text, allowed_special="all")


def test_cl100k_other_specials(cl100k_pair):
    tok, enc = cl100k_pair
    text = "<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>z<|endofprompt|>"
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    # Only one allowed, the others disallowed by default: both raise.
    with pytest.raises(ValueError):
        tok.encode(text, allowed_special={"<|fim_prefix|>"})
    # Only one allowed, the others plain text.
    kw = dict(allowed_special={"<|fim_prefix|>"}, disallowed_special=())
    assert tok.encode(text, **kw) == enc.encode(text, **kw)


def test_batch_matches_single(cl100k_pair, corpus_docs):
    tok, enc = cl100k_pair
    docs = corpus_docs[:300]
    assert tok.encode_ordinary_batch(docs, num_threads=2) == enc.encode_ordinary_batch(docs)
    assert tok.encode_batch(docs, num_threads=1) == [enc.encode_ordinary(d) for d in docs]
    ids, lengths = tok.encode_batch_to_numpy(docs[:20], pad_id=-1)
    for row, n, d in zip(ids, lengths, docs[:20]):
        expect = enc.encode_ordinary(d)
        assert n == len(expect) and list(row[:n]) == expect and (row[n:] == -1).all()
    ids, lengths = tok.encode_batch_to_numpy(["a b c", "a"], pad_id=7, max_length=2, padding_side="left")
    assert ids.tolist() == [
        [enc.encode_ordinary("a b c")[0], enc.encode_ordinary("a b c")[1]],
        [7, enc.encode_ordinary("a")[0]],
    ]
    assert lengths.tolist() == [2, 1]
    assert tok.decode_batch(enc.encode_ordinary_batch(docs[:10])) == docs[:10]


def test_gpt2_exported_to_hf_matches(gpt2_pair, corpus_docs, tmp_path):
    tok, enc = gpt2_pair
    path = tmp_path / "gpt2.json"
    tok.save_hf_json(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.get_vocab_size() == 50257
    for doc in corpus_docs[:300] + ADVERSARIAL:
        ours = tok.encode(doc, allowed_special="all")
        assert hf.encode(doc, add_special_tokens=False).ids == ours == enc.encode(doc, allowed_special="all")
    # ... and reads back with HF's merge rule, still the same ids.
    back = Tokenizer.from_hf_json(path)
    assert back.merge_rule == "merges"
    for doc in corpus_docs[:100] + ADVERSARIAL:
        assert back.encode(doc, allowed_special="all") == enc.encode(doc, allowed_special="all")


def test_cl100k_exported_to_hf_matches(cl100k_pair, corpus_docs, tmp_path):
    tok, enc = cl100k_pair
    path = tmp_path / "cl100k.json"
    tok.save_hf_json(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    for doc in corpus_docs[:200] + ADVERSARIAL:
        assert hf.encode(doc, add_special_tokens=False).ids == enc.encode(doc, allowed_special="all"), doc[:80]
    back = Tokenizer.from_hf_json(path)
    assert back.pattern == CL100K_PATTERN
    assert back.special_tokens == CL100K_SPECIALS


def test_trained_vocab_loads_in_hf_and_tiktoken(trained, corpus_docs, tmp_path):
    trained.save_hf_json(tmp_path / "t.json")
    trained.save_tiktoken(tmp_path / "t.tiktoken")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "t.json"))
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding(
        "t",
        pat_str=trained.pattern,
        mergeable_ranks=load_tiktoken_bpe(str(tmp_path / "t.tiktoken")),
        special_tokens=trained.special_tokens,
    )
    held_out = corpus_docs[-300:]
    for doc in held_out + ADVERSARIAL:
        ours = trained.encode(doc, allowed_special="all")
        assert hf.encode(doc, add_special_tokens=False).ids == ours
        assert enc.encode(doc, allowed_special="all") == ours
        assert hf.decode(ours, skip_special_tokens=False) == doc
    assert hf.get_vocab_size() == trained.vocab_size == 2048
    # Round trip through both formats.
    from_hf = Tokenizer.from_hf_json(tmp_path / "t.json")
    from_tt = Tokenizer.from_tiktoken(tmp_path / "t.tiktoken", trained.pattern, trained.special_tokens)
    for doc in held_out[:50]:
        assert from_hf.encode(doc) == from_tt.encode(doc) == trained.encode(doc)


def test_reads_files_written_by_hf(corpus_docs, tmp_path):
    """A tokenizer trained and saved by HF tokenizers itself loads with the same ids."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus_docs[:200], trainer)
    hf.save(str(tmp_path / "hf.json"))
    tok = Tokenizer.from_hf_json(tmp_path / "hf.json")
    assert tok.vocab_size == hf.get_vocab_size()
    for doc in corpus_docs[-200:] + ADVERSARIAL:
        assert tok.encode(doc, allowed_special="all") == hf.encode(doc).ids
    for t in ["Ġthe", "<|endoftext|>", "a"]:
        assert tok.token_to_id(t) == hf.token_to_id(t)
        assert tok.id_to_token(hf.token_to_id(t)) == t
    assert tok.get_vocab() == hf.get_vocab()


def test_reads_hf_split_pretokenizer(corpus_docs, tmp_path):
    """HF's Sequence[Split(regex), ByteLevel(use_regex=False)] layout (cl100k / Llama-3 style)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(corpus_docs[:200], trainer)
    hf.save(str(tmp_path / "hf.json"))
    tok = Tokenizer.from_hf_json(tmp_path / "hf.json")
    # HF's regex engine reads cl100k's `\p{N}{1,3}+` as "runs of 1-3 digits, repeated"; ferrolm
    # reads the file the way HF does, so digit runs longer than 3 stay one piece here.
    assert tok.pre_tokenize("x 12345") == ["x", " ", "12345"]
    for doc in corpus_docs[-100:] + ADVERSARIAL:
        assert tok.encode(doc) == hf.encode(doc).ids
