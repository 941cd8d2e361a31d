"""Batching workloads: a collate of 64 sequences of 16-512 ids (ferrolm's pad on the numpy arrays its datasets
yield, torch's ``pad_sequence`` + mask on tensors, the same logic in plain Python on lists), packing documents into
1024-token rows (ferrolm against a Python loop with the same outputs), and writing token shards against encoding
alone (the shard writer should run at the tokenizer's speed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Iterator

import numpy as np

from ...corpus import stdlib_texts
from ...tokenizer import Tokenizer
from ..harness import Result, Workload, measure

__all__ = ["data_workloads", "run"]


def data_workloads(out_dir: Path, smoke: bool = False, full: bool = False) -> Dict[str, Workload]:
    """The batching comparisons; shards are written into ``out_dir``.

    Args:
        out_dir: an existing folder the shard writer may fill (and overwrite).
        smoke: tiny inputs (0.5 MB to pack, 200 KB of text), for a run that only checks the workloads work.
        full: 100 MB to pack instead of 8 MB (the text to shard is 10 MB either way).

    Returns:
        ``collate`` (timed over 200 calls per run), ``pack`` and ``shards``.
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from ...data import pack, pad, write_shards

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 50_000, n) for n in rng.integers(16, 513, 64)]
    tensors = [torch.from_numpy(a) for a in arrays]
    lists = [a.tolist() for a in arrays]

    def torch_collate(batch):
        ids = pad_sequence(batch, batch_first=True, padding_value=0)
        lengths = torch.tensor([len(x) for x in batch])
        mask = (torch.arange(ids.size(1))[None, :] < lengths[:, None]).long()
        return ids, mask

    def python_collate(batch):
        width = max(len(x) for x in batch)
        ids = [list(x) + [0] * (width - len(x)) for x in batch]
        mask = [[1] * len(x) + [0] * (width - len(x)) for x in batch]
        return torch.tensor(ids), torch.tensor(mask)

    pack_mb = 0.5 if smoke else 100 if full else 8
    n_tokens = int(pack_mb * 1e6 / 4)  # uint32 ids
    lens = rng.integers(50, 5000, n_tokens // 2500 + 1)
    lens = lens[: np.searchsorted(np.cumsum(lens), n_tokens) + 1]
    flat = rng.integers(0, 50_000, int(lens.sum())).astype(np.uint32)
    docs = np.split(flat, np.cumsum(lens)[:-1])

    def python_pack(docs, block_size=1024, eos=50_256):
        # ferrolm's pack in straightforward Python: list operations per document, per token only where needed.
        stream, owner, position = [], [], []
        for i, d in enumerate(docs):
            stream.extend(d.tolist())
            stream.append(eos)
            owner.extend([i] * (len(d) + 1))
            position.extend(range(len(d) + 1))
        rows = (len(stream) - 1) // block_size
        x, y, pos, doc = [], [], [], []
        for r in range(rows):
            a, b = r * block_size, (r + 1) * block_size
            x.append(stream[a:b])
            y.append(stream[a + 1 : b + 1])
            first = position[a]
            pos.append([p - first if owner[a + k] == owner[a] else p for k, p in enumerate(position[a:b])])
            doc.append(owner[a:b])
        return np.array(x), np.array(y), np.array(pos), np.array(doc)

    texts = stdlib_texts(200_000 if smoke else 10_000_000)
    tok = Tokenizer.train(texts[:50], 4096, special_tokens=["<|endoftext|>"], show_progress=False)
    shard_mb = sum(len(t.encode()) for t in texts) / 1e6
    collate = {
        "ferrolm": lambda: pad(arrays, return_tensors="pt"),
        "torch_pad_sequence": lambda: torch_collate(tensors),
        "python": lambda: python_collate(lists),
    }
    return {
        "collate": Workload("collate: batch 64, lengths 16-512", collate, "64 seqs", {"seqs": 64}, inner=200),
        "pack": Workload(
            "pack into 1024-token rows",
            {"ferrolm": lambda: pack(docs, 1024, eos_id=50_256), "python": lambda: python_pack(docs)},
            f"{pack_mb:g} MB",
            {"mb": pack_mb},
        ),
        "shards": Workload(
            "write shards (peer: encode only)",
            {
                "ferrolm": lambda: write_shards(tok, texts, out_dir, show_progress=False),
                "encode_only": lambda: tok.encode_ordinary_batch(texts),
            },
            f"{shard_mb:.0f} MB text",
            {"mb": shard_mb},
        ),
    }


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The data rows of ``ferrolm bench``, each yielded as soon as it is timed (collate three times as many runs;
    pack once with ``full``)."""
    with tempfile.TemporaryDirectory() as tmp:
        w = data_workloads(Path(tmp), full=full)
        yield measure("data", w["collate"], repeats * 3)
        yield measure("data", w["pack"], 1 if full else repeats)
        yield measure("data", w["shards"], repeats)
