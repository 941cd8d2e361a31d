"""Attention benchmarks: ferrolm.ops.attention vs torch's scaled_dot_product_attention (CPU),
same threads. Workloads from ferrolm.bench. Targets (issue 5): causal forward and fwd+bwd at
T in {512, 1024}, D=64 >= 1.8x; full forward >= 1.2x; 40% key padding >= 1.5x."""

from __future__ import annotations

import pytest

from conftest import FULL

torch = pytest.importorskip("torch")
from ferrolm.bench import attention_workloads  # noqa: E402

_WORK = {}


def _work(smoke):
    if smoke not in _WORK:
        _WORK[smoke] = attention_workloads(smoke=smoke, full=FULL)
    return _WORK[smoke]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        smoke = bool(metafunc.config.getoption("benchmark_disable", False))
        cases = _work(smoke)
        metafunc.parametrize("case", range(len(cases)), ids=[c["name"] for c in cases])


@pytest.mark.parametrize("impl", ["ferrolm", "torch_sdpa"])
def test_attention(benchmark, case, impl, smoke):
    w = _work(smoke)[case]
    benchmark.group = w["name"]
    if w["flops"]:
        benchmark.extra_info["gflop"] = w["flops"] / 1e9
    benchmark(w["fns"][impl])
