"""The benchmark suite behind ``ferrolm bench``: ferrolm against the tools people use today,
same data, same vocabulary, same run, reported as ratios of medians.

The workloads live here so the command (quick table) and ``benchmarks/`` (pytest-benchmark)
measure the same things. Peers that are not installed are skipped with a note.

Vocabularies: GPT-2 (``r50k_base``) and ``cl100k_base`` rank files are looked for in
``$FERROLM_DATA_DIR`` and ``../shared/data``; without them a 32k vocabulary is trained on the
embedded corpus and given to every library, so the comparison is still like for like.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ._io import atomic_write
from .corpus import chinese_text, stdlib_texts
from .tokenizer import CL100K_PATTERN, GPT2_PATTERN, Tokenizer

__all__ = ["run_benchmarks", "model_workloads", "seq2seq_workloads", "icl_workloads", "finetune_workloads", "markdown_report", "plot_ratios", "AREAS", "tokenizer_peers", "corpus_for_bench", "time_median", "compare", "Result"]


@dataclass
class Result:
    """One benchmark row: median seconds per contender, and ferrolm's speed-up over each."""

    area: str
    workload: str
    size: str
    seconds: Dict[str, float] = field(default_factory=dict)

    def ratios(self) -> Dict[str, float]:
        ours = self.seconds.get("ferrolm")
        if not ours:
            return {}
        return {k: v / ours for k, v in self.seconds.items() if k != "ferrolm"}


def time_median(fn: Callable[[], object], repeats: int = 5, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def compare(contenders: Dict[str, Callable[[], object]], repeats: int = 5, warm: bool = True, inner: int = 1) -> Dict[str, float]:
    """Median wall time of each contender, the runs interleaved (A B C A B C ...) so that
    drift on a noisy machine hits all of them alike; one warm-up run each first. A pause
    before each run lets the previous contender's idle worker threads (rayon, OpenMP) stop
    spinning: on 2 cores they otherwise steal time from whoever runs next. With ``warm``, an
    untimed run comes right before each timed one, so each contender starts with its own
    tables in cache (a short workload otherwise measures the previous contender's cache
    evictions: seen as 2x on 5,000 one-line documents); ``inner`` runs per timing for
    operations of microseconds. As in ``timeit``,
    the cyclic garbage collector is off while a run is timed (and run between runs), so a
    collection over the benchmark's own data is not charged to whoever happens to trigger it."""
    for fn in contenders.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    enabled = gc.isenabled()
    try:
        for _ in range(repeats):
            for k, fn in contenders.items():
                time.sleep(0.05)
                if warm:
                    fn()
                gc.collect()
                gc.disable()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[k].append((time.perf_counter() - t0) / inner)
                if enabled:
                    gc.enable()
    finally:
        if enabled:
            gc.enable()
    return {k: statistics.median(v) for k, v in times.items()}


def find_data_dir() -> Optional[Path]:
    """The folder holding ``gpt2.tiktoken`` / ``cl100k_base.tiktoken``, if any."""
    candidates = [os.environ.get("FERROLM_DATA_DIR"), Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    for c in candidates:
        if c and (Path(c) / "gpt2.tiktoken").is_file():
            return Path(c)
    return None


CL100K_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


def corpus_for_bench(max_bytes: Optional[int] = None) -> List[str]:
    """The embedded corpus: Chinese prose, then standard-library sources."""
    return [chinese_text()] + stdlib_texts(max_bytes)


def tokenizer_peers(vocab: str, tmpdir: Path) -> Tuple[Tokenizer, object, object]:
    """(ferrolm, tiktoken or None, HF tokenizers or None) on the same vocabulary.

    Args:
        vocab: "gpt2", "cl100k_base" or "trained32k".
    """
    data_dir = find_data_dir()
    if vocab == "trained32k" or data_dir is None:
        tok = Tokenizer.train(corpus_for_bench(20_000_000), 32_000, special_tokens=["<|endoftext|>"], show_progress=False)
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

        ranks = {tok.decode_single_token_bytes(i): i for i in range(tok.n_vocab) if i not in tok._id_to_special and _has(tok, i)}
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


def _has(tok: Tokenizer, i: int) -> bool:
    return tok._core.token_bytes(i) is not None


def _encode_results(vocab: str, docs_long: List[str], docs_short: List[str], tiny: List[str], tmpdir: Path, repeats: int) -> List[Result]:
    tok, tt, hf = tokenizer_peers(vocab, tmpdir)
    out = []
    n_long = sum(len(d.encode()) for d in docs_long)
    n_short = sum(len(d.encode()) for d in docs_short)

    def loop(fn):
        return lambda docs: (lambda: [fn(d) for d in docs])

    contenders_1t = {"ferrolm": tok.encode_ordinary}
    if tt is not None:
        contenders_1t["tiktoken"] = tt.encode_ordinary
    if hf is not None:
        contenders_1t["hf_tokenizers"] = lambda d: hf.encode(d, add_special_tokens=False)
    for name, docs, nbytes in [("encode long docs (>=4 KB), 1 thread", docs_long, n_long), ("encode short docs (one line), 1 thread", docs_short, n_short)]:
        r = Result("tokenizer", f"{vocab}: {name}", f"{len(docs)} docs, {nbytes / 1e6:.1f} MB")
        r.seconds = compare({k: loop(fn)(docs) for k, fn in contenders_1t.items()}, repeats)
        out.append(r)
    batch = {"ferrolm": lambda docs: tok.encode_ordinary_batch(docs, num_threads=2)}
    if tt is not None:
        batch["tiktoken"] = lambda docs: tt.encode_ordinary_batch(docs, num_threads=2)
    if hf is not None:
        batch["hf_tokenizers"] = lambda docs: hf.encode_batch(docs, add_special_tokens=False)
    for name, docs, size in [("encode_batch long docs, 2 threads", docs_long, f"{n_long / 1e6:.1f} MB"), ("encode_batch 10,000 tiny strings, 2 threads", tiny, f"{len(tiny)} strings")]:
        r = Result("tokenizer", f"{vocab}: {name}", size)
        r.seconds = compare({k: (lambda fn=fn, docs=docs: fn(docs)) for k, fn in batch.items()}, repeats)
        out.append(r)
    worst = "x" * 1_000_000
    r = Result("tokenizer", f"{vocab}: worst case, 1 MB with no split point", "1 MB")
    worst_contenders = {"ferrolm": lambda: tok.encode_ordinary(worst)}
    if tt is not None:
        worst_contenders["tiktoken"] = lambda: tt.encode_ordinary(worst)
    r.seconds = compare(worst_contenders, 3, warm=False)
    out.append(r)
    return out


def _training_result(mbytes: int, vocab_size: int, repeats: int) -> Tuple[Result, Dict[str, float]]:
    """Training on ``mbytes`` MB of the corpus (repeated if needed), and bytes per token on
    held-out files for each trainer."""
    docs = stdlib_texts()
    held, train_docs = docs[-50:], [chinese_text()] + docs[:-50]
    data, total = [], 0
    while total < mbytes * 1_000_000:
        for d in train_docs:
            data.append(d)
            total += len(d.encode())
            if total >= mbytes * 1_000_000:
                break
    r = Result("tokenizer", f"train {vocab_size} vocab", f"{total / 1e6:.0f} MB")
    nbytes = sum(len(d.encode()) for d in held)
    bpt = {}
    trained = {}

    def ours():
        trained["ferrolm"] = Tokenizer.train(data, vocab_size, show_progress=False)

    r.seconds["ferrolm"] = time_median(ours, repeats)
    bpt["ferrolm"] = nbytes / sum(map(len, trained["ferrolm"].encode_ordinary_batch(held)))
    try:
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        def hf():
            t = HfTokenizer(models.BPE())
            t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            t.train_from_iterator(data, trainer)
            trained["hf"] = t

        r.seconds["hf_tokenizers"] = time_median(hf, max(1, repeats - 2))
        bpt["hf_tokenizers"] = nbytes / sum(len(e.ids) for e in trained["hf"].encode_batch(held))
    except ImportError:
        pass
    try:
        import rustbpe

        def rb():
            t = rustbpe.Tokenizer()
            t.train_from_iterator(iter(data), vocab_size)

        r.seconds["rustbpe"] = time_median(rb, max(1, repeats - 2))
    except ImportError:
        pass
    return r, bpt


def data_workloads(smoke: bool = False, full: bool = False) -> Dict[str, Any]:
    """The batching workloads: a collate of 64 sequences of 16-512 ids (ferrolm's pad on the
    numpy arrays ferrolm's datasets yield; torch's ``pad_sequence`` + mask on tensors; the same
    logic in plain Python on lists), packing (ferrolm vs a Python loop), and shard writing vs
    encoding alone."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from .data import pack, pad, write_shards

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 50_000, n) for n in rng.integers(16, 513, 64)]
    tensors = [torch.from_numpy(a) for a in arrays]
    lists = [a.tolist() for a in arrays]

    def torch_collate(batch):
        ids = pad_sequence(batch, batch_first=True, padding_value=0)
        lengths = torch.tensor([len(x) for x in batch])
        mask = (torch.arange(ids.size(1))[None, :] < lengths[:, None]).long()
        return ids, mask

    def python_collate(batch):
        width = max(len(x) for x in batch)
        ids = [list(x) + [0] * (width - len(x)) for x in batch]
        mask = [[1] * len(x) + [0] * (width - len(x)) for x in batch]
        return torch.tensor(ids), torch.tensor(mask)

    def ferrolm_collate(batch):
        return pad(batch, return_tensors="pt")

    pack_mb = 0.5 if smoke else 100 if full else 8
    n_tokens = int(pack_mb * 1e6 / 4)  # uint32 ids
    lens = rng.integers(50, 5000, n_tokens // 2500 + 1)
    lens = lens[: np.searchsorted(np.cumsum(lens), n_tokens) + 1]
    flat = rng.integers(0, 50_000, int(lens.sum())).astype(np.uint32)
    docs = np.split(flat, np.cumsum(lens)[:-1])

    def python_pack(docs, block_size=1024, eos=50_256):
        # The same outputs as ferrolm's pack, in straightforward Python (list and range
        # operations per document, per token only where the logic needs it).
        stream, owner, position = [], [], []
        for i, d in enumerate(docs):
            stream.extend(d.tolist())
            stream.append(eos)
            owner.extend([i] * (len(d) + 1))
            position.extend(range(len(d) + 1))
        rows = (len(stream) - 1) // block_size
        x, y, pos, doc = [], [], [], []
        for r in range(rows):
            a, b = r * block_size, (r + 1) * block_size
            x.append(stream[a:b])
            y.append(stream[a + 1 : b + 1])
            first = position[a]
            pos.append([p - first if owner[a + k] == owner[a] else p for k, p in enumerate(position[a:b])])
            doc.append(owner[a:b])
        return np.array(x), np.array(y), np.array(pos), np.array(doc)

    texts = stdlib_texts(200_000 if smoke else 10_000_000)
    tok = Tokenizer.train(texts[:50], 4096, special_tokens=["<|endoftext|>"], show_progress=False)
    shard_mb = sum(len(t.encode()) for t in texts) / 1e6
    return {
        "collate": {"ferrolm": (ferrolm_collate, arrays), "torch_pad_sequence": (torch_collate, tensors), "python": (python_collate, lists)},
        "pack": {"ferrolm": (lambda d: pack(d, 1024, eos_id=50_256), docs), "python": (python_pack, docs)},
        "pack_mb": pack_mb,
        "shards": {
            "ferrolm": lambda out: write_shards(tok, texts, out, show_progress=False),
            "encode_only": lambda out: tok.encode_ordinary_batch(texts),
        },
        "shard_mb": shard_mb,
    }


def rnn_workloads(smoke: bool = False, full: bool = False) -> List[Dict[str, Any]]:
    """LSTM/GRU workloads: ferrolm.nn vs torch.nn (oneDNN for LSTM, native for GRU), same
    weights, same threads (``torch.get_num_threads()``), inference (no_grad) and training
    (forward + backward), dense batches and a variable-length packed batch."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    from . import nn as fnn

    # (batch, steps, input, hidden, layers)
    shapes = [(1, 64, 32, 32, 1), (4, 32, 32, 32, 2)] if smoke else [(1, 512, 256, 256, 1), (8, 256, 256, 256, 1), (64, 128, 256, 256, 1)]
    if full:
        shapes += [(1, 512, 512, 512, 1), (8, 256, 512, 512, 1), (32, 128, 512, 512, 1), (8, 256, 256, 256, 2), (32, 128, 512, 512, 2)]
    out = []
    g = torch.Generator().manual_seed(0)
    for kind, torch_cls, ours_cls, gates in (("LSTM", torch.nn.LSTM, fnn.LSTM, 4), ("GRU", torch.nn.GRU, fnn.GRU, 3)):
        for b, t, i, h, layers in shapes:
            ref = torch_cls(i, h, num_layers=layers)
            ours = ours_cls(i, h, num_layers=layers)
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(t, b, i, generator=g)
            xg = x.clone().requires_grad_(True)
            flops = 2.0 * t * b * (i + h) * gates * h + 2.0 * t * b * 2 * h * gates * h * (layers - 1)
            shape = f"B={b} T={t} I={i} H={h}" + (f" L={layers}" if layers > 1 else "")

            def infer(m, x=x):
                with torch.no_grad():
                    return m(x)

            def train(m, xg=xg):
                m(xg)[0].sum().backward()

            # Defaults bind this iteration's functions and modules (closures bind late).
            out.append({"name": f"{kind} {shape}: forward (no_grad)", "flops": flops,
                        "fns": {"ferrolm": lambda m=ours, f=infer: f(m), "torch": lambda m=ref, f=infer: f(m)}})
            out.append({"name": f"{kind} {shape}: forward+backward", "flops": 3 * flops,
                        "fns": {"ferrolm": lambda m=ours, f=train: f(m), "torch": lambda m=ref, f=train: f(m)}})
    b, t, i, h = (4, 32, 32, 32) if smoke else (16, 256, 512, 512) if full else (16, 128, 256, 256)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    lengths[0] = t
    x = torch.randn(t, b, i, generator=g, requires_grad=True)
    for kind, torch_cls, ours_cls in (("LSTM", torch.nn.LSTM, fnn.LSTM), ("GRU", torch.nn.GRU, fnn.GRU)):
        ref = torch_cls(i, h)
        ours = ours_cls(i, h)
        ours.load_state_dict(ref.state_dict())

        def packed_train(m, x=x, lengths=lengths):
            m(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data.sum().backward()

        out.append({"name": f"{kind} PackedSequence B={b} T={t} H={h}, lengths 25-100%: forward+backward", "flops": None,
                    "fns": {"ferrolm": lambda m=ours, f=packed_train: f(m), "torch": lambda m=ref, f=packed_train: f(m)}})
    return out


def attention_workloads(smoke: bool = False, full: bool = False) -> List[Dict[str, Any]]:
    """Attention workloads: ferrolm.ops.attention vs torch's scaled_dot_product_attention (CPU
    flash kernel), same threads: causal and full, forward and forward+backward, 40% key
    padding."""
    import torch
    import torch.nn.functional as F

    from .ops import attention

    g = torch.Generator().manual_seed(0)
    lengths = [64] if smoke else [512, 1024] + ([2048] if full else [])
    out = []
    for t in lengths:
        b, h, d = 2, 8, 64
        q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
        for causal in (True, False):
            flops = 4.0 * b * h * t * t * d * (0.5 if causal else 1.0)
            tag = "causal" if causal else "full"

            def fwd_ours(causal=causal, q=q, k=k, v=v):
                return attention(q, k, v, causal=causal)

            def fwd_torch(causal=causal, q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def bwd_ours(causal=causal, q=qg, k=kg, v=vg):
                attention(q, k, v, causal=causal).sum().backward()

            def bwd_torch(causal=causal, q=qg, k=kg, v=vg):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

            out.append({"name": f"attention {tag} B={b} H={h} T={t} D={d}: forward", "flops": flops, "fns": {"ferrolm": fwd_ours, "torch_sdpa": fwd_torch}})
            out.append({"name": f"attention {tag} B={b} H={h} T={t} D={d}: forward+backward", "flops": 3.5 * flops, "fns": {"ferrolm": bwd_ours, "torch_sdpa": bwd_torch}})
        pad = torch.zeros(b, t, dtype=torch.bool)
        pad[:, int(t * 0.6):] = True
        allowed = ~pad[:, None, None, :]

        def pad_ours(q=q, k=k, v=v, pad=pad):
            return attention(q, k, v, key_padding_mask=pad)

        def pad_torch(q=q, k=k, v=v, allowed=allowed):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

        out.append({"name": f"attention 40% key padding B={b} H={h} T={t} D={d}: forward", "flops": None, "fns": {"ferrolm": pad_ours, "torch_sdpa": pad_torch}})
    from .ops import decode_attention

    b, h, cap, d = (2, 4, 64, 16) if smoke else (8, 12, 2048, 64)
    qd = torch.randn(b, h, 1, d, generator=g)
    kc, vc = torch.randn(b, h, cap, d, generator=g), torch.randn(b, h, cap, d, generator=g)
    lengths = [cap] * b

    def dec_ours(qd=qd, kc=kc, vc=vc, lengths=lengths):
        return decode_attention(qd, kc, vc, lengths)

    def dec_torch(qd=qd, kc=kc, vc=vc):
        return F.scaled_dot_product_attention(qd, kc, vc)

    mb = 2 * b * h * cap * d * 4 / 1e6
    out.append({"name": f"decode B={b} H={h} cache={cap} D={d} ({mb:.0f} MB of cache)", "flops": None, "fns": {"ferrolm": dec_ours, "torch_sdpa": dec_torch}})
    return out


def _train_step(model, x, y) -> Callable[[], None]:
    """One optimizer step (forward with targets, backward, AdamW on the trainable parameters)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        _, loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def model_workloads(smoke: bool = False, full: bool = False) -> List[Dict[str, Any]]:
    """End-to-end workloads: one training step (forward, backward, AdamW) of ferrolm's GPT and
    LSTM language model against their plain-PyTorch twins in :mod:`ferrolm.reference` (same
    weights, same batch), and batch-1 greedy generation with a KV cache against transformers'
    ``GPT2LMHeadModel.generate`` on the same GPT-2-shaped weights."""
    import torch

    from . import reference
    from .generate import generate
    from .models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel

    g = torch.Generator().manual_seed(0)
    out: List[Dict[str, Any]] = []
    V = 512 if smoke else 8192

    if smoke:
        gcfg, (gb, gt) = GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=32), (2, 32)
        lcfg, (lb, lt) = LSTMConfig(vocab_size=V, n_embd=32, hidden_size=32, num_layers=2), (4, 16)
    else:
        gcfg, (gb, gt) = GPTConfig(vocab_size=V, block_size=256, n_layer=6, n_head=6, n_embd=384), (8, 256)
        lcfg, (lb, lt) = LSTMConfig(vocab_size=V, n_embd=512, hidden_size=512, num_layers=2), (16, 128)
    for label, cfg, ours_cls, ref_cls, (b, t) in (
        (f"GPT {gcfg.n_layer}x{gcfg.n_embd} T={gt} B={gb} V={V}", gcfg, GPT, reference.GPT, (gb, gt)),
        (f"LSTM LM {lcfg.num_layers}x{lcfg.hidden_size} T={lt} B={lb} V={V}", lcfg, LSTMLanguageModel, reference.LSTMLanguageModel, (lb, lt)),
    ):
        torch.manual_seed(0)
        ours = ours_cls(cfg)
        ref = ref_cls(cfg)
        ref.load_state_dict(ours.state_dict())
        x = torch.randint(0, V, (b, t), generator=g)
        y = torch.randint(0, V, (b, t), generator=g)
        out.append({"name": f"train step {label}", "tokens": b * t, "flops": None,
                    "fns": {"ferrolm": _train_step(ours, x, y), "reference": _train_step(ref, x, y)}})
    try:
        import transformers
    except ImportError:
        return out
    if smoke:
        hcfg, new, plen = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=V), 4, 8
    elif full:
        hcfg, new, plen = dict(n_layer=12, n_embd=768, n_head=12), 64, 32
    else:
        hcfg, new, plen = dict(n_layer=6, n_embd=384, n_head=6), 32, 32
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hcfg, bos_token_id=None, eos_token_id=None)).eval()
    ours = GPT.from_hf_gpt2(hf).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (1, plen), generator=g)
    mask = torch.ones_like(prompt)

    def gen_ours():
        return generate(ours, prompt, new, temperature=0)

    def gen_hf():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    shape = f"{hcfg['n_layer']}x{hcfg['n_embd']} V={hf.config.vocab_size}"
    out.append({"name": f"generate B=1 greedy, GPT-2-shaped {shape}, prompt {plen} + {new} new tokens", "tokens": new, "flops": None,
                "fns": {"ferrolm": gen_ours, "transformers": gen_hf}})
    return out


def seq2seq_workloads(smoke: bool = False, full: bool = False) -> List[Dict[str, Any]]:
    """Encoder-decoder workloads on the embedded translation task (English -> French number
    words, ferrolm's BPE): training steps of ferrolm's Seq2SeqTransformer against the same
    model on ``torch.nn.Transformer`` (SDPA inside; :class:`ferrolm.reference.Seq2SeqTransformer`,
    same weights, same eight batches of 128 pairs, dropout 0.1 as torch.nn.Transformer's default;
    the size column counts their real tokens, so the ratio is the ratio of real tokens/s), and
    greedy translation of 32 sources at once with
    the KV cache and cross-attention keys computed once, against the reference decoding without
    a cache (the whole model re-run on the target prefix at every step)."""
    import torch

    from . import reference
    from .seq2seq import Seq2SeqTransformer, Seq2SeqTransformerConfig, decode_uncached, greedy_decode
    from .train import Seq2SeqBatches
    from .translation import encode_pairs, number_task, special_ids, train_tokenizer

    task = number_task(n_train=2_000 if smoke else 20_000, n_valid=10, n_test=64)
    tok = train_tokenizer(task.train, 512)
    ids = special_ids(tok)
    B, n_batches = (16, 2) if smoke else (128, 8)
    batches = Seq2SeqBatches(encode_pairs(tok, task.train), B, **ids, seed=0)
    data = [batches.next() for _ in range(n_batches)]
    real = sum(int((s != ids["pad_id"]).sum()) + int((y != -100).sum()) for (s, _), y in data)
    if smoke:
        sizes = dict(n_layer=1, n_head=2, n_embd=32, ff_size=64)
    elif full:
        sizes = dict(n_layer=6, n_head=8, n_embd=512, ff_size=2048)
    else:
        sizes = dict(n_layer=3, n_head=4, n_embd=256, ff_size=1024)
    cfg = Seq2SeqTransformerConfig(src_vocab_size=tok.n_vocab, tgt_vocab_size=tok.n_vocab, max_len=64, dropout=0.1, norm_first=True,
                                   shared_embeddings=True, tie_output=True, **ids, **sizes)
    torch.manual_seed(0)
    ours = Seq2SeqTransformer(cfg)
    ref = reference.Seq2SeqTransformer(cfg)
    ref.load_state_dict(ours.state_dict())

    def steps(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            model.train()  # dropout 0.1 on both sides, torch.nn.Transformer's default
            for (src, tgt), y in data:
                _, loss = model(src, tgt, targets=y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return run

    shape = f"{cfg.n_layer}+{cfg.n_layer} layers x {cfg.n_embd}"
    out: List[Dict[str, Any]] = [{"name": f"seq2seq Transformer training, {shape}, {n_batches} steps x {B} pairs (embedded task)",
                                  "tokens": real, "fns": {"ferrolm": steps(ours), "torch.nn.Transformer": steps(ref)}}]
    sources = [s for s, _ in encode_pairs(tok, task.test[: 8 if smoke else 32])]
    new = 8 if smoke else 24
    out.append({"name": f"seq2seq greedy translation, batch {len(sources)}, {new} tokens, KV cache vs none, {shape}",
                "tokens": len(sources), "fns": {"ferrolm": lambda: greedy_decode(ours, sources, new, batch_size=32),
                                                "no_cache": lambda: decode_uncached(ref, sources, new)}})
    return out


def icl_workloads(smoke: bool = False, full: bool = False) -> List[Dict[str, Any]]:
    """Multiple-choice scoring as in k-shot evaluation: 4 choices after 8 demonstrations,
    either retrieved per question (different contexts) or fixed (one prefix shared by all).
    ferrolm's :class:`~ferrolm.icl.LM` runs each question's shared context once (and a prefix
    common to all questions once) and scores the choices from its KV cache; the peer is the
    same evaluation done the plain way with
    transformers (each choice a full forward of context + choice, the 4 choices of a question
    batched with an attention mask), on the same GPT-2-shaped weights."""
    import torch

    try:
        import transformers
    except ImportError:
        return []
    from .icl import LM
    from .models import GPT

    g = torch.Generator().manual_seed(0)
    if smoke:
        hcfg, questions, shot_len = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=512), 2, 6
    else:
        hcfg, questions, shot_len = dict(n_layer=6, n_embd=384, n_head=6), (16 if full else 8), 30
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hcfg, bos_token_id=None, eos_token_id=None)).eval()
    ours = GPT.from_hf_gpt2(hf).eval()
    V = hf.config.vocab_size
    demo_pool = [torch.randint(0, V, (shot_len,), generator=g).tolist() for _ in range(32)]
    lm = LM(ours)

    def requests(same_demos: bool):
        reqs = []
        for q in range(questions):
            picks = range(8) if same_demos else torch.randperm(32, generator=g)[:8].tolist()
            ctx = [t for i in picks for t in demo_pool[i]] + torch.randint(0, V, (20,), generator=g).tolist()
            for _c in range(4):
                reqs.append((ctx, torch.randint(0, V, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()))
        return reqs

    def run_hf(reqs):
        out = []
        with torch.no_grad():
            for q in range(0, len(reqs), 4):
                rows = [c + t for c, t in reqs[q : q + 4]]
                T = max(len(r) for r in rows)
                ids = torch.zeros(len(rows), T, dtype=torch.long)
                mask = torch.zeros(len(rows), T, dtype=torch.long)
                for i, r in enumerate(rows):
                    ids[i, : len(r)] = torch.tensor(r)
                    mask[i, : len(r)] = 1
                logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits, -1)
                for i, (c, t) in enumerate(reqs[q : q + 4]):
                    pos = torch.arange(len(c) - 1, len(c) - 1 + len(t))
                    out.append(float(logp[i, pos, torch.tensor(t)].sum()))
        return out

    shape = f"{hcfg['n_layer']}x{hcfg['n_embd']} V={V}"
    out = []
    for same, label in ((False, "demonstrations retrieved per question"), (True, "the same 8 demonstrations for every question")):
        reqs = requests(same)
        out.append({"name": f"4-choice 8-shot scoring, {label}, GPT-2-shaped {shape}, context {len(reqs[0][0])} tokens",
                    "questions": questions,
                    "fns": {"ferrolm": (lambda r=reqs: lm.loglikelihood(r)), "transformers_naive": (lambda r=reqs: run_hf(r))}})
    return out


def finetune_workloads(smoke: bool = False, full: bool = False) -> List[Dict[str, Any]]:
    """One training step (forward, backward, AdamW) of LoRA (r=8 on attention and MLP
    projections) against full fine-tuning of the same GPT, same batch. The size column gives
    the trainable parameters, the gradient + Adam state each method keeps (bytes of fp32) and
    the peak resident memory its first two steps added (measured)."""
    import torch

    from ._memory import PeakMemory
    from .finetune import apply_lora, prepare, trainable_parameters
    from .models import GPT, GPTConfig

    g = torch.Generator().manual_seed(0)
    if smoke:
        cfg, (b, t) = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32), (2, 32)
    else:
        cfg, (b, t) = GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384), (8, 256)
    torch.manual_seed(0)
    full_model = GPT(cfg)
    lora_model = GPT(cfg)
    lora_model.load_state_dict(full_model.state_dict())
    apply_lora(lora_model, r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    prepare(lora_model, "lora")
    x = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    y = torch.randint(0, cfg.vocab_size, (b, t), generator=g)

    tl, total = trainable_parameters(lora_model)
    state_mb = lambda n: 3 * 4 * n / 1e6  # noqa: E731  (gradient + two Adam moments, fp32)
    fns = {"ferrolm": _train_step(lora_model, x, y), "full_finetune": _train_step(full_model, x, y)}
    peak = {}
    for key, fn in fns.items():  # the first two steps: activations, gradients and the optimizer's state appear
        with PeakMemory() as mem:
            fn()
            fn()
        peak[key] = "n/a" if mem.peak_bytes is None else f"{mem.peak_bytes / 1e6:.0f} MB"
    size = (f"LoRA {tl / 1e6:.2f}M trainable ({100 * tl / total:.1f}%, {state_mb(tl):.0f} MB state, peak +{peak['ferrolm']}) "
            f"vs full {total / 1e6:.1f}M ({state_mb(total):.0f} MB state, peak +{peak['full_finetune']})")
    return [{"name": f"train step, LoRA r=8 vs full fine-tuning, GPT {cfg.n_layer}x{cfg.n_embd} T={t} B={b}", "size": size, "fns": fns}]


def _results(area: str, workloads: List[Dict[str, Any]], size: Callable[[Dict[str, Any]], str], repeats: int,
             warm: bool = True) -> List[Result]:
    """One row per workload: its ``size`` label and the contenders' median seconds."""
    out = []
    for w in workloads:
        r = Result(area, w["name"], size(w))
        r.seconds = compare(w["fns"], repeats, warm=warm)
        out.append(r)
    return out


def _unit_results(area: str, workloads: List[Dict[str, Any]], unit: str, repeats: int) -> List[Result]:
    """Rows for workloads of whole operations (seconds each): no warm run before each timing."""
    return _results(area, workloads, lambda w: w[unit] if unit == "size" else f"{w[unit]} {unit}", repeats, warm=False)


def _flop_results(area: str, workloads: List[Dict[str, Any]], repeats: int, no_flops: str) -> List[Result]:
    return _results(area, workloads, lambda w: f"{w['flops'] / 1e9:.2f} GFLOP" if w["flops"] else no_flops, repeats)


def _data_results(full: bool, repeats: int) -> List[Result]:
    import tempfile

    w = data_workloads(full=full)
    out = []
    r = Result("data", "collate: batch 64, lengths 16-512", "64 seqs")
    r.seconds = compare({k: (lambda f=f, a=a: f(a)) for k, (f, a) in w["collate"].items()}, repeats * 3, inner=200)
    out.append(r)
    r = Result("data", "pack into 1024-token rows", f"{w['pack_mb']:.0f} MB")
    r.seconds = compare({k: (lambda f=f, a=a: f(a)) for k, (f, a) in w["pack"].items()}, 1 if full else repeats)
    out.append(r)
    r = Result("data", "write shards (peer: encode only)", f"{w['shard_mb']:.0f} MB text")
    with tempfile.TemporaryDirectory() as tmp:
        r.seconds = compare({"ferrolm": lambda: w["shards"]["ferrolm"](Path(tmp)), "encode_only": lambda: w["shards"]["encode_only"](None)}, repeats)
    out.append(r)
    return out


AREAS = ("tokenizer", "data", "rnn", "attention", "models", "seq2seq", "icl", "finetune")


def run_benchmarks(full: bool = False, json_path: Optional[str] = None, areas: Tuple[str, ...] = AREAS,
                   report: Optional[str] = None, plot: Optional[str] = None, repeats: Optional[int] = None) -> List[Result]:
    """Runs the suite, prints a table, and returns the rows.

    Args:
        full: the whole grid (both real vocabularies, 100 MB training) instead of the quick set.
        json_path: also write the rows (with ratios) to this JSON file.
        areas: which of ``AREAS`` to run.
        report: also write a Markdown report here. plot: and a bar chart of the ratios (PNG).
        repeats: timed runs per contender (default 3, 7 with ``full``); more steadies the
            medians on a noisy machine.
    """
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    unknown = sorted(set(areas) - set(AREAS))
    if unknown:
        raise ValueError(f"unknown benchmark areas {unknown}; choose from {list(AREAS)}")
    import tempfile

    results: List[Result] = []
    extra: Dict[str, object] = {}
    docs = stdlib_texts(None if full else 6_000_000)
    docs_long = [d for d in docs if len(d.encode()) >= 4096][: (None if full else 300)]
    lines = [ln for d in docs[:400] for ln in d.splitlines() if 40 <= len(ln) <= 200]
    docs_short = (lines + chinese_text().splitlines())[:20_000 if full else 5_000]
    words = [w for ln in lines for w in ln.split()]
    tiny = (words * (10_000 // max(1, len(words)) + 1))[:10_000]
    if repeats is None:
        repeats = 7 if full else 3
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        if "tokenizer" in areas:
            vocabs = ["gpt2", "cl100k_base"] if find_data_dir() else ["trained32k"]
            if not full:
                vocabs = vocabs[:1]
            for v in vocabs:
                results += _encode_results(v, docs_long, docs_short, tiny, tmpdir, repeats)
            r, bpt = _training_result(100 if full else 10, 32_000 if full else 8_000, 3 if full else 2)
            results.append(r)
            extra["bytes_per_token_held_out"] = bpt
        if "attention" in areas:
            try:
                results += _flop_results("attention", attention_workloads(full=full), repeats, "-")
            except ImportError:
                print("attention benchmarks skipped: torch is not installed")
        if "rnn" in areas:
            try:
                results += _flop_results("rnn", rnn_workloads(full=full), repeats, "var-len")
            except ImportError:
                print("rnn benchmarks skipped: torch is not installed")
        if "data" in areas:
            try:
                results += _data_results(full, repeats)
            except ImportError:
                print("data benchmarks skipped: torch is not installed")
        if "models" in areas:
            try:
                results += _unit_results("models", model_workloads(full=full), "tokens", 3 if full else 2)
            except ImportError:
                print("model benchmarks skipped: torch is not installed")
        if "seq2seq" in areas:
            try:
                results += _unit_results("seq2seq", seq2seq_workloads(full=full), "tokens", 3)
            except ImportError:
                print("seq2seq benchmarks skipped: torch is not installed")
        if "finetune" in areas:
            try:
                results += _unit_results("finetune", finetune_workloads(full=full), "size", 3)
            except ImportError:
                print("finetune benchmarks skipped: torch is not installed")
        if "icl" in areas:
            try:
                results += _unit_results("icl", icl_workloads(full=full), "questions", 3)
            except ImportError:
                print("icl benchmarks skipped: torch is not installed")
    _print_table(results, extra)
    if json_path:
        payload = {"results": [dict(asdict(r), ratios=r.ratios()) for r in results], "extra": extra}
        atomic_write(json_path, json.dumps(payload, indent=2).encode())
    if report:
        atomic_write(report, markdown_report(results, extra, full).encode())
        print(f"wrote {report}")
    if plot:
        if plot_ratios(results, plot):
            print(f"wrote {plot}")
    return results


def machine_summary() -> str:
    """One line on the machine and library versions the numbers come from."""
    import platform

    parts = [f"{os.cpu_count()} CPUs", platform.machine(), f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    for mod in ("tiktoken", "tokenizers", "transformers"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    parts.insert(0, line.split(":", 1)[1].strip())
                    break
    except OSError:
        pass
    return ", ".join(parts)


def markdown_report(results: List[Result], extra: Dict[str, object], full: bool) -> str:
    """The results as a Markdown document: one table per area, ferrolm's speed-up per peer."""
    lines = ["# ferrolm benchmark report", "", f"Mode: {'full' if full else 'quick'}. Machine: {machine_summary()}.", "",
             "Ratio = peer median time / ferrolm median time (above 1: ferrolm is faster). Runs interleaved, medians.", ""]
    for area in dict.fromkeys(r.area for r in results):
        rows = [r for r in results if r.area == area]
        peers = sorted({k for r in rows for k in r.seconds if k != "ferrolm"})
        lines += [f"## {area}", "", "| workload | size | ferrolm ms | " + " | ".join(f"{p} ms" for p in peers) + " | "
                  + " | ".join(f"x vs {p}" for p in peers) + " |", "|" + "---|" * (3 + 2 * len(peers))]
        for r in rows:
            ratios = r.ratios()
            cells = [r.workload, r.size, f"{r.seconds['ferrolm'] * 1e3:.4g}"]
            cells += [f"{r.seconds[p] * 1e3:.4g}" if p in r.seconds else "-" for p in peers]
            cells += [f"**{ratios[p]:.2f}x**" if p in ratios else "-" for p in peers]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for k, v in extra.items():
        lines.append(f"- {k}: " + ", ".join(f"{a}={b:.4f}" for a, b in v.items()))  # type: ignore[union-attr]
    return "\n".join(lines) + "\n"


def plot_ratios(results: List[Result], path: str) -> bool:
    """A horizontal bar chart of ferrolm's speed-up per workload and peer (log scale, a line
    at 1x); returns False (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    bars = [(f"[{r.area}] {r.workload} vs {p}", ratio, r.area) for r in results for p, ratio in r.ratios().items()]
    if not bars:
        return False
    areas = list(dict.fromkeys(a for _, _, a in bars))
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(areas)}
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(bars) + 1.5))
    y = list(range(len(bars)))[::-1]
    ax.barh(y, [b[1] for b in bars], color=[colors[b[2]] for b in bars])
    ax.set_yticks(y)
    ax.set_yticklabels([b[0][:110] for b in bars], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("speed-up of ferrolm (peer time / ferrolm time, log scale)")
    ax.set_title("ferrolm vs references, same machine, same run")
    for yi, (_, ratio, _a) in zip(y, bars):
        ax.text(ratio, yi, f" {ratio:.2f}x", va="center", fontsize=7)
    fig.subplots_adjust(left=0.5, right=0.97, top=1 - 0.6 / fig.get_figheight(), bottom=0.7 / fig.get_figheight())
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True


def _print_table(results: List[Result], extra: Dict[str, object]) -> None:
    areas = list(dict.fromkeys(r.area for r in results))
    for area in areas:
        rows_in = [r for r in results if r.area == area]
        peers = sorted({k for r in rows_in for k in r.seconds if k != "ferrolm"})
        head = ["workload", "size", "ferrolm ms"] + [f"{p} ms" for p in peers] + [f"x vs {p}" for p in peers]
        rows = []
        for r in rows_in:
            ratios = r.ratios()
            rows.append(
                [r.workload, r.size, f"{r.seconds['ferrolm'] * 1e3:.4g}"]
                + [f"{r.seconds[p] * 1e3:.4g}" if p in r.seconds else "-" for p in peers]
                + [f"{ratios[p]:.2f}x" if p in ratios else "-" for p in peers]
            )
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        print(f"\n[{area}]")
        print(fmt.format(*head))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print(fmt.format(*row))
    for k, v in extra.items():
        print(f"{k}: " + ", ".join(f"{a}={b:.4f}" for a, b in v.items()))  # type: ignore[union-attr]
    print("x vs peer = peer time / ferrolm time (higher is better for ferrolm); medians of repeated runs.")
