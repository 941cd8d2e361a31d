"""``ferrolm finetune experiment``: lightweight fine-tuning against full fine-tuning and
in-context learning on one task, with one small pretrained GPT.

Steps (all on the embedded data, nothing downloaded): train a byte-level BPE tokenizer and
pretrain a GPT on the embedded corpus; adapt copies of it to the embedded classification task
(which standard-library package a code snippet comes from) with full fine-tuning, LoRA
(r = 4, 8, 16), BitFit, prompt tuning and head-only, each trained on the task's pool rendered
as text and scored zero-shot by label-word likelihood on the held-out test set; and score the
pretrained model itself with k-shot in-context learning (k = 0, 4, 16). One table: accuracy,
trainable parameters (count, %), wall time, and the gradient + AdamW state each method keeps
(fp32 bytes, computed from the trainable count).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from . import finetune as ft
from ._io import PathLike, atomic_write
from .corpus import default_corpus
from .icl import LM, evaluate_classification
from .icl.tasks import stdlib_package_task
from .models import GPT, GPTConfig
from .tokenizer import Tokenizer
from .train import TrainConfig, train

__all__ = ["run_experiment"]


def _tokens(tok: Tokenizer, texts: List[str]) -> np.ndarray:
    eot = tok.special_tokens.get("<|endoftext|>")
    return np.asarray([t for ids in tok.encode_ordinary_batch(texts) for t in ids + ([eot] if eot is not None else [])], dtype=np.int64)


def run_experiment(out_dir: PathLike = "docs/results", quick: bool = False, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    """Runs the comparison and writes ``finetune.json``, ``finetune.md`` and ``finetune.png``
    into ``out_dir``; returns the results. ``quick`` shrinks every stage (for tests)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    corpus = default_corpus(2_000_000 if quick else None)
    tok = Tokenizer.train(corpus, vocab_size=1024 if quick else 4096, special_tokens=["<|endoftext|>"])
    corpus_ids = _tokens(tok, corpus)
    cfg = GPTConfig(vocab_size=tok.n_vocab, block_size=128 if quick else 256, n_layer=2 if quick else 4, n_head=4,
                    n_embd=64 if quick else 256)
    base = GPT(cfg)
    t0 = time.perf_counter()
    pre_steps = 30 if quick else 400
    train(base, corpus_ids, config=TrainConfig(max_steps=pre_steps, batch_size=16, seq_len=cfg.block_size, lr=1e-3, min_lr=1e-4,
                                               warmup_steps=pre_steps // 10, eval_interval=0, seed=seed, progress=progress))
    pretrain_s = time.perf_counter() - t0
    pool, test, template = stdlib_package_task(per_class=10 if quick else 40, test_per_class=4 if quick else 10, seed=seed)
    task_ids = _tokens(tok, [template.render_demo(e) for e in pool])
    steps = 20 if quick else 300
    tcfg = TrainConfig(max_steps=steps, batch_size=8, seq_len=64, lr=1e-3, min_lr=1e-4, warmup_steps=steps // 10,
                       eval_interval=0, seed=seed, progress=progress)
    methods = [("full fine-tuning", "full", {}), ("LoRA r=4", "lora", {"r": 4}), ("LoRA r=8", "lora", {"r": 8}),
               ("LoRA r=16", "lora", {"r": 16}), ("BitFit", "bitfit", {}), ("prompt tuning (16 tokens)", "prompt", {"n": 16}),
               ("head-only", "head", {})]
    rows: List[Dict[str, Any]] = []
    for label, method, opts in methods:
        model = copy.deepcopy(base)
        target: torch.nn.Module = model
        if method == "lora":
            ft.apply_lora(model, r=opts["r"], alpha=2.0 * opts["r"], target_modules=["c_attn", "c_proj", "c_fc"])
        elif method == "prompt":
            target = ft.PromptTuning(model, opts["n"], seed=seed)
        ft.prepare(target, method)
        trainable, total = ft.trainable_parameters(target)
        lr = 1e-2 if method in ("prompt", "bitfit") else (3e-3 if method == "lora" else 1e-3)
        t0 = time.perf_counter()
        train(target, task_ids, config=TrainConfig(**{**tcfg.__dict__, "lr": lr, "min_lr": lr / 10}))
        wall = time.perf_counter() - t0
        res = evaluate_classification(LM(target), tok, pool, test, template, k=0)
        rows.append({"method": label, "accuracy": res.accuracy, "macro_f1": res.macro_f1, "trainable": trainable, "total": total,
                     "trainable_pct": 100.0 * trainable / total, "train_seconds": wall, "state_mb": 12 * trainable / 1e6})
    for k in (0, 4, 16):
        t0 = time.perf_counter()
        res = evaluate_classification(LM(base), tok, pool, test, template, k=k, retriever="random", seed=seed)
        rows.append({"method": f"in-context learning, k={k}", "accuracy": res.accuracy, "macro_f1": res.macro_f1, "trainable": 0,
                     "total": ft.trainable_parameters(base)[1], "trainable_pct": 0.0, "train_seconds": 0.0,
                     "eval_seconds": time.perf_counter() - t0, "state_mb": 0.0, "truncated_prompts": res.truncated})
    results = {"model": cfg.to_dict(), "pretrain_steps": pre_steps, "pretrain_seconds": pretrain_s, "finetune_steps": steps,
               "task": {"classes": template.choices(), "pool": len(pool), "test": len(test), "chance": 1 / len(template.choices())},
               "rows": rows}
    atomic_write(out / "finetune.json", json.dumps(results, indent=2).encode())
    atomic_write(out / "finetune.md", markdown(results).encode())
    _plot(results, out / "finetune.png")
    return results


def markdown(results: Dict[str, Any]) -> str:
    """The comparison table."""
    lines = ["| method | accuracy | macro-F1 | trainable params | trainable % | train time (s) | grad + AdamW state (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
                     f"{r['train_seconds']:.1f} | {r['state_mb']:.1f} |")
    t = results["task"]
    lines.append("")
    lines.append(f"Task: {len(t['classes'])} classes ({', '.join(t['classes'])}), {t['pool']} training / {t['test']} test examples, "
                 f"chance {t['chance']:.3f}. Model: GPT {results['model']['n_layer']}x{results['model']['n_embd']}, "
                 f"pretrained {results['pretrain_steps']} steps ({results['pretrain_seconds']:.0f} s); "
                 f"each method trained {results['finetune_steps']} steps.")
    return "\n".join(lines) + "\n"


def _plot(results: Dict[str, Any], path: Path) -> None:
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["method"] for r in rows][::-1], [r["accuracy"] for r in rows][::-1], color="tab:blue")
    ax.axvline(results["task"]["chance"], color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("accuracy (held-out test)")
    ax.set_title("fine-tuning methods vs in-context learning, same pretrained GPT")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
