"""Safe under fork (DataLoader workers) and the command line."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import warnings

import pytest

from ferrolm import Tokenizer
from ferrolm.cli import main


def _child(tok, docs, q):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.put((tok.encode_batch(docs, num_threads=2), tok.encode_ordinary(docs[0])))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_batch_encoding_after_fork(trained):
    docs = ["hello world %d " % i * 50 for i in range(200)]
    expect = trained.encode_batch(docs, num_threads=2)  # the parent's pool now exists
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(trained, docs, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for batch, single in results:
        assert batch == expect
        assert single == expect[0]
    # The parent still runs in parallel after forking.
    assert trained.encode_batch(docs, num_threads=2) == expect


def test_cli_trains_on_embedded_corpus(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "600", "--max-bytes", "300000", "--out", str(out)]) == 0
    hf = tokenizers.Tokenizer.from_file(str(out))
    tok = Tokenizer.from_hf_json(out)
    text = "def main():\n    return 42  # 中文"
    assert hf.encode(text).ids == tok.encode(text)
    assert json.loads(out.read_text())["model"]["type"] == "BPE"
    r = subprocess.run(
        [sys.executable, "-m", "ferrolm.cli", "tokenizer", "encode", str(out), text],
        capture_output=True,
        text=True,
        check=True,
    )
    assert list(map(int, r.stdout.split())) == tok.encode(text)
