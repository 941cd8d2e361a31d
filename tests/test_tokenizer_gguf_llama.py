"""GGUF vocabularies of `tokenizer.ggml.model = llama` (SentencePiece BPE: scores, byte fallback,
add_space_prefix): ferrolm's ids and decode equal HF tokenizers' on the tokenizer.json that
transformers' converter builds from the same vocabulary (merges from scores, Llama's
normalizer and decoder). The vocabulary is trained with HF's BpeTrainer on the embedded corpus
and written with the gguf package's GGUFWriter."""

from __future__ import annotations

import json

import pytest
from conftest import ADVERSARIAL

from ferrolm import FormatError, Tokenizer

tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")
from tokenizers import decoders, models, normalizers, trainers  # noqa: E402

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
EXTRA = [
    "<s>hello</s> world <s> x",
    " leading space and  double  spaces ",
    "中文 👍 ﬁ ① e\u0301",
    "tab\tnew\nline\r\n",
    "<|user|>hi<|user|>",
]


def _llama_json(tokens, scores, types, add_space_prefix=True):
    """tokenizer.json as transformers' LlamaConverter writes it for this vocabulary."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = []
    for t, score in zip(tokens, scores):
        local = [(t[:k], t[k:], score) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges = [[a, b] for a, b, _ in sorted(merges, key=lambda m: m[2], reverse=True)]
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": ty != USER_DEFINED,
        }
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    norm = [normalizers.Replace(" ", "▁")]
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
        dec.append(decoders.Strip(" ", 1, 0))
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    data = json.loads(tok.to_str())
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = merges
    data["added_tokens"] = added
    return tokenizers.Tokenizer.from_str(json.dumps(data))


@pytest.fixture(scope="module")
def vocabulary(corpus_docs):
    """(tokens, scores, types) of a SentencePiece-style BPE trained by HF on the corpus."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    docs = [d[:2000] for d in corpus_docs[:80]] + ADVERSARIAL[:30]
    trainer = trainers.BpeTrainer(
        vocab_size=900, limit_alphabet=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    hf.train_from_iterator(docs, trainer)
    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    rank = {a + b: r for r, (a, b) in enumerate(data["model"]["merges"])}
    tokens = list(by_id) + [f"<0x{b:02X}>" for b in range(256)] + ["<|user|>"]
    scores = [-float(rank.get(t, 0)) for t in by_id] + [0.0] * 257
    types = [UNKNOWN, CONTROL, CONTROL] + [NORMAL] * (len(by_id) - 3) + [BYTE] * 256 + [USER_DEFINED]
    assert by_id[:3] == ["<unk>", "<s>", "</s>"]
    return tokens, scores, types


def _write(path, tokens, scores, types, add_space_prefix=True):
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_space_prefix)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_llama_gguf_matches_hf(vocabulary, corpus_docs, add_space_prefix, tmp_path):
    tokens, scores, types = vocabulary
    tok = Tokenizer.from_gguf(_write(tmp_path / "m.gguf", tokens, scores, types, add_space_prefix))
    ref = _llama_json(tokens, scores, types, add_space_prefix)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.add_bos) == (1, 2, 0, True)
    assert tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]
    texts = ADVERSARIAL + EXTRA + [d[:3000] for d in corpus_docs[80:110]]
    for t in texts:
        want = ref.encode(t, add_special_tokens=False).ids
        assert tok.encode(t, allowed_special="all") == want, repr(t[:80])
        assert tok.decode(want) == ref.decode(want, skip_special_tokens=False), repr(t[:80])
    # Byte fallback: chars outside the 150-char alphabet become <0xXX> tokens and decode back.
    ids = tok.encode("中文 👍")
    assert any(tokens[i].startswith("<0x") for i in ids)
    assert tok.decode(ids) == ("中文 👍" if add_space_prefix else "中文 👍")
    # The user-defined token is always matched; control tokens follow allowed_special.
    assert tokens.index("<|user|>") in tok.encode("a<|user|>b")
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode("<s>")
    # The exported tokenizer.json loads in HF with the same ids.
    tok.save_hf_json(tmp_path / "tokenizer.json")
    again = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for t in EXTRA + ADVERSARIAL[:20]:
        assert again.encode(t, add_special_tokens=False).ids == tok.encode(t, allowed_special="all")


def test_llama_gguf_bad_arrays(vocabulary, tmp_path):
    tokens, scores, types = vocabulary
    with pytest.raises(FormatError, match="scores has"):
        Tokenizer.from_gguf(_write(tmp_path / "a.gguf", tokens, scores[:-1], types))
    with pytest.raises(FormatError, match="token_type"):
        Tokenizer.from_gguf(_write(tmp_path / "b.gguf", tokens, scores, [NORMAL] * (len(tokens) - 1) + [9]))
