"""ICL scoring benchmark (issue 8 target): 4-choice, 8-shot multiple-choice scoring with the
shared-prefix cache >= 3x the same evaluation done naively with transformers (a full forward
per choice), same weights. Workload from ferrolm.bench (shared with ``ferrolm bench``)."""

from __future__ import annotations

import pytest

from conftest import FULL

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from ferrolm.bench import icl_workloads  # noqa: E402

_WORK = {}


def _work(smoke):
    if smoke not in _WORK:
        _WORK[smoke] = icl_workloads(smoke=smoke, full=FULL)
    return _WORK[smoke]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        smoke = bool(metafunc.config.getoption("benchmark_disable", False))
        pairs = [(i, impl) for i, c in enumerate(_work(smoke)) for impl in c["fns"]]
        metafunc.parametrize("case,impl", pairs, ids=[f"{_work(smoke)[i]['name']}-{impl}" for i, impl in pairs])


def test_icl(benchmark, case, impl, smoke):
    w = _work(smoke)[case]
    benchmark.group = w["name"]
    benchmark.extra_info["questions"] = w["questions"]
    benchmark.pedantic(w["fns"][impl], rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1)
