"""The one timing harness of the benchmark suite: a :class:`Workload` is a set of zero-argument contenders (ferrolm
and the peers doing the same job), :func:`compare` times them interleaved in one run, and a :class:`Result` keeps each
contender's median seconds and ferrolm's speed-up over each peer. ``ferrolm bench`` times workloads with
:func:`measure`; the pytest wrappers in ``benchmarks/`` hand the same contenders to pytest-benchmark instead.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

__all__ = ["Workload", "Result", "time_median", "compare", "measure"]


@dataclass
class Workload:
    """One comparison: contenders doing the same job on the same inputs, and how to time them.

    Attributes:
        name: what is measured, e.g. ``"LSTM B=1 T=512 I=256 H=256: forward (no_grad)"``.
        fns: contender name -> zero-argument callable; ``"ferrolm"`` is the baseline of the ratios.
        size: the report's size column, e.g. ``"2.15 GFLOP"``, ``"2048 tokens"``.
        info: the same size as numbers (``gflop``, ``tokens``, ``questions``), for pytest-benchmark's extra_info.
        warm: run each contender untimed right before each timed run (False for whole operations of seconds).
        inner: runs per timing, for operations of microseconds.
    """

    name: str
    fns: Dict[str, Callable[[], object]]
    size: str = ""
    info: Dict[str, float] = field(default_factory=dict)
    warm: bool = True
    inner: int = 1


@dataclass
class Result:
    """One benchmark row: median seconds per contender, and ferrolm's speed-up over each."""

    area: str
    workload: str
    size: str
    seconds: Dict[str, float] = field(default_factory=dict)

    def ratios(self) -> Dict[str, float]:
        """Peer name -> peer median / ferrolm median (above 1: ferrolm is faster); empty without ferrolm."""
        ours = self.seconds.get("ferrolm")
        if not ours:
            return {}
        return {k: v / ours for k, v in self.seconds.items() if k != "ferrolm"}


def time_median(fn: Callable[[], object], repeats: int = 5, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (at least ``min_time`` seconds, at most 200 runs) after
    one warm-up run."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def compare(
    contenders: Dict[str, Callable[[], object]], repeats: int = 5, warm: bool = True, inner: int = 1
) -> Dict[str, float]:
    """Median wall time of each contender over ``repeats`` timed runs, after one warm-up run each.

    The runs are interleaved (A B C A B C ...) so that drift on a noisy machine hits all contenders alike. A 50 ms
    pause before each run lets the previous contender's idle worker threads (rayon, OpenMP) stop spinning; on 2 cores
    they otherwise steal time from whoever runs next. With ``warm``, an untimed run comes right before each timed one,
    so each contender starts with its own tables in cache rather than paying for the previous one's evictions. As in
    ``timeit``, the cyclic garbage collector is off while a run is timed (and runs between runs).

    Args:
        contenders: name -> zero-argument callable.
        repeats: timed runs per contender, >= 1.
        warm: an untimed run right before each timed one.
        inner: calls per timed run (the time is divided by it), for operations of microseconds.

    Returns:
        name -> median seconds per call.
    """
    for fn in contenders.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    enabled = gc.isenabled()
    try:
        for _ in range(repeats):
            for k, fn in contenders.items():
                time.sleep(0.05)
                if warm:
                    fn()
                gc.collect()
                gc.disable()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[k].append((time.perf_counter() - t0) / inner)
                if enabled:
                    gc.enable()
    finally:
        if enabled:
            gc.enable()
    return {k: statistics.median(v) for k, v in times.items()}


def measure(area: str, workload: Workload, repeats: int) -> Result:
    """The result row of ``workload``: its contenders timed with :func:`compare` (``repeats`` timed runs each)."""
    seconds = compare(workload.fns, repeats, warm=workload.warm, inner=workload.inner)
    return Result(area, workload.name, workload.size, seconds)
