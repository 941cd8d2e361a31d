"""LSTM / GRU benchmarks: ferrolm.nn vs torch.nn (same weights, same threads), inference and
training, dense and variable-length batches. Workloads from ferrolm.bench (shared with
``ferrolm bench``). Targets (issue 4): batch <= 8 forward >= 2x, fwd+bwd >= 1.5x; batch >= 32
>= 1.0x; variable lengths fwd+bwd >= 4x torch with PackedSequence."""

from __future__ import annotations

import pytest

from conftest import FULL

torch = pytest.importorskip("torch")
from ferrolm.bench import rnn_workloads  # noqa: E402

_WORK = {}


def _work(smoke):
    if smoke not in _WORK:
        _WORK[smoke] = rnn_workloads(smoke=smoke, full=FULL)
    return _WORK[smoke]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        smoke = bool(metafunc.config.getoption("benchmark_disable", False))
        cases = _work(smoke)
        metafunc.parametrize("case", range(len(cases)), ids=[c["name"] for c in cases])


@pytest.mark.parametrize("impl", ["ferrolm", "torch"])
def test_rnn(benchmark, case, impl, smoke):
    w = _work(smoke)[case]
    benchmark.group = w["name"]
    if w["flops"]:
        benchmark.extra_info["gflop"] = w["flops"] / 1e9
    benchmark(w["fns"][impl])
