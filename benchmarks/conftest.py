"""pytest-benchmark set-up: every benchmark here runs ferrolm and its peers in the same session,
parametrised by ``impl``; the summary prints ferrolm's speed-up over each peer (ratio of
medians) per group. ``FERROLM_BENCH_FULL=1`` selects the full sizes; ``--benchmark-disable``
(the CI smoke) runs each once on small inputs."""

from __future__ import annotations

import os

import pytest

FULL = os.environ.get("FERROLM_BENCH_FULL") == "1"


def pytest_configure(config):
    # As timeit does: a cyclic-GC pass over the session's data is not charged to the code
    # that happens to trigger it.
    if hasattr(config.option, "benchmark_disable_gc"):
        config.option.benchmark_disable_gc = True


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    return bool(request.config.getoption("benchmark_disable", False))


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for b in session.benchmarks:
        if not b:
            continue
        impl = (b.params or {}).get("impl")
        groups.setdefault(b.group, {})[impl] = b["median"]
    lines = []
    for group, medians in sorted(groups.items(), key=lambda kv: str(kv[0])):
        ours = medians.get("ferrolm")
        if not ours:
            continue
        ratios = ", ".join(f"{k}: {v / ours:.2f}x" for k, v in sorted(medians.items()) if k != "ferrolm")
        lines.append(f"{group}: ferrolm {ours * 1e3:.2f} ms; speed-up vs {ratios}")
    if lines:
        terminalreporter.section("ferrolm vs peers (peer median / ferrolm median)")
        for line in lines:
            terminalreporter.write_line(line)
