"""Long pieces with no split point (the merge loop's worst case): ferrolm's ids equal tiktoken's on
GPT-2's and cl100k's ranks and HF tokenizers' on HF pipelines, for pieces of every kind and length,
including lengths around the switch from the short-piece loop to the bucket-queue merge."""

from __future__ import annotations

import json
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrolm import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

#: Part counts on both sides of the switch to the long-piece merge (128 parts) and well past it.
LENGTHS = [127, 128, 129, 131, 400, 5000]


def _long_pieces(n: int, seed: int = 0) -> dict:
    """Strings with no split point for the GPT-2/cl100k patterns (cl100k cuts digit runs in 3s)."""
    rng = random.Random(seed)
    return {
        "x": "x" * n,
        "ab": ("ab" * n)[:n],
        "aab": ("aab" * n)[:n],
        "letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)),
        "Letters": "".join(rng.choice("aeiouAEIOUéßñçøÆ") for _ in range(n)),
        "digits": "".join(rng.choice("0123456789") for _ in range(n)),
        "cjk": "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(max(1, n // 3))),
        "emoji": "".join(rng.choice("🎉👍🏽❤🚀😀") for _ in range(max(1, n // 4))),
        "punct": "".join(rng.choice("!#$%&*+-/<=>?@^|~.,;:") for _ in range(n)),
        "spaces": " " * n + "x",
        "newlines": "\n" * n,
        "zero": "0" * n,
    }


@pytest.mark.parametrize("which", ["gpt2_pair", "cl100k_pair"])
@pytest.mark.parametrize("n", LENGTHS)
def test_long_pieces_match_tiktoken(which, n, request):
    tok, enc = request.getfixturevalue(which)
    for kind, text in _long_pieces(n, seed=n).items():
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text), (kind, n)


@pytest.mark.parametrize("which", ["gpt2_pair", "cl100k_pair"])
def test_megabyte_pieces_match_tiktoken(which, request):
    tok, enc = request.getfixturevalue(which)
    for kind in ["x", "ab", "letters", "digits"]:
        text = _long_pieces(300_000, seed=1)[kind]
        assert tok.encode_to_numpy(text).tolist() == enc.encode_ordinary(text), kind


_ONE_PIECE = st.text(alphabet=st.sampled_from(list("abcxyzé") + ["中", "文"]), min_size=100, max_size=1500)


@settings(max_examples=60, deadline=None)
@given(text=_ONE_PIECE)
def test_random_long_pieces_match_tiktoken(cl100k_pair, gpt2_pair, text):
    for tok, enc in (cl100k_pair, gpt2_pair):
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


def test_gpt2_as_hf_merges_matches_tiktoken_on_long_pieces(gpt2_pair, tmp_path):
    """GPT-2 written as tokenizer.json runs HF's merge-list rule; the ids stay tiktoken's and HF's."""
    tok, enc = gpt2_pair
    path = tmp_path / "gpt2.json"
    tok.save_hf_json(path)
    back = Tokenizer.from_hf_json(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    for n in [129, 3000]:
        for kind, text in _long_pieces(n, seed=7).items():
            want = enc.encode_ordinary(text)
            assert back.encode_ordinary(text) == want, (kind, n)
            assert hf.encode(text, add_special_tokens=False).ids == want, (kind, n)


# ------------------------------------------------------------------------------------ HF pipelines

RUNS = ["x" * 64, "ab" * 40, "0" * 50, "12" * 30, "中文" * 20, "=" * 80, "-" * 70, " " * 40]


@pytest.fixture(scope="module")
def train_docs(corpus_docs):
    return [corpus_docs[0][:20_000]] + [d[:4000] for d in corpus_docs[1:40]] + RUNS * 3


def _train(tok, docs, **kw):
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=700, show_progress=False, **kw))
    return tok


def _with_byte_tokens(data):
    vocab = data["model"]["vocab"]
    n = max(vocab.values()) + 1
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", n + b)


def _pipeline(kind: str, docs):
    """An HF tokenizer of one pipeline kind, trained on `docs`, and the JSON edit it needs."""
    if kind == "nfkc_bytelevel":
        t = tokenizers.Tokenizer(models.BPE())
        t.normalizer = normalizers.NFKC()
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        return _train(t, docs, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()), None
    if kind == "bytelevel_no_regex":
        t = tokenizers.Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        t.decoder = decoders.ByteLevel()
        return _train(t, docs, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()), None
    if kind == "metaspace_fallback":
        t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        return _train(t, docs, limit_alphabet=100, special_tokens=["<unk>", "<s>"]), _with_byte_tokens
    if kind == "llama2_legacy":
        t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        return _train(t, [d[:2000] for d in docs], limit_alphabet=100, special_tokens=["<unk>"]), _with_byte_tokens
    if kind == "lower_ws_eow":
        t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
        t.normalizer = normalizers.Lowercase()
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        return _train(t, docs, end_of_word_suffix="</w>", special_tokens=["<unk>"]), None
    if kind == "subword_prefix":
        t = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return _train(t, docs, continuing_subword_prefix="##", special_tokens=["[UNK]"]), None
    if kind == "digits_bytelevel":
        t = tokenizers.Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        t.decoder = decoders.ByteLevel()
        return _train(t, docs, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()), None
    raise AssertionError(kind)


KINDS = [
    "nfkc_bytelevel",
    "bytelevel_no_regex",
    "metaspace_fallback",
    "llama2_legacy",
    "lower_ws_eow",
    "subword_prefix",
    "digits_bytelevel",
]


@pytest.fixture(scope="module")
def pipelines(train_docs, tmp_path_factory):
    out = {}
    folder = tmp_path_factory.mktemp("long")
    for kind in KINDS:
        hf, edit = _pipeline(kind, train_docs)
        data = json.loads(hf.to_str())
        if edit is not None:
            edit(data)
        path = folder / f"{kind}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        out[kind] = (tokenizers.Tokenizer.from_file(str(path)), Tokenizer.from_hf_json(path))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [129, 400, 5000])
def test_long_pieces_match_hf(kind, n, pipelines):
    hf, fl = pipelines[kind]
    for what, text in _long_pieces(n, seed=n).items():
        assert fl.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids, (kind, what, n)


@settings(max_examples=40, deadline=None)
@given(text=_ONE_PIECE)
def test_random_long_pieces_match_hf(pipelines, text):
    for kind in ("metaspace_fallback", "llama2_legacy", "subword_prefix", "nfkc_bytelevel"):
        hf, fl = pipelines[kind]
        assert fl.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids, kind


def test_megabyte_piece_is_not_quadratic(gpt2_pair, pipelines):
    """One megabyte with no split point: the short-piece loop needs minutes; the bound is loose so
    that a loaded machine passes (the benchmark measures the real time)."""
    text = "x" * 1_000_000
    tok, _ = gpt2_pair
    for name, t in [("gpt2", tok)] + [(k, pipelines[k][1]) for k in ("llama2_legacy", "lower_ws_eow")]:
        start = time.perf_counter()
        ids = t.encode_to_numpy(text)
        elapsed = time.perf_counter() - start
        assert len(ids) > 0
        assert elapsed < 5.0, f"{name}: {elapsed:.2f} s for 1 MB of 'x'"
