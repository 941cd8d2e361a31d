"""Batching benchmarks: ferrolm.data vs a typical pure-PyTorch collate and vs the same logic in
plain Python, same inputs, same run.

Targets (issue 3): collate of batch 64 with lengths 16-512 >= 10x both; packing 100 MB of
tokens >= 10x the Python version (``FERROLM_BENCH_FULL=1``; the quick run packs 8 MB);
writing shards at the tokenizer's speed (compare ``shards`` with ``encode only``).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FULL
from ferrolm.bench import data_workloads

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def work(smoke):
    return data_workloads(smoke=smoke, full=FULL)


@pytest.mark.parametrize("impl", ["ferrolm", "torch_pad_sequence", "python"])
def test_collate_batch64(benchmark, work, impl):
    benchmark.group = "collate: batch 64, lengths 16-512"
    fn, arg = work["collate"][impl]
    benchmark(fn, arg)


@pytest.mark.parametrize("impl", ["ferrolm", "python"])
def test_pack(benchmark, work, impl):
    fn, arg = work["pack"][impl]
    benchmark.group = f"pack {work['pack_mb']:.0f} MB of tokens into 1024-token rows"
    benchmark.pedantic(fn, args=(arg,), rounds=1 if impl == "python" else 3, iterations=1)


@pytest.mark.parametrize("impl", ["ferrolm", "encode_only"])
def test_write_shards(benchmark, work, impl, tmp_path):
    fn = work["shards"][impl]
    benchmark.group = f"write shards from {work['shard_mb']:.0f} MB of text (encode_only = the tokenizer alone)"
    benchmark.pedantic(fn, args=(tmp_path,), rounds=3, iterations=1)
