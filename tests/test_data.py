"""ferrolm.data against straightforward pure-Python / torch versions (hypothesis), plus bad
input and DataLoader integration."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrolm import FormatError, Tokenizer
from ferrolm.data import (
    IGNORE_INDEX,
    BucketBatchSampler,
    DocumentDataset,
    PadCollator,
    ShardDataset,
    TokenShard,
    lm_windows,
    pack,
    pad,
    write_shards,
)

torch = pytest.importorskip("torch")
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SEQS = st.lists(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=40), min_size=1, max_size=12)


# --------------------------------------------------------------------------- references


def ref_pad(seqs, pad_id, max_length, side, truncation, multiple):
    width = max_length if max_length is not None else max(len(s) for s in seqs)
    if multiple:
        width = -(-width // multiple) * multiple
    ids, mask = [], []
    for s in seqs:
        s = list(s)
        if len(s) > width:
            s = s[-width:] if truncation == "left" else s[:width]
        fill = width - len(s)
        if side == "left":
            ids.append([pad_id] * fill + s)
            mask.append([0] * fill + [1] * len(s))
        else:
            ids.append(s + [pad_id] * fill)
            mask.append([1] * len(s) + [0] * fill)
    return ids, mask


def ref_pack(docs, block_size, eos, drop_last, pad_id, mask_cross):
    stream, owner = [], []
    for i, d in enumerate(docs):
        stream += list(d) + ([eos] if eos is not None else [])
        owner += [i] * (len(d) + (eos is not None))
    rows = {"input_ids": [], "targets": [], "position_ids": [], "doc_ids": []}
    n_pred = len(stream) - 1
    n_rows = n_pred // block_size if drop_last else -(-n_pred // block_size)
    for r in range(n_rows):
        x, y, pos, doc = [], [], [], []
        p = 0
        for k in range(block_size):
            t = r * block_size + k
            if t >= n_pred:
                x.append(pad_id), y.append(IGNORE_INDEX), pos.append(0), doc.append(-1)
                continue
            if k > 0 and owner[t] != owner[t - 1]:
                p = 0
            x.append(stream[t])
            y.append(IGNORE_INDEX if mask_cross and owner[t + 1] != owner[t] else stream[t + 1])
            pos.append(p)
            doc.append(owner[t])
            p += 1
        for key, v in zip(rows, (x, y, pos, doc)):
            rows[key].append(v)
    return rows


def ref_windows(tokens, block_size, stride, pad_id):
    """HF's sliding-window perplexity loop, written out."""
    xs, ys, ms = [], [], []
    prev_end = 0
    n = len(tokens)
    for begin in range(0, n, stride):
        end = min(begin + block_size, n - 1)
        x = list(tokens[begin:end])
        y = [tokens[i + 1] if i >= prev_end else IGNORE_INDEX for i in range(begin, end)]
        fill = block_size - len(x)
        xs.append(x + [pad_id] * fill)
        ys.append(y + [IGNORE_INDEX] * fill)
        ms.append([1] * len(x) + [0] * fill)
        prev_end = end
        if end >= n - 1:
            break
    return xs, ys, ms


def ref_buckets(lengths, order, bucket_size, batch_size, max_tokens, drop_last):
    batches = []
    for b0 in range(0, len(order), bucket_size):
        bucket = sorted(order[b0 : b0 + bucket_size], key=lambda i: lengths[i])
        cur, longest = [], 0
        for i in bucket:
            new_longest = max(longest, lengths[i])
            over = max_tokens is not None and new_longest * (len(cur) + 1) > max_tokens
            if cur and ((batch_size is not None and len(cur) >= batch_size) or over):
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, lengths[i])
        if cur:
            short = batch_size is not None and max_tokens is None and len(cur) < batch_size
            if not (drop_last and short):
                batches.append(cur)
    return batches


# --------------------------------------------------------------------------- pad


@PROPERTY
@given(
    seqs=SEQS,
    side=st.sampled_from(["right", "left"]),
    max_length=st.one_of(st.none(), st.integers(1, 50)),
    truncation=st.sampled_from(["right", "left"]),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
    pad_id=st.integers(0, 1000),
    as_arrays=st.booleans(),
)
def test_pad_matches_reference(seqs, side, max_length, truncation, multiple, pad_id, as_arrays):
    inp = [np.array(s, dtype=np.int64) for s in seqs] if as_arrays else seqs
    ids, mask = pad(
        inp, pad_id=pad_id, max_length=max_length, side=side, truncation=truncation, pad_to_multiple_of=multiple
    )
    r_ids, r_mask = ref_pad(seqs, pad_id, max_length, side, truncation, multiple)
    assert ids.tolist() == r_ids and mask.tolist() == r_mask
    assert ids.dtype == np.int64 and mask.dtype == np.int64


@pytest.mark.parametrize("np_dtype", [np.int64, np.int32, np.uint32, np.uint16, np.uint8])
def test_pad_reads_every_integer_dtype(np_dtype):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 200, n).astype(np_dtype) for n in (3, 17, 1, 9)]
    for dtype in ("int64", "int32", np.int32, torch.int64):
        ids, mask = pad(seqs, pad_id=7, dtype=dtype)
        r_ids, r_mask = ref_pad([s.tolist() for s in seqs], 7, None, "right", "right", None)
        assert ids.tolist() == r_ids and mask.tolist() == r_mask


def test_pad_equals_torch_pad_sequence_and_is_zero_copy():
    rng = np.random.default_rng(1)
    tensors = [torch.from_numpy(rng.integers(0, 50_000, n)) for n in rng.integers(16, 513, 64)]
    ids, mask = pad(tensors, pad_id=0, return_tensors="pt")
    expect = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0)
    assert torch.equal(ids, expect)
    lengths = torch.tensor([len(t) for t in tensors])
    assert torch.equal(mask, (torch.arange(ids.size(1))[None] < lengths[:, None]).long())
    np_ids, _ = pad([t.numpy() for t in tensors])
    t = torch.from_numpy(np_ids)
    assert t.data_ptr() == np_ids.__array_interface__["data"][0]  # torch shares numpy's memory


def test_pad_bad_input():
    with pytest.raises(ValueError, match="empty batch"):
        pad([])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad([[1], []])
    with pytest.raises(ValueError, match="sequence 0 has id -3 at position 1"):
        pad([[1, -3]])
    with pytest.raises(ValueError, match="for int32"):
        pad([[2**31]], dtype="int32")
    with pytest.raises(ValueError, match="more than max_length=2"):
        pad([[1, 2, 3]], max_length=2)
    with pytest.raises(ValueError, match="pad_id"):
        pad([[1]], pad_id=-1)
    with pytest.raises(ValueError, match="side"):
        pad([[1]], side="middle")
    with pytest.raises(ValueError, match="dtype"):
        pad([[1]], dtype="float32")
    with pytest.raises(TypeError, match="float32"):
        pad([np.zeros(3, np.float32)])
    with pytest.raises(TypeError, match="non-contiguous"):
        pad([np.arange(10)[::2]])
    with pytest.raises(TypeError, match="only ints"):
        pad([[1, "a"]])
    with pytest.raises(TypeError, match="got a str"):
        pad("abc")
    with pytest.raises(TypeError):
        pad([torch.zeros(3)])


# --------------------------------------------------------------------------- pack and windows


DOCS = st.lists(st.lists(st.integers(0, 10_000), min_size=0, max_size=30), min_size=1, max_size=8)


@PROPERTY
@given(
    docs=DOCS,
    block_size=st.integers(1, 12),
    eos=st.one_of(st.none(), st.integers(0, 10)),
    drop_last=st.booleans(),
    mask_cross=st.booleans(),
)
def test_pack_matches_reference(docs, block_size, eos, drop_last, mask_cross):
    total = sum(len(d) for d in docs) + (len(docs) if eos is not None else 0)
    if total < 2:
        with pytest.raises(ValueError):
            pack(docs, block_size, eos_id=eos, drop_last=drop_last)
        return
    out = pack(docs, block_size, eos_id=eos, drop_last=drop_last, pad_id=3, mask_cross_document=mask_cross)
    ref = ref_pack(docs, block_size, eos, drop_last, 3, mask_cross)
    for k in ref:
        assert out[k].tolist() == ref[k], k
        assert out[k].shape == (len(ref[k]), block_size)


def test_pack_one_long_document_and_exact_block():
    doc = list(range(1, 10_001))
    out = pack([doc], block_size=100)
    assert out["input_ids"].shape == (99, 100)
    assert out["targets"][-1, -1] == 9_901  # 99 full rows; the last 99 tokens do not fill a row
    out = pack([[1, 2, 3, 4, 5]], block_size=4)  # 4 targets exactly fill one row
    assert out["input_ids"].tolist() == [[1, 2, 3, 4]] and out["targets"].tolist() == [[2, 3, 4, 5]]
    t = pack([[1, 2, 3]], 2, eos_id=0, return_tensors="pt")
    assert t["input_ids"].dtype == torch.int64


@PROPERTY
@given(tokens=st.lists(st.integers(0, 1000), min_size=2, max_size=120), block_size=st.integers(1, 16), data=st.data())
def test_windows_match_reference(tokens, block_size, data):
    stride = data.draw(st.integers(1, block_size))
    out = lm_windows(np.array(tokens), block_size, stride, pad_id=5)
    xs, ys, ms = ref_windows(tokens, block_size, stride, 5)
    assert out["input_ids"].tolist() == xs
    assert out["targets"].tolist() == ys
    assert out["attention_mask"].tolist() == ms
    scored = [y for row in ys for y in row if y != IGNORE_INDEX]
    assert scored == tokens[1:]  # every token after the first is a target exactly once


def test_pack_and_windows_bad_input():
    for bs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="block_size"):
            pack([[1, 2]], bs)
        with pytest.raises(ValueError, match="block_size"):
            lm_windows([1, 2], bs)
    with pytest.raises(ValueError, match="stride"):
        lm_windows([1, 2, 3], 2, stride=3)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lm_windows([1], 2)
    with pytest.raises(ValueError, match="empty list"):
        pack([], 4)
    with pytest.raises(ValueError, match="id -5"):
        pack([[1, -5, 2]], 2)


# --------------------------------------------------------------------------- bucketing


@PROPERTY
@given(
    lengths=st.lists(st.integers(0, 600), min_size=1, max_size=300),
    batch_size=st.one_of(st.none(), st.integers(1, 20)),
    max_tokens=st.one_of(st.none(), st.integers(1, 3000)),
    bucket_size=st.integers(1, 100),
    seed=st.integers(0, 5),
    drop_last=st.booleans(),
)
def test_bucket_sampler_matches_reference(lengths, batch_size, max_tokens, bucket_size, seed, drop_last):
    if batch_size is None and max_tokens is None:
        batch_size = 4
    s = BucketBatchSampler(
        lengths, batch_size=batch_size, max_tokens=max_tokens, seed=seed, bucket_size=bucket_size, drop_last=drop_last
    )
    got = list(s)
    rng = np.random.default_rng((seed, 0))
    order = rng.permutation(len(lengths)).tolist()
    ref = ref_buckets(lengths, order, bucket_size, batch_size, max_tokens, drop_last)
    ref = [ref[i] for i in rng.permutation(len(ref))]
    assert got == ref
    assert len(s) == len(got)
    flat = sorted(i for b in got for i in b)
    if not drop_last:
        assert flat == list(range(len(lengths)))
    for b in got:
        if batch_size:
            assert len(b) <= batch_size
        if max_tokens and len(b) > 1:
            assert max(lengths[i] for i in b) * len(b) <= max_tokens
    assert (
        list(
            BucketBatchSampler(
                lengths,
                batch_size=batch_size,
                max_tokens=max_tokens,
                seed=seed,
                bucket_size=bucket_size,
                drop_last=drop_last,
            )
        )
        == got
    )


def test_bucket_sampler_epochs_and_errors():
    lengths = np.random.default_rng(0).integers(1, 100, 1000)
    s = BucketBatchSampler(lengths, batch_size=16, seed=3)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    assert a != b and sorted(map(tuple, a)) != sorted(map(tuple, b))
    s.set_epoch(0)
    assert list(s) == a
    # Batches are length-homogeneous: far less padding than random batches.
    pad_bucket = sum(max(lengths[i] for i in x) * len(x) for x in a)
    assert pad_bucket < 0.7 * sum(
        max(lengths[x]) * len(x) for x in np.array_split(np.random.default_rng(1).permutation(1000), len(a))
    )
    with pytest.raises(ValueError, match="batch_size, max_tokens"):
        BucketBatchSampler([1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        BucketBatchSampler([], batch_size=2)
    with pytest.raises(ValueError, match="non-negative"):
        BucketBatchSampler([1, -2], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler([1, 2], batch_size=0)


# --------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def shard_tok():
    from ferrolm.corpus import chinese_text, stdlib_texts

    return Tokenizer.train([chinese_text()] + stdlib_texts(300_000), vocab_size=1000, special_tokens=["<|endoftext|>"])


def test_shards_round_trip_texts_and_files(shard_tok, tmp_path):
    from ferrolm.corpus import chinese_text, stdlib_files

    files = [Path(p) for p in stdlib_files()[:40]]
    texts = [chinese_text(), "hello shards", "x"]
    paths = write_shards(shard_tok, texts + files, tmp_path / "out", max_tokens_per_shard=20_000)
    assert len(paths) > 1 and all(p.exists() for p in paths)
    assert not list((tmp_path / "out").glob(".*tmp"))
    eos = shard_tok.eot_token
    expect = []
    for d in texts + [f.read_text(encoding="utf-8") for f in files]:
        expect += shard_tok.encode_ordinary(d) + [eos]
    got = np.concatenate([np.asarray(TokenShard(p).tokens) for p in paths]).tolist()
    assert got == expect
    s = TokenShard(paths[0])
    assert s.dtype == np.uint16 and len(s) >= 20_000
    assert s.blocks([0, 5], 4).tolist() == [expect[0:4], expect[5:9]]
    x, y = s.random_batch(8, 16, np.random.default_rng(0))
    assert x.shape == (8, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_shards_use_uint32_for_large_vocabularies(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    tok = Tokenizer.from_ranks(ranks, special_tokens={"<|endoftext|>": 70_000})
    paths = write_shards(tok, ["abc", "de"], tmp_path)
    s = TokenShard(paths[0])
    assert s.dtype == np.uint32
    assert np.asarray(s.tokens).tolist() == [97, 98, 99, 70_000, 100, 101, 70_000]


def test_corrupt_shards_are_value_errors(shard_tok, tmp_path):
    (path,) = write_shards(shard_tok, ["some text for a shard"] * 10, tmp_path)
    data = path.read_bytes()
    cases = {
        "truncated": data[:-1],
        "short": data[:10],
        "magic": b"XXXXXXXX" + data[8:],
        "newer": data[:8] + (2).to_bytes(4, "little") + data[12:],
        "itemsize": data[:12] + (3).to_bytes(4, "little") + data[16:],
        "trailing": data + b"\0\0",
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.bin"
        p.write_bytes(blob)
        with pytest.raises(FormatError) as e:
            TokenShard(p)
        assert isinstance(e.value, ValueError)
        if name == "newer":
            assert "newer" in str(e.value)
    with pytest.raises(FileNotFoundError):
        TokenShard(tmp_path / "absent.bin")
    s = TokenShard(path)
    with pytest.raises(ValueError, match="outside the shard"):
        s.blocks([len(s) - 1], 2)


def test_interrupted_shard_writing_leaves_no_partial_file(shard_tok, tmp_path):
    def data():
        yield "a complete document"
        yield 42  # not text: raises mid-way

    with pytest.raises(TypeError):
        write_shards(shard_tok, data(), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- torch integration


def test_dataloader_with_workers(shard_tok, tmp_path):
    from torch.utils.data import DataLoader

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 999, n) for n in rng.integers(1, 60, 200)]
    ds = DocumentDataset(docs)
    sampler = BucketBatchSampler(ds.lengths, batch_size=16, seed=0)
    collate = PadCollator(pad_id=0, labels=True)
    ctx = "fork" if hasattr(os, "fork") else None
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2, multiprocessing_context=ctx)
    seen = []
    for batch, idx in zip(loader, sampler):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        r_ids, r_mask = ref_pad([docs[i].tolist() for i in idx], 0, None, "right", "right", None)
        assert ids.tolist() == r_ids and mask.tolist() == r_mask
        assert torch.equal(labels, torch.where(mask.bool(), ids, torch.tensor(IGNORE_INDEX)))
        seen += idx
    assert sorted(seen) == list(range(200))

    paths = write_shards(shard_tok, ["text number %d " % i * 20 for i in range(200)], tmp_path)
    sds = ShardDataset(paths, block_size=32)
    stream = np.concatenate([np.asarray(TokenShard(p).tokens) for p in paths]).astype(np.int64)
    loader = DataLoader(
        sds, batch_size=8, shuffle=False, num_workers=2, multiprocessing_context=ctx, collate_fn=lambda b: b
    )
    n = 0
    for batch in loader:
        x, y = batch["input_ids"], batch["targets"]
        for r in range(x.shape[0]):
            k = n + r
            assert x[r].tolist() == stream[k * 32 : k * 32 + 32].tolist()
            assert y[r].tolist() == stream[k * 32 + 1 : k * 32 + 33].tolist()
        n += x.shape[0]
    assert n == len(sds)
    assert sds[0]["input_ids"].shape == (32,)
