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


# ------------------------------------------------------------------ llama.cpp's own SPM tokenizer


def _llama_cpp_spm(tokens, scores, types, text, add_space_prefix=True):
    """llama.cpp's tokenizer for `model = llama` (`llm_tokenizer_spm_session` and the SPM branch of
    `tokenize_impl` in src/llama-vocab.cpp), written from its source as an independent reference.

    Control, user-defined and unknown tokens are cut out of the text longest first; a text
    fragment that opens the text or follows such a token gets a " " prefix (add_space_prefix);
    spaces become "▁"; then the symbols (chars) merge pairwise, the adjacent pair whose
    concatenation is a token of highest score first, ties to the leftmost pair; a final symbol
    that is not a token becomes its <0xXX> byte tokens.
    """
    import heapq

    to_id = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first of duplicate texts
    specials = sorted(
        (i for i, ty in enumerate(types) if ty in (CONTROL, USER_DEFINED, UNKNOWN)), key=lambda i: -len(tokens[i])
    )
    fragments = [text]
    for sid in specials:
        s, out = tokens[sid], []
        for frag in fragments:
            if not isinstance(frag, str):
                out.append(frag)
                continue
            pos = 0
            while (j := frag.find(s, pos)) >= 0:
                if j > pos:
                    out.append(frag[pos:j])
                out.append(sid)
                pos = j + len(s)
            if pos < len(frag):
                out.append(frag[pos:])
        fragments = out

    def session(text):
        n = len(text)
        start, size = list(range(n)), [1] * n
        prev, nxt = [i - 1 for i in range(n)], [i + 1 if i + 1 < n else -1 for i in range(n)]
        heap, rev = [], {}

        def add(left, right):
            if left < 0 or right < 0:
                return
            s = text[start[left] : start[left] + size[left] + size[right]]
            if s in to_id:
                heapq.heappush(heap, (-scores[to_id[s]], left, right, len(s)))
                rev[s] = (left, right)

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])

        def resegment(i):
            s = text[start[i] : start[i] + size[i]]
            if s in to_id:
                return [to_id[s]]
            if s in rev:
                return resegment(rev[s][0]) + resegment(rev[s][1])
            return [to_id[f"<0x{b:02X}>"] for b in s.encode()]

        out, i = [], 0 if n else -1
        while i != -1:
            out += resegment(i)
            i = nxt[i]
        return out

    ids, prev_special = [], True
    for frag in fragments:
        if not isinstance(frag, str):
            ids.append(frag)
            prev_special = True
            continue
        t = (" " if add_space_prefix and prev_special else "") + frag
        ids += session(t.replace(" ", "▁"))
        prev_special = False
    return ids


def _tied(scores, types, step):
    """Scores rounded to multiples of `step` (0: all zero, as llama.cpp reads a file without scores)."""
    return [(s // step * step if step else 0.0) if ty == NORMAL else s for s, ty in zip(scores, types)]


@pytest.mark.parametrize("ties", ["none", "coarse", "all"])
@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_llama_gguf_matches_llama_cpp(vocabulary, corpus_docs, ties, add_space_prefix, tmp_path):
    """ids equal llama.cpp's SPM tokenizer, also where tokens share a score (the leftmost pair
    merges first, where HF's merge list would order them by token id)."""
    tokens, scores, types = vocabulary
    scores = {"none": scores, "coarse": _tied(scores, types, 25.0), "all": _tied(scores, types, 0)}[ties]
    tok = Tokenizer.from_gguf(_write(tmp_path / "m.gguf", tokens, scores, types, add_space_prefix))
    texts = ADVERSARIAL + EXTRA + [d[:2000] for d in corpus_docs[80:110]] + ["ab" * 300, "x" * 500]
    for t in texts:
        want = _llama_cpp_spm(tokens, scores, types, t, add_space_prefix)
        assert tok.encode(t, allowed_special="all") == want, repr(t[:80])


def test_llama_gguf_without_scores_merges_leftmost_first(vocabulary, tmp_path):
    """A file with no tokenizer.ggml.scores: llama.cpp gives every token score 0, so the
    leftmost mergeable pair always merges first."""
    tokens, scores, types = vocabulary
    path = tmp_path / "noscores.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf(path)
    zero = [0.0] * len(tokens)
    for t in ADVERSARIAL[:25] + EXTRA:
        assert tok.encode(t, allowed_special="all") == _llama_cpp_spm(tokens, zero, types, t), repr(t[:80])
