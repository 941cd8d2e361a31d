"""Batching: padding, length bucketing, packing, language-model windows and token shards.

The work happens in Rust (GIL released for large inputs); results are numpy arrays that
``torch.from_numpy`` wraps without a copy (``return_tensors="pt"`` does it for you). torch is
imported only when tensors are asked for, and nothing here needs a torch base class, so every
class works with ``torch.utils.data.DataLoader`` (``num_workers > 0``, fork or spawn) and without
torch at all.

Example:
    >>> from ferrolm.data import pad
    >>> ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._io import PathLike

__all__ = [
    "pad",
    "pack",
    "lm_windows",
    "BucketBatchSampler",
    "write_shards",
    "TokenShard",
    "is_token_shard",
    "expand_paths",
    "ShardDataset",
    "DocumentDataset",
    "PadCollator",
    "IGNORE_INDEX",
]

#: The target value that ``torch.nn.functional.cross_entropy`` ignores by default.
IGNORE_INDEX = -100

_DTYPES = {"int64": "int64", "int32": "int32", np.int64: "int64", np.int32: "int32"}


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype).replace("torch.", "")
    if name not in ("int64", "int32"):
        raise ValueError(f"dtype must be int64 or int32, got {dtype!r}")
    return name


#: The largest count the Rust side takes (int64 / isize); larger sizes are refused by name.
_MAX_SIZE = 2**63 - 1
#: The most threads a call may ask for.
_MAX_THREADS = 1024


def _check_int(
    name: str, value: Any, minimum: int = 1, maximum: int = _MAX_SIZE, optional: bool = False
) -> Optional[int]:
    """Returns ``value`` as an int after checking it is one in ``[minimum, maximum]``.

    Every size and count goes through here before reaching Rust, so a bad one is a
    ``ValueError`` that names the argument (not a bare ``OverflowError`` from the conversion).
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be an int{none}, got {value!r}")
    v = int(value)
    if v < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {v}")
    if v > maximum:
        raise ValueError(f"{name}={v} is too large (at most {maximum}); pass a smaller {name}")
    return v


def _to_numpy_rows(sequences: Any) -> Any:
    """torch tensors become numpy views (CPU) so the Rust side reads them in place."""
    if isinstance(sequences, np.ndarray):
        return sequences
    if isinstance(sequences, (str, bytes)):
        raise TypeError(f"expected a list of sequences of ids, got a {type(sequences).__name__}")
    if hasattr(sequences, "numpy") and hasattr(sequences, "dim"):  # one torch tensor
        return _tensor_to_numpy(sequences, "sequences")
    seq = sequences if isinstance(sequences, list) else list(sequences)
    if seq and hasattr(seq[0], "numpy") and hasattr(seq[0], "dim"):
        return [_tensor_to_numpy(t, f"sequence {i}") for i, t in enumerate(seq)]
    return seq


def _tensor_to_numpy(t: Any, what: str) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"{what} is on {t.device}; ferrolm.data works on CPU tensors (call .cpu())")
    if t.is_floating_point():
        raise TypeError(f"{what} has dtype {t.dtype}; token ids must be integers")
    return t.detach().numpy()


def _wrap(arrays: Dict[str, np.ndarray], return_tensors: str) -> Dict[str, Any]:
    if return_tensors == "np":
        return arrays
    if return_tensors == "pt":
        import torch

        return {k: torch.from_numpy(v) for k, v in arrays.items()}
    raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")


def pad(
    sequences: Sequence[Sequence[int]],
    pad_id: int = 0,
    max_length: Optional[int] = None,
    side: str = "right",
    truncation: Union[bool, str] = False,
    dtype: Any = "int64",
    pad_to_multiple_of: Optional[int] = None,
    return_tensors: str = "np",
) -> Tuple[Any, Any]:
    """Returns ``(input_ids, attention_mask)``: the sequences padded into a rectangle.

    Args:
        sequences: B sequences of ids: lists of ints, 1-D integer numpy arrays (read in place),
            CPU integer tensors, or a 2-D integer array.
        pad_id: the id written into padding.
        max_length: the width T (default: the longest sequence). Longer sequences are an
            error unless ``truncation`` is set.
        side: ``"right"`` or ``"left"``: where padding goes.
        truncation: ``False`` (raise), ``True``/``"right"`` (keep the first ``max_length`` ids)
            or ``"left"`` (keep the last ones).
        dtype: ``"int64"`` or ``"int32"`` (numpy or torch dtypes also accepted).
        pad_to_multiple_of: round T up to a multiple of this.
        return_tensors: ``"np"`` or ``"pt"`` (``torch.from_numpy``: no copy).

    Returns:
        input_ids: (B, T) of ``dtype``; attention_mask: (B, T) of ``dtype``, 1 on real tokens.

    Raises:
        ValueError: an empty batch or sequence, an id that is negative or too large for
            ``dtype``, a sequence longer than ``max_length`` without truncation, a size that is
            not a positive int, or one that asks for more than 2**28 cells of padding beyond
            the ids (``max_length=2**40``); the message names the argument.
        MemoryError: the padded batch cannot be allocated.
        TypeError: a sequence that is not ints / an integer array.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    trunc = {False: "error", True: "right", "right": "right", "left": "left", None: "error"}.get(truncation)  # type: ignore[call-overload]
    if trunc is None:
        raise ValueError(f"truncation must be False, True, 'right' or 'left', got {truncation!r}")
    max_length = _check_int("max_length", max_length, optional=True)
    pad_to_multiple_of = _check_int("pad_to_multiple_of", pad_to_multiple_of, optional=True)
    ids, mask, _ = _core.pad_batch(
        _to_numpy_rows(sequences),
        _check_int("pad_id", pad_id, minimum=-_MAX_SIZE - 1),
        max_length,
        side == "left",
        trunc,
        pad_to_multiple_of,
        _dtype_name(dtype),
    )
    if return_tensors == "np":
        return ids, mask
    out = _wrap({"input_ids": ids, "attention_mask": mask}, return_tensors)
    return out["input_ids"], out["attention_mask"]


def pack(
    documents: Sequence[Sequence[int]],
    block_size: int,
    eos_id: Optional[int] = None,
    drop_last: bool = True,
    pad_id: int = 0,
    mask_cross_document: bool = False,
    return_tensors: str = "np",
    num_threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Returns documents packed into rows of ``block_size`` tokens for language-model training.

    The stream is each document followed by ``eos_id`` (if given). Row r is stream tokens
    ``[r*T, (r+1)*T)``; its targets are the next tokens.

    Returns:
        A dict of (N, T) int64 arrays: ``input_ids``; ``targets`` (``IGNORE_INDEX`` on
        padding, and across documents with ``mask_cross_document``); ``position_ids``, counting
        from 0 at each document start and each row start; ``doc_ids``, the document index of
        each input token (``-1`` on padding), so attention can be kept within a document.

    Args:
        documents: token id sequences (as for :func:`pad`).
        block_size: T > 0.
        eos_id: the id put after each document, or None.
        drop_last: drop a final partial row (else pad it with ``pad_id``).
        mask_cross_document: ignore targets that belong to the next document.
        num_threads: threads filling rows (default: all cores; 1 in a forked child).

    Raises:
        ValueError: a size or count that is not a positive int (the message names it), or a
            ``block_size`` more than 2**28 beyond the tokens of the documents.
        MemoryError: the rows cannot be allocated.

    Example:
        >>> out = pack([[1, 2, 3], [4, 5]], block_size=3, eos_id=9)
        >>> out["input_ids"].tolist(), out["position_ids"].tolist()
        ([[1, 2, 3], [9, 4, 5]], [[0, 1, 2], [0, 0, 1]])
    """
    x, y, pos, doc = _core.pack_documents(
        _to_numpy_rows(documents),
        _check_block_size(block_size),
        _check_int("eos_id", eos_id, minimum=0, optional=True),
        not drop_last,
        _check_int("pad_id", pad_id, minimum=-_MAX_SIZE - 1),
        bool(mask_cross_document),
        _check_int("num_threads", num_threads, maximum=_MAX_THREADS, optional=True),
    )
    return _wrap({"input_ids": x, "targets": y, "position_ids": pos, "doc_ids": doc}, return_tensors)


def lm_windows(
    tokens: Sequence[int], block_size: int, stride: Optional[int] = None, pad_id: int = 0, return_tensors: str = "np"
) -> Dict[str, Any]:
    """Returns windows over one long token stream for training (``stride == block_size``) or
    sliding-window evaluation (``stride < block_size``).

    Window k has inputs ``tokens[k*stride : k*stride + T]`` and next-token targets. Every
    token after the first is a target exactly once: where windows overlap, targets already
    scored by the previous window are ``IGNORE_INDEX`` (so summing the loss over windows gives
    the perplexity with the most context, as in HF's guide). The last window may be short:
    padded with ``pad_id``, mask 0, targets ignored.

    Returns:
        A dict of (N, T) int64 arrays: ``input_ids``, ``targets``, ``attention_mask``.

    Raises:
        ValueError: ``block_size`` or ``stride`` not a positive int, ``stride > block_size``,
            or windows holding more than 2**28 cells of padding (the message names the size).
        MemoryError: the windows cannot be allocated.
    """
    block_size = _check_block_size(block_size)
    stride = block_size if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 0 < stride <= block_size:
        raise ValueError(f"stride must be an int in 1..block_size ({block_size}), got {stride!r}")
    if hasattr(tokens, "numpy") and hasattr(tokens, "dim"):
        tokens = _tensor_to_numpy(tokens, "tokens")
    x, y, m = _core.lm_windows(
        tokens if isinstance(tokens, np.ndarray) else list(tokens),
        block_size,
        int(stride),
        _check_int("pad_id", pad_id, minimum=-_MAX_SIZE - 1),
    )
    return _wrap({"input_ids": x, "targets": y, "attention_mask": m}, return_tensors)


def _check_block_size(block_size: Any) -> int:
    return _check_int("block_size", block_size)  # type: ignore[return-value]


class BucketBatchSampler:
    """Batches of indices of similar length, for ``DataLoader(batch_sampler=...)``.

    Each epoch: indices are shuffled (seeded: ``numpy.random.default_rng((seed, epoch))``),
    cut into buckets of ``bucket_size``, sorted by length inside each bucket (ties keep the
    shuffled order), and taken greedily into batches of at most ``batch_size`` sequences and/or
    at most ``max_tokens`` padded tokens (longest length × batch size; a sequence longer than
    ``max_tokens`` forms a batch alone). The batch order is then shuffled. Same seed and epoch,
    same batches. Call :meth:`set_epoch` each epoch for a new order.

    Args:
        lengths: the length of each sequence (e.g. ``DocumentDataset.lengths``).
        batch_size: the most sequences in a batch.
        max_tokens: the token budget of a batch.
        shuffle: shuffle indices and batches (else sorted buckets in index order).
        seed: the RNG seed.
        bucket_size: indices per bucket (default ``100 * batch_size``, or 10,000 with a token
            budget alone); larger means tighter length groups, less randomness.
        drop_last: drop batches smaller than ``batch_size`` (count batching only).

    Example:
        >>> s = BucketBatchSampler([5, 1, 3, 2], batch_size=2, seed=0)
        >>> sorted(i for b in s for i in b)
        [0, 1, 2, 3]
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: Optional[int] = None,
        max_tokens: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0:
            raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {lengths.shape}")
        if not np.issubdtype(lengths.dtype, np.integer) or (lengths < 0).any() or lengths.max() >= 2**32:
            raise ValueError("lengths must be non-negative integers below 2**32")
        if batch_size is None and max_tokens is None:
            raise ValueError("give batch_size, max_tokens or both")
        batch_size = _check_int("batch_size", batch_size, optional=True)
        max_tokens = _check_int("max_tokens", max_tokens, optional=True)
        bucket_size = _check_int("bucket_size", bucket_size, optional=True)
        self.lengths = lengths.astype(np.uint32)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_size = bucket_size or (100 * batch_size if batch_size else 10_000)
        self.drop_last = drop_last
        self.epoch = 0
        self._cache: Optional[Tuple[int, List[np.ndarray]]] = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose shuffle :meth:`__iter__` yields."""
        self.epoch = epoch

    def batches(self) -> List[np.ndarray]:
        """Returns this epoch's batches (arrays of indices)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(n).astype(np.uint32) if self.shuffle else np.arange(n, dtype=np.uint32)
        flat, offsets = _core.bucket_batches(
            self.lengths, order, self.bucket_size, self.batch_size, self.max_tokens, self.drop_last
        )
        batches = np.split(flat, offsets[1:-1].astype(np.intp)) if len(offsets) > 1 else []
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        for b in self.batches():
            yield b.tolist()

    def __len__(self) -> int:
        return len(self.batches())


# --------------------------------------------------------------------------- shards


def _auto_eos(tokenizer: Any) -> Optional[int]:
    specials = tokenizer.special_tokens
    return specials.get("<|endoftext|>")


def write_shards(
    tokenizer: Any,
    data: Iterable[Union[str, PathLike]],
    out_dir: PathLike,
    prefix: str = "shard",
    max_tokens_per_shard: int = 100_000_000,
    eos_id: Union[int, None, str] = "auto",
    num_threads: Optional[int] = None,
    show_progress: Optional[bool] = None,
    batch_files: int = 64,
) -> List[Path]:
    """Tokenizes texts and/or files in parallel into token shards; returns their paths.

    Each shard is ``{prefix}_{index:05d}.bin`` in ``out_dir`` (uint16 ids when the vocabulary
    fits, uint32 otherwise) and appears only once complete (written to a temporary name, then
    renamed). Documents are whole within a shard, each followed by ``eos_id``.

    Args:
        tokenizer: a :class:`ferrolm.Tokenizer` (special-token text is encoded as plain text).
        data: texts (``str``) and/or UTF-8 files (``os.PathLike``), one document each.
        out_dir: the folder (created if needed).
        max_tokens_per_shard: start a new shard once this many ids are written.
        eos_id: the id after each document; ``"auto"``: ``<|endoftext|>`` if the tokenizer has
            it, else none.
        num_threads: threads for encoding (default: all cores).
        show_progress: a progress bar (default: when stderr is a terminal).
    """
    from tqdm.auto import tqdm

    if isinstance(data, (str, bytes)):
        raise TypeError("data must be a list of texts or paths, not a single str; wrap it in a list")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = _auto_eos(tokenizer) if eos_id == "auto" else eos_id
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, (int, np.integer))):
        raise ValueError(f"eos_id must be an int, None or 'auto', got {eos!r}")
    if eos is not None and not 0 <= int(eos) < tokenizer.n_vocab:
        raise ValueError(f"eos_id={eos} is not a token id of this tokenizer (0..{tokenizer.n_vocab - 1})")
    itemsize = 2 if tokenizer.n_vocab <= 1 << 16 else 4
    max_tokens = _check_int("max_tokens_per_shard", max_tokens_per_shard, maximum=2**64 - 1)
    num_threads = _check_int("num_threads", num_threads, maximum=_MAX_THREADS, optional=True)
    batch_files = _check_int("batch_files", batch_files)  # type: ignore[assignment]
    sink = _core.ShardSink(out, prefix, itemsize, max_tokens, eos)
    core = tokenizer._core
    disable = None if show_progress is None else not show_progress
    texts: List[str] = []
    paths: List[str] = []
    try:
        with tqdm(desc="writing shards", unit="doc", disable=disable, leave=False) as bar:

            def flush_texts() -> None:
                if texts:
                    sink.add_texts(core, texts, num_threads)
                    bar.update(len(texts))
                    texts.clear()

            def flush_paths() -> None:
                if paths:
                    sink.add_files(core, paths, num_threads)
                    bar.update(len(paths))
                    paths.clear()

            for item in data:
                if isinstance(item, str):
                    flush_paths()
                    texts.append(item)
                    if len(texts) >= 256:
                        flush_texts()
                elif isinstance(item, os.PathLike):
                    flush_texts()
                    paths.append(os.fspath(item))
                    if len(paths) >= batch_files:
                        flush_paths()
                else:
                    raise TypeError(f"data items must be str (text) or os.PathLike (file), got {type(item).__name__}")
            flush_texts()
            flush_paths()
        return [Path(p) for p in sink.close()]
    except BaseException:
        sink.abort()  # the unfinished shard's temporary file is removed; finished ones stay
        raise


def is_token_shard(path: PathLike) -> bool:
    """Whether ``path`` is a token shard written by :func:`write_shards` (by its magic bytes)."""
    with open(path, "rb") as f:
        return f.read(7) == b"FLMTOKS"


def expand_paths(paths: Sequence[PathLike]) -> List[Path]:
    """The files named by ``paths``: files as given, folders by their visible files (sorted).

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: paths that hold no file.
    """
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    if paths and not out:
        raise ValueError(f"no files found in {[str(p) for p in paths]}")
    return out


class TokenShard:
    """A token shard opened without loading it: ids are a read-only ``numpy.memmap``.

    :meth:`blocks` (and so :meth:`random_batch` and :class:`ShardDataset`) copy ids with
    checked reads: a shard truncated or rewritten after it was opened raises ``FormatError``.
    :attr:`tokens` is a plain memory map: do not truncate or rewrite a shard while it is open,
    or touching ``tokens`` past the new end kills the process with SIGBUS (as any memmap does).

    Raises:
        FileNotFoundError: no such file.
        FormatError: not a shard, truncated, or written by a newer ferrolm.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(
                f"{self.path} is a folder, not a token shard file; pass one shard file "
                "(ferrolm.data.expand_paths lists the shards of a folder)"
            )
        itemsize, count = _core.shard_info(str(self.path))  # validates the header and size
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
        self._count = count
        self._reader = _core.ShardReader(str(self.path))
        self.tokens = (
            np.memmap(self.path, dtype=self.dtype, mode="r", offset=32, shape=(count,))
            if count
            else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"TokenShard({str(self.path)!r}, tokens={self._count}, dtype={self.dtype.name})"

    def blocks(self, starts: Sequence[int], length: int) -> np.ndarray:
        """Returns a (len(starts), length) int64 array of the ids from each start.

        Raises:
            ValueError: a start or ``length`` that is negative or not an int (the message names
                it), or a block outside the shard.
            FormatError: the file shrank since it was opened.
        """
        top = 2**64 - 1
        firsts = [_check_int(f"starts[{i}]", s, minimum=0, maximum=top) for i, s in enumerate(starts)]
        return self._reader.gather(firsts, _check_int("length", length, minimum=0))

    def random_batch(self, batch_size: int, block_size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Returns ``(x, y)``, each (batch_size, block_size) int64: random windows and their
        next-token targets (nanoGPT's ``get_batch``)."""
        _check_block_size(block_size)
        _check_int("batch_size", batch_size)
        if self._count <= block_size:
            raise ValueError(f"shard has {self._count} tokens, too few for block_size={block_size}")
        starts = rng.integers(0, self._count - block_size, size=batch_size)
        both = self.blocks(starts, block_size + 1)
        return both[:, :-1], both[:, 1:]

    def __getstate__(self) -> Dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["path"])


class ShardDataset:
    """Map-style dataset of non-overlapping ``block_size`` windows over one or more shards.

    Item i is a dict of int64 ``input_ids`` and ``targets`` (next tokens), each (block_size,);
    ``__getitems__`` returns a whole batch (DataLoader calls it, one Rust gather per batch).
    Shards are memory-mapped: workers (fork or spawn) share the page cache, nothing is loaded.
    """

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], block_size: int, return_tensors: str = "pt") -> None:
        _check_block_size(block_size)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.shards = [TokenShard(p) for p in paths]
        if not self.shards:
            raise ValueError("ShardDataset needs at least one shard")
        self.block_size = block_size
        self.return_tensors = return_tensors
        counts = [max(0, (len(s) - 1) // block_size) for s in self.shards]
        self._cum = np.cumsum([0] + counts)
        if self._cum[-1] == 0:
            raise ValueError(f"the shards hold no full window of block_size={block_size} (+1 target)")

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _locate(self, i: int) -> Tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        i %= len(self)
        s = int(np.searchsorted(self._cum, i, side="right") - 1)
        return s, (i - int(self._cum[s])) * self.block_size

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, Any]:
        rows = np.empty((len(indices), self.block_size + 1), dtype=np.int64)
        located = [self._locate(int(i)) for i in indices]
        for s in set(s for s, _ in located):
            where = [k for k, (t, _) in enumerate(located) if t == s]
            rows[where] = self.shards[s].blocks([located[k][1] for k in where], self.block_size + 1)
        return _wrap(
            {"input_ids": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])},
            self.return_tensors,
        )


class DocumentDataset:
    """Map-style dataset over in-memory token documents, stored once as a flat array.

    Item i is document i as a 1-D int64 numpy array (a view, no copy). Use
    :attr:`lengths` with :class:`BucketBatchSampler` and :class:`PadCollator` as the
    ``collate_fn``; ``__getitems__`` serves a batch at once.

    Example:
        >>> ds = DocumentDataset([[1, 2, 3], [4]])
        >>> ds[1].tolist(), ds.lengths.tolist()
        ([4], [3, 1])
    """

    def __init__(self, documents: Sequence[Sequence[int]]) -> None:
        docs = [np.asarray(d, dtype=np.int64).reshape(-1) for d in _to_numpy_rows(documents)]
        if not docs:
            raise ValueError("DocumentDataset needs at least one document")
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.flat = np.concatenate(docs) if docs else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} documents")
        i %= len(self)
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        flat, off = self.flat, self.offsets
        return [flat[off[i] : off[i + 1]] for i in indices]


class PadCollator:
    """A ``collate_fn`` that pads a batch in Rust.

    Items may be token sequences (lists, arrays, tensors) or dicts with ``input_ids`` (other
    keys are dropped). Returns a dict with ``input_ids`` and ``attention_mask``, plus
    ``labels`` (``input_ids`` with ``IGNORE_INDEX`` on padding) when ``labels=True``.
    Picklable, so it works with DataLoader workers under fork and spawn.
    """

    def __init__(
        self,
        pad_id: int = 0,
        max_length: Optional[int] = None,
        side: str = "right",
        truncation: Union[bool, str] = False,
        dtype: Any = "int64",
        pad_to_multiple_of: Optional[int] = None,
        labels: bool = False,
        return_tensors: str = "pt",
    ) -> None:
        self.kwargs = dict(
            pad_id=pad_id,
            max_length=max_length,
            side=side,
            truncation=truncation,
            dtype=dtype,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        self.labels = labels
        self.return_tensors = return_tensors

    def __call__(self, batch: Sequence[Any]) -> Dict[str, Any]:
        if len(batch) and isinstance(batch[0], dict):
            batch = [item["input_ids"] for item in batch]
        ids, mask = pad(batch, **self.kwargs)  # type: ignore[arg-type]
        out = {"input_ids": ids, "attention_mask": mask}
        if self.labels:
            out["labels"] = np.where(mask.astype(bool), ids, IGNORE_INDEX).astype(ids.dtype)
        return _wrap(out, self.return_tensors)
