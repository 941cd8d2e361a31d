"""The benchmark suite behind ``ferrolm bench`` and ``benchmarks/``: ferrolm against the tools people use today
(tiktoken, HF tokenizers, rustbpe, torch, transformers) on the same data in the same run, reported as ratios of
medians. :mod:`.workloads` defines what is compared, one module per area; :mod:`.harness` is the one timing loop;
:mod:`.report` renders the ratio lines, tables, Markdown report and chart; :mod:`.runner` holds
:func:`run_benchmarks`, which prints each workload's line as it is timed and each area's table as it finishes.
Peers that are not installed are left out of the comparison.
"""

from __future__ import annotations

from .harness import Result, Workload, compare, measure, time_median
from .report import markdown_report, plot_ratios
from .runner import AREAS, run_benchmarks
from .workloads import (
    attention_workloads,
    corpus_for_bench,
    data_workloads,
    finetune_workloads,
    icl_workloads,
    model_workloads,
    rnn_workloads,
    seq2seq_workloads,
    tokenizer_peers,
)

__all__ = [
    "run_benchmarks",
    "AREAS",
    "Result",
    "Workload",
    "compare",
    "measure",
    "time_median",
    "markdown_report",
    "plot_ratios",
    "attention_workloads",
    "corpus_for_bench",
    "data_workloads",
    "finetune_workloads",
    "icl_workloads",
    "model_workloads",
    "rnn_workloads",
    "seq2seq_workloads",
    "tokenizer_peers",
]
