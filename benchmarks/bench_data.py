"""Batching benchmarks: ferrolm.data vs a typical pure-PyTorch collate and vs the same logic in plain Python, same
inputs, same run (workloads from :mod:`ferrolm.bench.workloads.data`, shared with ``ferrolm bench``).

Targets (issue 3): collate of batch 64 with lengths 16-512 >= 10x both; packing 100 MB of tokens >= 10x the Python
version (``FERROLM_BENCH_FULL=1``; the quick run packs 8 MB); writing shards at the tokenizer's speed (compare
``ferrolm`` with ``encode_only`` in the shards group).
"""

from __future__ import annotations

import pytest
from conftest import FULL, run_workload

from ferrolm.bench.workloads import data_workloads

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def work(smoke, tmp_path_factory):
    return data_workloads(tmp_path_factory.mktemp("shards"), smoke=smoke, full=FULL)


@pytest.mark.parametrize("impl", ["ferrolm", "torch_pad_sequence", "python"])
def test_collate_batch64(benchmark, work, impl):
    run_workload(benchmark, "data", work["collate"], impl)


@pytest.mark.parametrize("impl", ["ferrolm", "python"])
def test_pack(benchmark, work, impl):
    run_workload(benchmark, "data", work["pack"], impl, rounds=1 if impl == "python" else 3, iterations=1)


@pytest.mark.parametrize("impl", ["ferrolm", "encode_only"])
def test_write_shards(benchmark, work, impl):
    run_workload(benchmark, "data", work["shards"], impl, rounds=3, iterations=1)
