"""``ferrolm bench``: runs the chosen areas' workloads and prints as it goes, to stdout, flushed. Each area opens
with a ``[area] setting up ...`` line, each workload prints one ratio line as soon as it is timed (area, workload,
size, ferrolm's median, each peer's ratio), each area's table follows as soon as the area finishes, and the
Markdown report, the chart and the JSON file are written at the end.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .._io import atomic_write
from . import report as _report
from .harness import Result
from .workloads import attention, data, finetune, icl, llama, models, quant, rnn, seq2seq, tokenizer

__all__ = ["AREAS", "run_benchmarks"]

AREAS = ("tokenizer", "data", "rnn", "attention", "models", "seq2seq", "icl", "finetune", "llama", "quant")

Extra = Dict[str, Dict[str, float]]

# Area -> the generator that times its workloads, in the order the suite runs them.
_RUNNERS: Dict[str, Callable[[bool, int, Extra], Iterator[Result]]] = {
    "tokenizer": tokenizer.run,
    "attention": attention.run,
    "rnn": rnn.run,
    "data": data.run,
    "models": models.run,
    "seq2seq": seq2seq.run,
    "finetune": finetune.run,
    "icl": icl.run,
    "llama": llama.run,
    "quant": quant.run,
}


def _say(line: str) -> None:
    print(line, flush=True)


def run_benchmarks(
    full: bool = False,
    json_path: Optional[str] = None,
    areas: Tuple[str, ...] = AREAS,
    report: Optional[str] = None,
    plot: Optional[str] = None,
    repeats: Optional[int] = None,
) -> List[Result]:
    """Runs the suite, printing a line per workload and a table per area as they finish; returns the rows.

    Args:
        full: the whole grid (both real vocabularies, 100 MB training, larger shapes) instead of the quick set.
        json_path: also write the rows (with ratios) and the extra measurements to this JSON file.
        areas: which of ``AREAS`` to run (they run in a fixed order whatever the order given).
        report: also write a Markdown report here.
        plot: also write a bar chart of the ratios here (PNG; skipped with a note without matplotlib).
        repeats: timed runs per contender (default 3, 7 with ``full``); more steadies the medians on a noisy
            machine. Areas of whole training steps or evaluations use their own fixed counts.

    Returns:
        One :class:`~ferrolm.bench.harness.Result` per workload, in the order run.

    Raises:
        ValueError: ``repeats`` below 1, or an area not in ``AREAS``.

    Example:
        >>> rows = run_benchmarks(areas=("data",), repeats=1)  # doctest: +SKIP
        [data] setting up ...
        [data] collate: batch 64, lengths 16-512 (64 seqs): ferrolm 0.02652 ms | python 529.04x | ...
        [data] pack into 1024-token rows (8 MB): ferrolm 85.74 ms | python 7.61x
    """
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    unknown = sorted(set(areas) - set(AREAS))
    if unknown:
        raise ValueError(f"unknown benchmark areas {unknown}; choose from {list(AREAS)}")
    if repeats is None:
        repeats = 7 if full else 3
    chosen = ", ".join(a for a in _RUNNERS if a in areas)
    _say(f"ferrolm bench ({'full' if full else 'quick'}, {repeats} repeats): {chosen}")
    _say(_report.LEGEND)
    results: List[Result] = []
    extra: Extra = {}
    for area, run in _RUNNERS.items():
        if area not in areas:
            continue
        _say(f"[{area}] setting up ...")
        rows: List[Result] = []
        before = set(extra)
        try:
            for r in run(full, repeats, extra):
                rows.append(r)
                _say(_report.ratio_line(r))
        except ImportError as e:
            _say(f"[{area}] benchmarks skipped: {e} (pip install 'ferrolm[bench]')")
        results += rows
        if rows:
            lines = [_report.text_table(rows)] + _report.extra_lines({k: extra[k] for k in extra if k not in before})
            _say("\n" + "\n".join(lines) + "\n")
    _say(_report.LEGEND)
    if json_path:
        payload = {"results": [dict(asdict(r), ratios=r.ratios()) for r in results], "extra": extra}
        atomic_write(json_path, json.dumps(payload, indent=2).encode())
        _say(f"wrote {json_path}")
    if report:
        atomic_write(report, _report.markdown_report(results, extra, full).encode())
        _say(f"wrote {report}")
    if plot and _report.plot_ratios(results, plot):
        _say(f"wrote {plot}")
    return results
