"""Shared fixtures: the real vocabularies (tests/data, else $FERROLM_DATA_DIR, else ../shared/data;
skipped when absent), the peers (tiktoken, HF tokenizers) built on them, and slices of the embedded
default corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ferrolm import Tokenizer
from ferrolm.corpus import chinese_text, stdlib_texts

#: Where the real vocabularies are looked for, in order: shipped with the tests, a folder named by
#: $FERROLM_DATA_DIR, the workspace's shared data.
DATA_DIRS = [Path(__file__).resolve().parent / "data"]
if os.environ.get("FERROLM_DATA_DIR"):
    DATA_DIRS.append(Path(os.environ["FERROLM_DATA_DIR"]))
DATA_DIRS.append(Path(__file__).resolve().parents[2] / "shared" / "data")

R50K_SPECIALS = {"<|endoftext|>": 50256}
CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}

#: Strings that break naive pre-tokenizers: runs of spaces and newlines, contractions in all
#: cases, digits, CJK, emoji (with ZWJ and skin tones), control characters, U+3000, U+0085,
#: long-s case folding, combining marks.
ADVERSARIAL = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "   \n\n   ",
    "x  \n  ",
    "hello world",
    "Hello, World! How's it going? I'm fine; we'll see, they've gone, you'd think, it's 'quoted'.",
    "DON'T WON'T SHAN'T I'LL WE'VE THEY'RE SHE'S HE'D",
    "'s 'S 'ſ 'll 'LL 'Ll 've 'VE 're 'RE 'd 'D 'm 'M 't 'T",
    " 'store 'store",
    "1234567890 3.14159 1,000,000 2026-11-25 0x7fff +44 20 7946 0958",
    "١٢٣ ½ ² Ⅻ ４２",
    "中文分词测试：你好，世界！这是一个句子。",
    "繁體中文與日本語のテキスト、한국어 텍스트",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🎉🎉🎉 ❤️ 🇨🇳",
    "tabs\tand\ttabs\t\t\tend",
    "\r\n\r\nwindows\r\nline endings\r\n",
    "\x00\x01\x02\x1f\x7f control chars \x0b\x0c",
    "ideographic\u3000space and\u00a0nbsp and\u0085nel and\u2028line sep",
    "combining: e\u0301 a\u0308 n\u0303 \u0301\u0301",
    "trailing spaces   ",
    "   leading spaces",
    "mixed    \t  \n\t whitespace   \n",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n    pass\n",
    "<|endoftext|> is a special token text",
    "a" * 5000,
    " " * 3000 + "x",
    "🎉" * 1000,
    "ab" * 2000,
    "$$$%%%^^^&&&***((()))",
    "\U0001d400\U0001d401 mathematical \U0001d7ce\U0001d7cf",
]


@pytest.fixture(scope="session")
def corpus_docs():
    """About 4 MB of real text: the Chinese prose and the first standard-library sources."""
    return [chinese_text()] + stdlib_texts(max_bytes=4_000_000)


def _shared(name: str) -> Path:
    for folder in DATA_DIRS:
        path = folder / name
        if path.is_file():
            return path
    pytest.skip(f"{name} is in none of {[str(d) for d in DATA_DIRS]}")


def _real_pair(file: str, name: str, specials):
    """(ferrolm, tiktoken) tokenizers on one of the real rank files."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from ferrolm import PATTERNS

    path = _shared(file)
    pattern = PATTERNS[name]
    enc = tiktoken.Encoding(
        name, pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens=specials
    )
    return Tokenizer.from_tiktoken(path, name, specials), enc


@pytest.fixture(scope="session")
def gpt2_pair():
    """(ferrolm, tiktoken) tokenizers on GPT-2's real r50k_base ranks."""
    return _real_pair("gpt2.tiktoken", "r50k_base", R50K_SPECIALS)


@pytest.fixture(scope="session")
def cl100k_pair():
    """(ferrolm, tiktoken) tokenizers on the real cl100k_base ranks."""
    return _real_pair("cl100k_base.tiktoken", "cl100k_base", CL100K_SPECIALS)


@pytest.fixture(scope="session")
def trained(corpus_docs):
    """A 2,048-token vocabulary trained by ferrolm on 1 MB of the corpus (no shared data needed)."""
    docs = [chinese_text()] + stdlib_texts(max_bytes=1_000_000)
    return Tokenizer.train(docs, vocab_size=2048, special_tokens=["<|endoftext|>", "<|pad|>"])


@pytest.fixture
def hf_llama():
    """A factory of small random transformers ``LlamaForCausalLM`` models in eval mode: 2 layers,
    width 32, 4 query and 2 KV heads, window 64; ``make(vocab_size=64, seed=0, **config)``."""
    transformers = pytest.importorskip("transformers")
    import torch

    def make(vocab_size: int = 64, seed: int = 0, **config):
        torch.manual_seed(seed)
        kw = dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        kw.update(config)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()

    return make
