"""Sizes and counts that overflow, cannot be allocated or are negative, and shards that shrink
while open: each gives a clear exception naming the argument (ValueError, MemoryError,
FormatError), never a signal, an abort or a hang. Cases that used to crash the interpreter run
in a subprocess, one per family, printing one JSON line per case."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrolm import FormatError
from ferrolm.data import BucketBatchSampler, TokenShard, lm_windows, pack, pad, write_shards

#: Sizes past any real batch: int32, 2**40 (aborted), 2**61 (segfault), 2**62 (capacity
#: overflow), the int64 / uint64 edges and beyond.
HUGE = [2**31, 2**40, 2**61, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100]
NEGATIVE = [-1, -(2**31), -(2**63), -(2**64), -(2**100)]

#: Runs `CASES` (a JSON list of [function, kwargs]) one by one, printing each outcome as soon as
#: it is known, so a crash names the case that caused it.
RUNNER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from ferrolm.data import TokenShard, lm_windows, pack, pad

    SEQS = [[1, 2, 3], [4, 5], [6]]
    CALLS = {
        "pad": lambda kw: pad(np.array(kw.pop("_rows")) if "_rows" in kw else SEQS, **kw),
        "pack": lambda kw: pack(SEQS, eos_id=0, **kw),
        "lm_windows": lambda kw: lm_windows(list(range(50)), **kw),
        "blocks": lambda kw: TokenShard(os.environ["SHARD"]).blocks(**kw),
        "random_batch": lambda kw: TokenShard(os.environ["SHARD"]).random_batch(
            rng=np.random.default_rng(0), **kw
        ),
    }
    SETUP
    for i, (fn, kw) in enumerate(json.loads(sys.argv[1])):
        try:
            out = CALLS[fn](dict(kw))
            print(json.dumps({"case": i, "type": None, "msg": repr(type(out))}), flush=True)
        except Exception as e:
            print(json.dumps({"case": i, "type": type(e).__name__, "msg": str(e)}), flush=True)
    """
)


def run_cases(cases: List[Any], setup: str = "", env: Dict[str, str] | None = None) -> List[Dict[str, Any]]:
    """Runs the cases in a fresh interpreter; asserts it exits cleanly and answers each one."""
    code = RUNNER.replace("SETUP", setup)
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    crashed = cases[len(done)] if len(done) < len(cases) else None
    assert proc.returncode == 0, f"exit {proc.returncode} at case {crashed}:\n{proc.stderr[-2000:]}"
    assert "panicked" not in proc.stderr and "memory allocation" not in proc.stderr, proc.stderr
    assert len(done) == len(cases), proc.stderr
    return done


def write_shard(path: Path, ids: List[int]) -> Path:
    """A uint16 shard in the documented layout (magic, version, itemsize, count, reserved)."""
    path.write_bytes(b"FLMTOKS\0" + struct.pack("<IIQ8x", 1, 2, len(ids)) + struct.pack(f"<{len(ids)}H", *ids))
    return path


# --------------------------------------------------------------------------- overflowing sizes

OVERFLOW_FAMILIES = {
    "pad max_length": [("pad", {"max_length": n, "dtype": d}) for n in HUGE for d in ("int64", "int32")],
    "pad pad_to_multiple_of": [("pad", {"pad_to_multiple_of": n, "side": s}) for n in HUGE for s in ("right", "left")]
    + [("pad", {"max_length": 5, "pad_to_multiple_of": n}) for n in HUGE],
    "pack block_size": [("pack", {"block_size": n, "drop_last": d}) for n in HUGE for d in (True, False)],
    "lm_windows block_size": [("lm_windows", {"block_size": n}) for n in HUGE]
    + [("lm_windows", {"block_size": n, "stride": 1}) for n in HUGE],
}


@pytest.mark.parametrize("family", list(OVERFLOW_FAMILIES))
def test_overflowing_sizes_raise_value_error_naming_the_argument(family: str) -> None:
    arg = family.split()[1]
    cases = OVERFLOW_FAMILIES[family]
    for case, out in zip(cases, run_cases(cases)):
        assert out["type"] == "ValueError", (case, out)
        assert arg in out["msg"], (case, out)


def test_sizes_just_above_the_input_still_work() -> None:
    # The cap is on padding (2**28 cells), not on block_size itself: a row longer than the
    # documents is padded as before.
    ids, mask = pad([[1, 2], [3]], max_length=4096, pad_to_multiple_of=64)
    assert ids.shape == (2, 4096) and int(mask.sum()) == 3
    out = pack([[1, 2, 3]], block_size=4096, drop_last=False)
    assert out["input_ids"].shape == (1, 4096)
    assert pack([[1, 2, 3]], block_size=4096)["input_ids"].shape == (0, 4096)
    assert lm_windows([1, 2, 3], block_size=4096)["input_ids"].shape == (1, 4096)


# --------------------------------------------------------------------------- allocation failure

#: Caps the address space a little above what the interpreter already holds, so a 1-2 GiB
#: output within the padding allowance cannot be allocated.
LIMIT_MEMORY = textwrap.dedent(
    """
    import resource
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (384 << 20), resource.RLIM_INFINITY))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_allocation_failure_is_memory_error() -> None:
    rows = np.ones((64, 4), dtype=np.int64).tolist()
    cases = [
        ("pad", {"_rows": rows, "max_length": 2**22}),
        ("pad", {"_rows": rows, "max_length": 2**22, "dtype": "int32"}),
        ("pad", {"_rows": rows, "pad_to_multiple_of": 2**22}),
        ("pack", {"block_size": 2**27, "drop_last": False, "num_threads": 1}),
        ("lm_windows", {"block_size": 2**27}),
        ("pad", {"max_length": 8}),  # the process is still fine afterwards
    ]
    out = run_cases(cases, setup=LIMIT_MEMORY)
    for case, o in zip(cases[:-1], out):
        assert o["type"] == "MemoryError", (case, o)
        assert case[0] in o["msg"] and "cannot allocate" in o["msg"], (case, o)
    assert out[-1]["type"] is None, out[-1]


# --------------------------------------------------------------------------- negative and huge counts


def _shard(tmp_path: Path) -> TokenShard:
    return TokenShard(write_shard(tmp_path / "s.bin", list(range(100))))


def _sink_args() -> Dict[str, Any]:
    tok = SimpleNamespace(special_tokens={}, n_vocab=100, _core=None)
    return {"tokenizer": tok, "data": ["a"]}


COUNT_ARGS = {
    "pad max_length": lambda v, tmp: pad([[1]], max_length=v),
    "pad pad_to_multiple_of": lambda v, tmp: pad([[1]], pad_to_multiple_of=v),
    "pad pad_id": lambda v, tmp: pad([[1]], pad_id=v),
    "pack block_size": lambda v, tmp: pack([[1, 2, 3]], block_size=v),
    "pack num_threads": lambda v, tmp: pack([[1, 2, 3]], block_size=2, num_threads=v),
    "pack eos_id": lambda v, tmp: pack([[1, 2, 3]], block_size=2, eos_id=v),
    "lm_windows block_size": lambda v, tmp: lm_windows([1, 2, 3], block_size=v),
    "lm_windows stride": lambda v, tmp: lm_windows([1, 2, 3], block_size=2, stride=v),
    "TokenShard.blocks starts": lambda v, tmp: _shard(tmp).blocks([0, v], 2),
    "TokenShard.blocks length": lambda v, tmp: _shard(tmp).blocks([0], v),
    "TokenShard.random_batch batch_size": lambda v, tmp: _shard(tmp).random_batch(v, 4, np.random.default_rng(0)),
    "BucketBatchSampler batch_size": lambda v, tmp: BucketBatchSampler([1, 2], batch_size=v),
    "BucketBatchSampler max_tokens": lambda v, tmp: BucketBatchSampler([1, 2], max_tokens=v),
    "BucketBatchSampler bucket_size": lambda v, tmp: BucketBatchSampler([1, 2], batch_size=1, bucket_size=v),
    "write_shards max_tokens_per_shard": lambda v, tmp: write_shards(
        out_dir=tmp, max_tokens_per_shard=v, **_sink_args()
    ),
    "write_shards num_threads": lambda v, tmp: write_shards(out_dir=tmp, num_threads=v, **_sink_args()),
    "write_shards batch_files": lambda v, tmp: write_shards(out_dir=tmp, batch_files=v, **_sink_args()),
}

#: pad_id, eos_id and starts may be 0 or more; a pad_id below int64 is the only negative refused.
NEGATIVE_OK = {"pad pad_id": [-1, -(2**31), -(2**63)]}


@pytest.mark.parametrize("name", list(COUNT_ARGS))
def test_negative_and_huge_counts_name_the_argument(name: str, tmp_path: Path) -> None:
    arg = name.split()[1]
    bad = [v for v in NEGATIVE if v not in NEGATIVE_OK.get(name, [])] + [2**64, 2**100]
    if arg in ("num_threads",):
        bad.append(2**40)
    if arg in ("max_length", "pad_to_multiple_of", "block_size", "length"):
        bad += [2**61, 2**63 - 1]
    for v in bad:
        with pytest.raises(ValueError) as e:
            COUNT_ARGS[name](v, tmp_path)
        assert arg in str(e.value), (v, str(e.value))
        assert not isinstance(e.value, OverflowError)
    for v in (1.5, True, "3"):
        with pytest.raises(ValueError, match=arg):
            COUNT_ARGS[name](v, tmp_path)


# --------------------------------------------------------------------------- truncated shards


@pytest.mark.parametrize("keep", [0, 1, 32, 33, 100])
def test_shard_truncated_after_open_raises_format_error(keep: int, tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.bin", list(range(1000)))
    setup = f"S = TokenShard(os.environ['SHARD']); os.truncate(os.environ['SHARD'], {keep})"
    cases = [
        ("blocks", {"starts": [0, 990], "length": 10}),
        ("blocks", {"starts": [500], "length": 500}),
        ("random_batch", {"batch_size": 8, "block_size": 64}),
    ]
    # The runner opens its own TokenShard per case after the truncation, which FormatError
    # refuses at open; the setup's S opened before it is the case the issue is about.
    setup += textwrap.dedent(
        """
        CALLS["blocks"] = lambda kw: S.blocks(**kw)
        CALLS["random_batch"] = lambda kw: S.random_batch(rng=np.random.default_rng(0), **kw)
        """
    )
    for case, o in zip(cases, run_cases(cases, setup=setup, env={"SHARD": str(path)})):
        assert o["type"] == "FormatError", (case, o)
        assert "truncated" in o["msg"] and str(path) in o["msg"], (case, o)
    with pytest.raises(FormatError, match="truncated"):
        TokenShard(path)


def test_shard_reads_still_work_after_growth(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.bin", list(range(100)))
    shard = TokenShard(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 64)
    assert shard.blocks([98], 2).tolist() == [[98, 99]]


# --------------------------------------------------------------------------- properties

#: Any integer a user can pass: small ones, ones far past any batch, and the edges.
SIZES = st.one_of(
    st.integers(-(2**70), 2**12),
    st.integers(2**29, 2**70),
    st.sampled_from([0, 1, 2**28, 2**31, 2**32, 2**61, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63)]),
)
SEQS = st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=8), min_size=1, max_size=4)
PROPERTY = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _named(e: Exception, *names: str) -> bool:
    return any(n in str(e) for n in names)


@PROPERTY
@given(seqs=SEQS, max_length=st.one_of(st.none(), SIZES), multiple=st.one_of(st.none(), SIZES))
def test_pad_any_size_gives_a_result_or_a_named_error(seqs, max_length, multiple) -> None:
    try:
        ids, mask = pad(seqs, max_length=max_length, pad_to_multiple_of=multiple, truncation=True)
    except (ValueError, MemoryError) as e:
        assert _named(e, "max_length", "pad_to_multiple_of"), str(e)
        return
    assert ids.shape == mask.shape and ids.shape[0] == len(seqs)
    assert multiple is None or ids.shape[1] % multiple == 0


@PROPERTY
@given(
    seqs=SEQS,
    block_size=SIZES,
    drop_last=st.booleans(),
    num_threads=st.one_of(st.none(), st.integers(-3, 4), st.sampled_from([2**11, 2**40, 2**64, -(2**64)])),
)
def test_pack_any_size_gives_a_result_or_a_named_error(seqs, block_size, drop_last, num_threads) -> None:
    try:
        out = pack(seqs, block_size, eos_id=0, drop_last=drop_last, num_threads=num_threads)
    except (ValueError, MemoryError) as e:
        assert _named(e, "block_size", "num_threads"), str(e)
        return
    assert out["input_ids"].shape[1] == block_size


@PROPERTY
@given(tokens=st.lists(st.integers(0, 1000), min_size=2, max_size=40), block_size=SIZES, stride=SIZES)
def test_lm_windows_any_size_gives_a_result_or_a_named_error(tokens, block_size, stride) -> None:
    try:
        out = lm_windows(tokens, block_size, stride=stride)
    except (ValueError, MemoryError) as e:
        assert _named(e, "block_size", "stride"), str(e)
        return
    assert out["input_ids"].shape[1] == block_size
    scored = out["targets"][out["targets"] != -100]
    assert scored.tolist() == tokens[1:]


@pytest.fixture(scope="module")
def shard_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shard(tmp_path_factory.mktemp("shard") / "s.bin", [i % 500 for i in range(300)])


@PROPERTY
@given(starts=st.lists(SIZES, max_size=4), length=SIZES)
def test_shard_reader_any_size_gives_a_result_or_a_named_error(shard_path, starts, length) -> None:
    shard = TokenShard(shard_path)
    try:
        out = shard.blocks(starts, length)
    except (ValueError, MemoryError) as e:
        assert _named(e, "starts", "length", "block"), str(e)
        return
    assert out.shape == (len(starts), length)
    for row, s in zip(out, starts):
        assert row.tolist() == [i % 500 for i in range(s, s + length)]
