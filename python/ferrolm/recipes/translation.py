"""The embedded translation task and the recipe that trains and scores seq2seq models on it.

The task: whole numbers written in English words -> the same numbers in French words
(:mod:`ferrolm.recipes.numwords`), generated on the machine, nothing downloaded. The split makes the
model generalise rather than memorise: numbers are grouped in blocks of 1,000 by their
thousands part, and 10% of the blocks (a seeded choice among 1..999) are held out; the test set
comes only from held-out blocks, so no test number's thousands part ever appears *as a thousands
part* in training (it does appear as the last three digits of other numbers, which is what makes
the mapping learnable compositionally). Training and validation numbers come from the other
blocks (disjoint from each other).

Example:
    >>> task = number_task(n_train=100, n_valid=10, n_test=10)
    >>> len(task.train), len(task.test)
    (100, 10)
    >>> task.train[0][0].startswith(("one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ...                              "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    ...                              "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty",
    ...                              "sixty", "seventy", "eighty", "ninety", "zero"))
    True
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._io import atomic_write, read_text
from .numwords import LANGUAGES, MAX_NUMBER

__all__ = [
    "TranslationTask",
    "number_task",
    "held_out_blocks",
    "SPECIALS",
    "train_tokenizer",
    "special_ids",
    "encode_pairs",
    "translate_texts",
    "evaluate_translation",
    "load_pairs",
    "pairs_task",
    "build_model",
    "train_seq2seq",
    "MODEL_KINDS",
]

SPECIALS = ("<pad>", "<s>", "</s>")
BLOCK = 1000


@dataclass
class TranslationTask:
    """Source/target text pairs: ``train``, ``valid`` and ``test`` lists of ``(source, target)``."""

    train: List[Tuple[str, str]]
    valid: List[Tuple[str, str]]
    test: List[Tuple[str, str]]
    description: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)


def held_out_blocks(seed: int = 0, fraction: float = 0.1) -> np.ndarray:
    """The held-out thousands parts (sorted): a seeded ``fraction`` of 1..999 (block 0, the
    numbers below 1,000, always trains)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_blocks = (MAX_NUMBER + 1) // BLOCK
    rng = np.random.default_rng([seed, 1000])
    k = max(1, int(round(fraction * (n_blocks - 1))))
    return np.sort(rng.choice(np.arange(1, n_blocks), size=k, replace=False))


def number_task(
    n_train: int = 200_000,
    n_valid: int = 1_000,
    n_test: int = 2_000,
    source: str = "en",
    target: str = "fr",
    seed: int = 0,
    test_fraction: float = 0.1,
) -> TranslationTask:
    """Number words from ``source`` to ``target`` language ("en" or "fr"), split by held-out
    blocks of 1,000 (see the module docstring). Distinct numbers throughout; the same
    arguments always give the same pairs.

    Raises:
        ValueError: unknown languages, or more numbers asked than a split holds.
    """
    for lang in (source, target):
        if lang not in LANGUAGES:
            raise ValueError(f"unknown language {lang!r}; expected one of {sorted(LANGUAGES)}")
    if source == target:
        raise ValueError("source and target languages must differ")
    held = held_out_blocks(seed, test_fraction)
    is_held = np.zeros((MAX_NUMBER + 1) // BLOCK, dtype=bool)
    is_held[held] = True
    numbers = np.arange(MAX_NUMBER + 1)
    test_pool = numbers[is_held[numbers // BLOCK]]
    train_pool = numbers[~is_held[numbers // BLOCK]]
    if n_test > len(test_pool) or n_train + n_valid > len(train_pool):
        raise ValueError(
            f"asked for {n_train}+{n_valid} training/validation and {n_test} test numbers; "
            f"the split holds {len(train_pool)} and {len(test_pool)}"
        )
    rng = np.random.default_rng([seed, 2000])
    picked = rng.choice(train_pool, size=n_train + n_valid, replace=False)
    test = rng.choice(test_pool, size=n_test, replace=False)
    src, tgt = LANGUAGES[source], LANGUAGES[target]
    pair = lambda n: (src(int(n)), tgt(int(n)))  # noqa: E731
    return TranslationTask(
        train=[pair(n) for n in picked[:n_train]],
        valid=[pair(n) for n in picked[n_train:]],
        test=[pair(n) for n in test],
        description=f"numbers 0..{MAX_NUMBER:,} in words, {source} -> {target}; "
        f"test numbers from {len(held)} held-out blocks of 1,000",
        meta={
            "source": source,
            "target": target,
            "seed": seed,
            "held_out_blocks": held.tolist(),
            "n_train": n_train,
            "n_valid": n_valid,
            "n_test": n_test,
        },
    )


def load_pairs(path) -> List[Tuple[str, str]]:
    """``(source, target)`` pairs from a TSV file (two tab-separated columns) or JSONL
    (``{"source": ..., "target": ...}`` per line).

    Raises:
        FileNotFoundError; ValueError naming ``file:line`` for a malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    out: List[Tuple[str, str]] = []
    with io.StringIO(read_text(path)) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    d = json.loads(line)
                    out.append((str(d["source"]), str(d["target"])))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{i}: expected a JSON object with 'source' and 'target' ({e})") from None
            else:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    raise ValueError(
                        f"{path}:{i}: expected two tab-separated columns (source, target), got {len(parts)}"
                    )
                out.append((parts[0], parts[1]))
    if not out:
        raise ValueError(f"{path} holds no pairs")
    return out


def pairs_task(path, test_path=None) -> "TranslationTask":
    """A :class:`TranslationTask` from a pairs file (see :func:`load_pairs`): the test pairs
    from ``test_path``, or the last 5% (at least one pair) held out; the first 5% of the rest
    (at most 1,000) for validation."""
    pairs = load_pairs(path)
    test = load_pairs(test_path) if test_path else None
    if test is None:
        cut = max(1, len(pairs) // 20)
        pairs, test = pairs[:-cut], pairs[-cut:]
    n_valid = min(len(pairs) // 20, 1000)
    return TranslationTask(train=pairs[n_valid:], valid=pairs[:n_valid], test=test, description=f"pairs from {path}")


def train_tokenizer(pairs: Sequence[Tuple[str, str]], vocab_size: int = 512):
    """A byte-level BPE tokenizer (ferrolm's) trained on both sides of ``pairs``, with the
    special tokens ``<pad>``, ``<s>``, ``</s>`` last. One vocabulary serves both sides."""
    from ..tokenizer import Tokenizer

    texts = [s for s, _ in pairs] + [t for _, t in pairs]
    return Tokenizer.train(texts, vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)


def special_ids(tok) -> Dict[str, int]:
    """``{"pad_id", "bos_id", "eos_id"}`` of a tokenizer trained by :func:`train_tokenizer`.

    Raises:
        ValueError: the tokenizer lacks one of the special tokens.
    """
    sp = tok.special_tokens
    missing = [s for s in SPECIALS if s not in sp]
    if missing:
        raise ValueError(
            f"the tokenizer has no {missing} special tokens; train it with ferrolm.recipes.translation.train_tokenizer"
        )
    return {"pad_id": sp["<pad>"], "bos_id": sp["<s>"], "eos_id": sp["</s>"]}


def encode_pairs(tok, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[List[int], List[int]]]:
    """Token ids of both sides (no special tokens; the batches add BOS/EOS)."""
    src = tok.encode_ordinary_batch([s for s, _ in pairs])
    tgt = tok.encode_ordinary_batch([t for _, t in pairs])
    return list(zip(src, tgt))


def translate_texts(
    model,
    tok,
    texts: Sequence[str],
    beam_size: int = 1,
    max_new_tokens: Optional[int] = None,
    batch_size: int = 64,
    length_penalty: float = 1.0,
) -> List[str]:
    """Translations of ``texts`` by a trained encoder-decoder ``model`` with tokenizer ``tok``.

    Raises:
        ValueError: an empty text, or a vocabulary mismatch between the model and tokenizer.
    """
    cfg = model.config
    if tok.n_vocab > min(cfg.src_vocab_size, cfg.tgt_vocab_size):
        raise ValueError(
            f"the tokenizer has {tok.n_vocab} tokens but the model's vocabularies hold {cfg.src_vocab_size} / "
            f"{cfg.tgt_vocab_size}; use the tokenizer saved with the model"
        )
    ids = special_ids(tok)
    if (ids["pad_id"], ids["bos_id"], ids["eos_id"]) != (cfg.pad_id, cfg.bos_id, cfg.eos_id):
        raise ValueError(
            f"the tokenizer's special ids {ids} differ from the model's ({cfg.pad_id}, {cfg.bos_id}, {cfg.eos_id}); "
            "use the tokenizer saved with the model"
        )
    sources = tok.encode_ordinary_batch(list(texts))
    for i, s in enumerate(sources):
        if not s:
            raise ValueError(f"text {i} is empty; nothing to translate")
    out = model.translate(
        sources,
        max_new_tokens=max_new_tokens,
        beam_size=beam_size,
        length_penalty=length_penalty,
        batch_size=batch_size,
    )
    return [tok.decode(o) for o in out]


def evaluate_translation(
    model,
    tok,
    pairs: Sequence[Tuple[str, str]],
    beam_size: int = 1,
    batch_size: int = 64,
    max_new_tokens: Optional[int] = None,
) -> Dict[str, Any]:
    """Translates the sources of ``pairs`` and scores them against the targets: corpus BLEU
    and chrF (equal to sacrebleu's), exact match (whole string), the wall time and a few
    examples."""
    from ..metrics import corpus_bleu, corpus_chrf

    t0 = time.perf_counter()
    hyps = translate_texts(
        model, tok, [s for s, _ in pairs], beam_size=beam_size, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    dt = time.perf_counter() - t0
    refs = [t for _, t in pairs]
    wrong = [(s, h, r) for (s, r), h in zip(pairs, hyps) if h != r]
    return {
        "n": len(pairs),
        "bleu": corpus_bleu(hyps, [refs]),
        "chrf": corpus_chrf(hyps, [refs]),
        "exact_match": sum(h == r for h, r in zip(hyps, refs)) / len(refs),
        "beam_size": beam_size,
        "seconds": dt,
        "sentences_per_s": len(pairs) / dt if dt > 0 else math.inf,
        "errors": [{"source": s, "output": h, "reference": r} for s, h, r in wrong[:10]],
    }


MODEL_KINDS = ("transformer", "lstm")


def build_model(kind: str, tok, max_len: int = 64, **sizes: Any):
    """A fresh :class:`~ferrolm.models.seq2seq.Seq2SeqTransformer` (``kind="transformer"``) or
    :class:`~ferrolm.models.seq2seq.Seq2SeqLSTM` (``"lstm"``) for tokenizer ``tok`` (one vocabulary,
    shared embeddings, tied output layer for the Transformer). ``sizes`` are config fields
    (``n_layer``, ``n_head``, ``n_embd``, ``ff_size``, ``hidden_size``, ``num_layers``,
    ``dropout``, ...); unset ones take this recipe's defaults, sized for two CPU cores."""
    from ..models import Seq2SeqLSTM, Seq2SeqLSTMConfig, Seq2SeqTransformer, Seq2SeqTransformerConfig

    ids = special_ids(tok)
    V = tok.n_vocab
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if kind == "transformer":
        kw: Dict[str, Any] = dict(
            n_layer=3,
            n_head=4,
            n_embd=256,
            ff_size=1024,
            dropout=0.1,
            norm_first=True,
            shared_embeddings=True,
            tie_output=True,
        )
        kw.update(sizes)
        return Seq2SeqTransformer(
            Seq2SeqTransformerConfig(src_vocab_size=V, tgt_vocab_size=V, max_len=max_len, **ids, **kw)
        )
    if kind == "lstm":
        kw = dict(n_embd=256, hidden_size=512, num_layers=2, dropout=0.1, shared_embeddings=True)
        kw.update(sizes)
        return Seq2SeqLSTM(Seq2SeqLSTMConfig(src_vocab_size=V, tgt_vocab_size=V, max_len=max_len, **ids, **kw))
    raise ValueError(f"unknown seq2seq model {kind!r}; expected one of {MODEL_KINDS}")


def train_seq2seq(
    kind: str = "transformer",
    task: Optional[TranslationTask] = None,
    out_dir=None,
    steps: int = 1500,
    batch_size: int = 128,
    lr: Optional[float] = None,
    vocab_size: int = 512,
    seed: int = 0,
    resume: bool = False,
    beam_size: int = 4,
    checkpoint_interval: int = 250,
    progress: bool = True,
    tokenizer=None,
    **sizes: Any,
) -> Dict[str, Any]:
    """Trains a seq2seq model on ``task`` (default: :func:`number_task`) with ferrolm's trainer
    and scores it on the held-out test pairs (greedy and beam search): the recipe behind
    ``ferrolm train seq2seq``.

    ``tokenizer``: a ferrolm Tokenizer with ``<pad>``, ``<s>`` and ``</s>`` special tokens (default:
    one trained on the task by :func:`train_tokenizer` with ``vocab_size`` tokens).

    Writes to ``out_dir`` (when given) ``model.safetensors``, ``tokenizer.json``, the trainer's
    checkpoint (``resume=True`` continues it exactly) and ``results.json``; returns the results:
    BLEU, chrF and exact match on the test pairs, validation loss, parameters, steps, wall time,
    training tokens/s (real tokens, both sides).

    Raises:
        ValueError: an unknown ``kind``, pairs longer than the model's max_len.
    """
    import torch

    from ..training import TrainConfig, train
    from ..training.batches import batches_for
    from ..training.distributed import output_lock

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown seq2seq model {kind!r}; expected one of {MODEL_KINDS}")
    task = task or number_task(seed=seed)
    out = Path(out_dir) if out_dir is not None else None
    tok_path = out / "tokenizer.json" if out is not None else None
    saved = resume and tokenizer is None and tok_path is not None and tok_path.is_file()
    if tokenizer is not None:
        special_ids(tokenizer)  # raises when the special tokens are missing
        tok = tokenizer
    elif saved:
        from ..tokenizer import Tokenizer

        tok = Tokenizer.from_hf_json(tok_path)
    else:
        tok = train_tokenizer(task.train, vocab_size)
    train_ids = encode_pairs(tok, task.train)
    valid_ids = encode_pairs(tok, task.valid) if task.valid else None
    longest = max(max(len(s), len(t) + 1) for s, t in train_ids + (valid_ids or []))
    torch.manual_seed(seed)
    model = build_model(kind, tok, max_len=max(64, 2 * longest), **sizes)
    lr = lr if lr is not None else (1e-3 if kind == "transformer" else 3e-3)
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(100, steps // 10 + 1),
        weight_decay=0.01,
        eval_interval=max(1, steps // 10),
        eval_batches=4,
        checkpoint_interval=checkpoint_interval if out is not None else 0,
        seed=seed,
        progress=progress,
    )
    batches_for(train_ids, cfg, 0, 1, model=model)  # too few pairs for a batch: refused before any write
    if resume and (out is None or not (out / "train_state.pt").is_file()):
        raise FileNotFoundError(f"nothing to resume: {out} holds no train_state.pt")
    # Everything is checked: the run starts, and only now writes into out (locked for the run).
    with output_lock(out) if out is not None else contextlib.nullcontext():
        if tok_path is not None and not saved:
            tok.save_hf_json(tok_path)
        first_step: List[int] = []
        t0 = time.perf_counter()
        result = train(
            model,
            train_ids,
            valid_ids if valid_ids and len(valid_ids) >= batch_size else None,
            cfg,
            out_dir=out,
            resume=resume,
            callback=lambda step, _m: first_step.append(step) if not first_step else None,
        )
        train_s = time.perf_counter() - t0
        ran = result.step - (first_step[0] - 1 if first_step else result.step)
        real = sum(len(s) + len(t) + 1 for s, t in train_ids) / len(train_ids)  # real tokens per pair, both sides
        step_s = sorted(h["tokens_per_s"] for h in result.history[-50:])
        results: Dict[str, Any] = {
            "task": task.description,
            "model": kind,
            "config": model.config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": result.step,
            "batch_size": batch_size,
            "lr": lr,
            "train_seconds": train_s,
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "val_loss": result.evals[-1]["val_loss"] if result.evals else None,
            "train_pairs": len(task.train),
            "real_tokens_per_pair": real,
            "real_tokens_per_s": ran * batch_size * real / train_s if train_s > 0 else None,
            "positions_per_s_median": step_s[len(step_s) // 2] if step_s else None,
            "interrupted": result.interrupted,
        }
        # Outputs may run a few tokens past the longest training target, not to max_len.
        limit = min(model.config.max_len, max(len(t) for _, t in train_ids) + 8)
        results["test"] = {"greedy": evaluate_translation(model, tok, task.test, max_new_tokens=limit)}
        if beam_size > 1:
            results["test"][f"beam{beam_size}"] = evaluate_translation(
                model, tok, task.test, beam_size=beam_size, batch_size=16, max_new_tokens=limit
            )
        if out is not None:
            atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    return results
