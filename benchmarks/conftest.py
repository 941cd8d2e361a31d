"""pytest-benchmark set-up: every benchmark here times one contender (``impl``) of a workload built by
:mod:`ferrolm.bench.workloads`, ferrolm and its peers in the same session; the summary prints ferrolm's speed-up over
each peer (ratio of medians) per workload through :func:`ferrolm.bench.report.ratio_line`, the renderer of
``ferrolm bench``'s progress lines. ``FERROLM_BENCH_FULL=1`` selects the full sizes; ``--benchmark-disable`` (the CI
smoke) runs each once on small inputs."""

from __future__ import annotations

import os
from typing import Any, Dict

import pytest

from ferrolm.bench.harness import Result, Workload
from ferrolm.bench.report import ratio_line

FULL = os.environ.get("FERROLM_BENCH_FULL") == "1"


def pytest_configure(config):
    # As timeit does: a cyclic-GC pass over the session's data is not charged to the code that happens to trigger it.
    if hasattr(config.option, "benchmark_disable_gc"):
        config.option.benchmark_disable_gc = True


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    return bool(request.config.getoption("benchmark_disable", False))


def run_workload(benchmark, area: str, w: Workload, impl: str, **pedantic: Any) -> None:
    """Times contender ``impl`` of ``w`` with pytest-benchmark (``benchmark.pedantic(**pedantic)`` when given), grouped
    by workload; skips when that peer is not installed."""
    if impl not in w.fns:
        pytest.skip(f"{impl} is not installed")
    benchmark.group = f"{w.name} ({w.size})" if w.size else w.name
    benchmark.extra_info.update(w.info, area=area, workload=w.name, size=w.size)
    if pedantic:
        benchmark.pedantic(w.fns[impl], **pedantic)
    else:
        benchmark(w.fns[impl])


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows: Dict[str, Result] = {}
    for b in session.benchmarks:
        impl = (b.params or {}).get("impl")
        if not b or impl is None:
            continue
        info = b.extra_info
        if b.group not in rows:
            rows[b.group] = Result(info.get("area", ""), info.get("workload", b.group), info.get("size", ""))
        row = rows[b.group]
        row.seconds[impl] = b["median"]
    lines = [ratio_line(r) for r in sorted(rows.values(), key=lambda r: (r.area, r.workload)) if "ferrolm" in r.seconds]
    if lines:
        terminalreporter.section("ferrolm vs peers (peer median / ferrolm median)")
        for line in lines:
            terminalreporter.write_line(line)
