"""HF tokenizer.json pipelines beyond the byte-level fast path: ferrolm's ids and decode equal HF
tokenizers' own on the same file (normalizers, pre-tokenizers, BPE options, added-token flags,
post-processors, decoders), each tokenizer trained with HF's BpeTrainer on the embedded corpus."""

from __future__ import annotations

import json

import pytest
from conftest import ADVERSARIAL

from ferrolm import FormatError, Tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

EXTRA = [
    "ﬁne ﬂour ① ② ㈱ ㍻ Ⅻ ｆｕｌｌｗｉｄｔｈ",
    "ÀÉÎÕÜ àéîõü ǅ ß ẞ İstanbul ΣΑΣ ὈΔΥΣΣΕΎΣ",
    "e\u0301\u0327 \u1e9b\u0323 Å Å",
    "hello<tag>world <tag> x  <tag>  y",
    "say hello, hellothere hello_x (hello) HELLO",
    "WORLD world World wOrLd",
    "a<|sep|>b <|sep|> c",
    "▁already▁has▁metaspace ▁ ▁▁",
    "  two  spaces  ",
    "don't-stop the-final--countdown!!",
    "under_score snake_case CamelCase 42abc abc42 4.2e10",
]


@pytest.fixture(scope="module")
def train_text(corpus_docs):
    docs = [corpus_docs[0][:20_000]] + [d[:4000] for d in corpus_docs[1:60]]
    return docs + ADVERSARIAL[:30] + EXTRA


@pytest.fixture(scope="module")
def texts(corpus_docs):
    return ADVERSARIAL + EXTRA + [d[:3000] for d in corpus_docs[60:90]] + [corpus_docs[0][:3000]]


def _train(tok, docs, vocab_size=600, **kw):
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **kw)
    tok.train_from_iterator(docs, trainer)
    return tok


def _load(hf, tmp_path, edit=None):
    data = json.loads(hf.to_str())
    if edit is not None:
        edit(data)
    text = json.dumps(data)
    hf = tokenizers.Tokenizer.from_str(text)
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    return hf, Tokenizer.from_hf_json(path)


def _check(hf, fl, texts):
    for t in texts:
        want = hf.encode(t, add_special_tokens=False).ids
        got = fl.encode(t, allowed_special="all")
        assert got == want, repr(t[:80])
        assert fl.encode(t, allowed_special="all", add_special_tokens=True) == hf.encode(t).ids, repr(t[:80])
        assert fl.decode(want) == hf.decode(want, skip_special_tokens=False), repr(t[:80])
        assert fl.decode(want, skip_special_tokens=True) == hf.decode(want, skip_special_tokens=True), repr(t[:80])
        for i in set(want[:50]):
            assert fl.id_to_token(i) == hf.id_to_token(i)
            assert fl.token_to_id(hf.id_to_token(i)) == i


def _bytelevel(normalizer=None, prefix_space=False):
    tok = tokenizers.Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    return tok


BL_ALPHABET = dict(initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize(
    "name",
    ["NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "Replace", "Prepend", "Sequence"],
)
def test_normalizer_then_bytelevel(name, train_text, texts, tmp_path):
    norm = {
        "NFC": normalizers.NFC(),
        "NFD": normalizers.NFD(),
        "NFKC": normalizers.NFKC(),
        "NFKD": normalizers.NFKD(),
        "Lowercase": normalizers.Lowercase(),
        "Strip": normalizers.Strip(left=True, right=True),
        "Replace": normalizers.Replace(tokenizers.Regex(r"\d+"), "#"),
        "Prepend": normalizers.Prepend("@@"),
        "Sequence": normalizers.Sequence(
            [normalizers.NFKD(), normalizers.Replace("  ", " "), normalizers.Lowercase(), normalizers.Strip()]
        ),
    }[name]
    hf = _train(_bytelevel(norm), train_text, **BL_ALPHABET)
    hf, fl = _load(hf, tmp_path)
    _check(hf, fl, texts)


def test_bytelevel_add_prefix_space_and_roberta(train_text, texts, tmp_path):
    hf = _bytelevel(prefix_space=True)
    hf = _train(hf, train_text, special_tokens=["<s>", "</s>"], **BL_ALPHABET)
    hf.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    hf, fl = _load(hf, tmp_path)
    _check(hf, fl, texts)
    assert fl.encode("hi", add_special_tokens=True)[0] == 0


def test_bytelevel_without_regex_after_whitespace_split(train_text, texts, tmp_path):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    hf, fl = _load(_train(hf, train_text, **BL_ALPHABET), tmp_path)
    _check(hf, fl, texts)


@pytest.mark.parametrize("behavior", ["removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous"])
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("pattern", ["string", "regex"])
def test_split_behaviors(behavior, invert, pattern, train_text, texts, tmp_path):
    pat = " " if pattern == "string" else tokenizers.Regex(r"\s+|\p{P}")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pat, behavior=behavior, invert=invert),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf, fl = _load(_train(hf, train_text, vocab_size=400, **BL_ALPHABET), tmp_path)
    _check(hf, fl, texts)


@pytest.mark.parametrize("individual", [False, True])
def test_digits_punctuation_bytelevel(individual, train_text, texts, tmp_path):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=individual),
            pre_tokenizers.Punctuation(behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf, fl = _load(_train(hf, train_text, **BL_ALPHABET), tmp_path)
    _check(hf, fl, texts)


def _llama_decoder():
    return decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )


def _with_byte_tokens(data):
    vocab = data["model"]["vocab"]
    n = max(vocab.values()) + 1
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", n + b)


@pytest.mark.parametrize("scheme", ["first", "always", "never"])
@pytest.mark.parametrize("split", [True, False])
def test_metaspace_byte_fallback(scheme, split, train_text, texts, tmp_path):
    """SentencePiece-style BPE (Llama/Mistral): Metaspace, byte fallback, unk, the Llama decoder."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    hf.decoder = _llama_decoder()
    hf = _train(hf, train_text, vocab_size=800, limit_alphabet=120, special_tokens=["<unk>", "<s>", "</s>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf, fl = _load(hf, tmp_path, _with_byte_tokens)
    _check(hf, fl, texts)
    assert fl.decode(fl.encode("中文 👍 x")) == "中文 👍 x"
    assert fl.get_vocab() == hf.get_vocab()


def test_llama2_legacy_normalizer(train_text, texts, tmp_path):
    """Llama-2's tokenizer.json: Prepend + Replace normalizers, no pre-tokenizer, Metaspace decoder."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = _llama_decoder()
    hf = _train(hf, [t[:300] for t in train_text], vocab_size=500, limit_alphabet=100, special_tokens=["<unk>", "<s>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf, fl = _load(hf, tmp_path, _with_byte_tokens)
    _check(hf, fl, texts[:40])


def test_metaspace_decoder(train_text, texts, tmp_path):
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf, fl = _load(_train(hf, train_text, limit_alphabet=150, special_tokens=["<unk>"]), tmp_path)
    _check(hf, fl, texts)


def test_lowercase_whitespace_end_of_word_suffix(train_text, texts, tmp_path):
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.BPEDecoder(suffix="</w>")
    hf = _train(hf, train_text, end_of_word_suffix="</w>", special_tokens=["<unk>"])
    hf, fl = _load(hf, tmp_path)
    _check(hf, fl, texts)


@pytest.mark.parametrize("norm", ["NFD", "bert", "bert-cased"])
def test_continuing_subword_prefix_bert_pretokenizer(norm, train_text, texts, tmp_path):
    hf = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
    hf.normalizer = {
        "NFD": normalizers.NFD(),
        "bert": normalizers.BertNormalizer(),
        "bert-cased": normalizers.BertNormalizer(lowercase=False, handle_chinese_chars=False),
    }[norm]
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf = _train(hf, train_text, continuing_subword_prefix="##", special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    hf.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1))
    hf, fl = _load(hf, tmp_path)
    _check(hf, fl, texts)


def test_ignore_merges_and_missing_bytes(train_text, texts, tmp_path):
    """ignore_merges, and a byte-level vocabulary that lacks some single bytes (dropped, as HF does)."""
    hf = _train(_bytelevel(), train_text, vocab_size=500)  # no initial alphabet: rare bytes are missing

    def edit(data):
        data["model"]["ignore_merges"] = True

    hf, fl = _load(hf, tmp_path, edit)
    _check(hf, fl, texts)


def test_added_token_flags(train_text, texts, tmp_path):
    hf = _bytelevel(normalizers.Lowercase())
    hf = _train(hf, train_text, **BL_ALPHABET)
    hf.add_tokens(
        [
            AddedToken("<tag>", lstrip=True, rstrip=True, normalized=False),
            AddedToken("hello", single_word=True, normalized=False),
            AddedToken("WORLD", normalized=True),
            AddedToken("x  ", normalized=False),
        ]
    )
    hf.add_special_tokens([AddedToken("<|sep|>", special=True), AddedToken("[mask]", lstrip=True, special=True)])
    hf, fl = _load(hf, tmp_path)
    _check(hf, fl, texts)
    # Special tokens follow ferrolm's allowed_special rules; non-special ones always match, as in HF.
    with pytest.raises(ValueError, match="disallowed special token"):
        fl.encode("a<|sep|>b")
    plain = fl.encode("a<|sep|>b", disallowed_special=())
    assert hf.token_to_id("<|sep|>") not in plain
    assert hf.token_to_id("<tag>") in fl.encode("a <tag> b")
    assert fl.n_vocab == hf.get_vocab_size()
    assert fl.decode_single_token_bytes(hf.token_to_id("x  ")) == b"x  "


def test_pickle_and_save_keep_the_pipeline(train_text, tmp_path):
    import pickle

    hf = _train(_bytelevel(normalizers.NFKC()), train_text, **BL_ALPHABET)
    hf, fl = _load(hf, tmp_path)
    again = pickle.loads(pickle.dumps(fl))
    t = "ﬁne ① text"
    assert again.encode(t) == fl.encode(t) == hf.encode(t).ids
    fl.save_hf_json(tmp_path / "out.json")
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "out.json")).encode(t).ids == fl.encode(t)


# ---------------------------------------------------------------------------- bad input


def _bad(tmp_path, mutate):
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = _train(hf, ["hello world abc"] * 5, vocab_size=40, special_tokens=["<unk>"])
    data = json.loads(hf.to_str())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["model"].__setitem__("dropout", 0.1), "dropout"),
        (lambda d: d.__setitem__("normalizer", {"type": "Precompiled"}), r"normalizer.*Precompiled"),
        (
            lambda d: d.__setitem__(
                "normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Precompiled"}]}
            ),
            r"normalizer\.normalizers\[1\]",
        ),
        (lambda d: d.__setitem__("pre_tokenizer", {"type": "UnicodeScripts"}), "UnicodeScripts"),
        (
            lambda d: d.__setitem__(
                "pre_tokenizer", {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}
            ),
            "does not compile",
        ),
        (lambda d: d.__setitem__("decoder", {"type": "CTC"}), "CTC"),
        (lambda d: d.__setitem__("post_processor", {"type": "Mystery"}), "Mystery"),
        (lambda d: d["model"].__setitem__("merges", [["h", "nope"]]), "nope"),
        (lambda d: d["model"].__setitem__("unk_token", "<missing>"), "unk_token"),
        (lambda d: d.__setitem__("truncation", {"max_length": 4}), "truncation"),
        (lambda d: d["model"].__setitem__("type", "Unigram"), "Unigram"),
        (lambda d: d.__setitem__("added_tokens", [{"content": 3}]), r"added_tokens\[0\]"),
    ],
)
def test_bad_files_are_format_errors(mutate, match, tmp_path):
    with pytest.raises(FormatError, match=match):
        Tokenizer.from_hf_json(_bad(tmp_path, mutate))


# ---------------------------------------------------------------------------- random text

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ALPHABET = st.sampled_from(
    list("aeiou xyzAEZ09_-.,!'\n\t") + ["  ", "ﬁ", "①", "é", "e\u0301", "中", "文", "👍", "▁", "\u3000"]
)
_RANDOM = st.lists(_ALPHABET, max_size=30).map("".join)


@pytest.fixture(scope="module")
def random_pair(train_text, tmp_path_factory):
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Metaspace()]
    )
    hf.decoder = _llama_decoder()
    hf = _train(hf, train_text, limit_alphabet=100, special_tokens=["<unk>"])
    return _load(hf, tmp_path_factory.mktemp("random"), _with_byte_tokens)


@settings(max_examples=300, deadline=None)
@given(text=_RANDOM)
def test_random_text_matches_hf(random_pair, text):
    hf, fl = random_pair
    ids = hf.encode(text, add_special_tokens=False).ids
    assert fl.encode(text) == ids
    assert fl.decode(ids) == hf.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------- from_pretrained


def test_from_pretrained_matches_transformers(train_text, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    hf.decoder = _llama_decoder()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    hf = _train(hf, train_text, limit_alphabet=150, special_tokens=specials)
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    data = json.loads(hf.to_str())
    _with_byte_tokens(data)
    hf = tokenizers.Tokenizer.from_str(json.dumps(data))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=template
    )
    ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.chat_template == template
    messages = [{"role": "user", "content": "Hello 中文 👍 world"}, {"role": "assistant", "content": "Hi  there"}]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(want, list):
        want = want["input_ids"]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == want
    for t in EXTRA:
        assert tok.encode(t, allowed_special="all", add_special_tokens=True) == ref(t)["input_ids"]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- fuzzed files

_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**40),
    st.text(max_size=6),
    st.lists(st.text(max_size=4), max_size=3),
    st.fixed_dictionaries({"type": st.sampled_from(["Sequence", "Split", "BPE", "Metaspace", "Replace", "Strip"])}),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "vocab":
                yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def small_json():
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, continuing_subword_prefix="##"))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.Split(" ", "merged_with_next")])
    hf.decoder = _llama_decoder()
    hf = _train(hf, ["hello world 123 abc"] * 3, vocab_size=60, special_tokens=["<unk>", "<s>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf.add_tokens([AddedToken("<x>", lstrip=True)])
    return json.loads(hf.to_str())


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_files_never_panic(small_json, tmp_path_factory, data):
    """A corrupted tokenizer.json loads or raises FormatError; what loads encodes without a panic."""
    doc = json.loads(json.dumps(small_json))
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            if isinstance(node, (dict, list)):
                node[path[-1]] = data.draw(_JUNK)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced this path
    path = tmp_path_factory.mktemp("fuzz") / "t.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    try:
        tok = Tokenizer.from_hf_json(path)
    except FormatError:
        return
    for text in ["hello world 123", "<x> <s> ﬁ 中", ""]:
        try:
            ids = tok.encode(text, allowed_special="all", add_special_tokens=True)
            tok.decode(ids)
        except ValueError:
            pass


# ---------------------------------------------------------------------------- more combinations

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_llama3_shape_with_template_post_processor(train_text, texts, tmp_path):
    """Llama-3's shape: Split + ByteLevel(use_regex=False) stays on the fast path; the
    post-processor (Sequence[ByteLevel, TemplateProcessing]) adds BOS with add_special_tokens."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf = _train(hf, train_text, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], **BL_ALPHABET)
    hf.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A <|end_of_text|>",
                special_tokens=[("<|begin_of_text|>", 0), ("<|end_of_text|>", 1)],
            ),
        ]
    )
    hf, fl = _load(hf, tmp_path)
    _check(hf, fl, texts)
    assert fl.encode("hi", add_special_tokens=True)[0] == 0 and fl.encode("hi", add_special_tokens=True)[-1] == 1


@pytest.mark.parametrize("behavior", ["removed", "isolated", "merged_with_previous", "contiguous"])
def test_punctuation_behaviors_and_decoders(behavior, train_text, texts, tmp_path):
    # (HF's Strip decoder panics when it would strip a whole token; ferrolm does not.)
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.Strip(left=True, right=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior=behavior)]
    )
    hf.decoder = decoders.Sequence(
        [decoders.Replace(tokenizers.Regex(r"[aeiou]+"), "_"), decoders.Strip("_", 0, 1), decoders.Fuse()]
    )
    hf, fl = _load(_train(hf, train_text, limit_alphabet=200, special_tokens=["<unk>"]), tmp_path)
    _check(hf, fl, texts)


@pytest.mark.parametrize("scheme", ["first", "always", "never"])
def test_metaspace_decoder_schemes(scheme, train_text, texts, tmp_path):
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="_", prepend_scheme=scheme)
    hf.decoder = decoders.Metaspace(replacement="_", prepend_scheme=scheme)
    hf, fl = _load(_train(hf, train_text, limit_alphabet=200, special_tokens=["<unk>"]), tmp_path)
    _check(hf, fl, texts)


def test_falcon_shape_stages_after_bytelevel(train_text, texts, tmp_path):
    """Falcon's pre-tokenizer runs Digits and Split after ByteLevel, on ByteLevel text."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation("contiguous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(tokenizers.Regex("[0-9][0-9][0-9]"), behavior="isolated"),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf, fl = _load(_train(hf, train_text, special_tokens=[">>TITLE<<", "<|endoftext|>"], **BL_ALPHABET), tmp_path)
    _check(hf, fl, texts)
