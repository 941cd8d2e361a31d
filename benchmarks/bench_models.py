"""End-to-end benchmarks (issue 6 targets): training tokens/s of ferrolm's GPT (6 layers, 384
wide, T=256) and LSTM LM (2x512, batch 16) >= 1.5x their plain-PyTorch twins in
ferrolm.reference; batch-1 greedy generation with a KV cache >= 3x transformers' generate on
the same GPT-2-shaped weights. Workloads from ferrolm.bench (shared with ``ferrolm bench``)."""

from __future__ import annotations

import pytest

from conftest import FULL

torch = pytest.importorskip("torch")
from ferrolm.bench import model_workloads  # noqa: E402

_WORK = {}


def _work(smoke):
    if smoke not in _WORK:
        _WORK[smoke] = model_workloads(smoke=smoke, full=FULL)
    return _WORK[smoke]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        smoke = bool(metafunc.config.getoption("benchmark_disable", False))
        pairs = [(i, impl) for i, c in enumerate(_work(smoke)) for impl in c["fns"]]
        names = [f"{_work(smoke)[i]['name']}-{impl}" for i, impl in pairs]
        metafunc.parametrize("case,impl", pairs, ids=names)


def test_models(benchmark, case, impl, smoke):
    w = _work(smoke)[case]
    benchmark.group = w["name"]
    benchmark.extra_info["tokens"] = w["tokens"]
    benchmark.pedantic(w["fns"][impl], rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1)
