"""Kernel benchmarks, ferrolm vs torch on the same inputs and threads (workloads from
:mod:`ferrolm.bench.workloads`, shared with ``ferrolm bench``):

- LSTM / GRU vs torch.nn (issue 4 targets: batch <= 8 forward >= 2x, fwd+bwd >= 1.5x; batch >= 32 >= 1.0x;
  variable lengths fwd+bwd >= 4x torch with PackedSequence).
- attention vs scaled_dot_product_attention (issue 5 targets: causal forward and fwd+bwd at T in {512, 1024}, D=64
  >= 1.8x; full forward >= 1.2x; 40% key padding >= 1.5x; decode >= 3x).
"""

from __future__ import annotations

import pytest
from conftest import FULL, run_workload

torch = pytest.importorskip("torch")
from ferrolm.bench.workloads import attention_workloads, rnn_workloads  # noqa: E402

_LOADERS = {"rnn": rnn_workloads, "attention": attention_workloads}
_WORK = {}


def _work(family, smoke):
    key = (family, smoke)
    if key not in _WORK:
        _WORK[key] = _LOADERS[family](smoke=smoke, full=FULL)
    return _WORK[key]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        family = metafunc.function.__name__.removeprefix("test_")
        smoke = bool(metafunc.config.getoption("benchmark_disable", False))
        cases = _work(family, smoke)
        metafunc.parametrize("case", range(len(cases)), ids=[c.name for c in cases])


@pytest.mark.parametrize("impl", ["ferrolm", "torch"])
def test_rnn(benchmark, case, impl, smoke):
    run_workload(benchmark, "rnn", _work("rnn", smoke)[case], impl)


@pytest.mark.parametrize("impl", ["ferrolm", "torch_sdpa"])
def test_attention(benchmark, case, impl, smoke):
    run_workload(benchmark, "attention", _work("attention", smoke)[case], impl)
