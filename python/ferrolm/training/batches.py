"""Batch sources for :func:`ferrolm.training.train`, all on one base (``_Epochs``): every batch
is a pure function of (seed, epoch, position), so a checkpoint stores a position and resume is
exact. :class:`TokenBatches` (windows of a token stream), :class:`ExampleBatches` ((prompt,
target) pairs with the loss on the targets only), :class:`Seq2SeqBatches` ((source, target)
pairs for encoder-decoder models) and :class:`SyntheticBatches` (batches drawn by a function,
for the ICL science tasks); each splits its batches between DDP ranks.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import TokenShard

__all__ = ["TokenBatches", "ExampleBatches", "Seq2SeqBatches", "SyntheticBatches", "batches_for"]


def _as_tokens(data: Any, what: str) -> np.ndarray:
    if isinstance(data, TokenShard):
        arr = data.tokens
    elif isinstance(data, (str, os.PathLike)):
        arr = TokenShard(data).tokens
    elif isinstance(data, (list, tuple)) and data and isinstance(data[0], (str, os.PathLike, TokenShard)):
        arr = np.concatenate([_as_tokens(d, what) for d in data])
    elif isinstance(data, torch.Tensor):
        arr = data.detach().cpu().numpy()
    else:
        arr = np.asarray(data)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{what} must be a 1-D integer token stream (array, tensor, shard path or TokenShard), "
            f"got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr


class _Epochs:
    """The visiting order shared by the batch sources: ``n_windows`` items per epoch in a
    permutation seeded by ``(seed, epoch)``, ``per_epoch`` batches, a resumable position."""

    n_windows: int
    per_epoch: int

    def _perm(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
        return self._order

    def _picked(self, epoch: int, index: int) -> np.ndarray:
        """This rank's items of batch ``index`` of ``epoch`` (the position does not move)."""
        saved = (self.epoch, self._order)
        if epoch != self.epoch:
            self.epoch, self._order = epoch, None
        g = self.batch_size * self.world_size
        picked = self._perm()[index * g + self.rank * self.batch_size : index * g + (self.rank + 1) * self.batch_size]
        self.epoch, self._order = saved
        return picked

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch; wraps into a new (reshuffled) epoch."""
        if self.index >= self.per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        out = self.batch_at(self.epoch, self.index)
        self.index += 1
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("n_windows") != self.n_windows or state.get("seed") != self.seed:
            raise ValueError(
                f"the checkpoint's data position is for another stream "
                f"({state.get('n_windows')} windows, seed {state.get('seed')}), "
                f"this one has {self.n_windows} windows, seed {self.seed}; resume on the same data and seq_len"
            )
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


class TokenBatches(_Epochs):
    """Next-token batches ``(x, y)`` (batch_size, seq_len) int64 from a 1-D token stream.

    The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (stride seq_len);
    each epoch visits them in a permutation seeded by ``(seed, epoch)``. Under DDP a global
    batch is ``world_size * batch_size`` windows and rank r takes its r-th slice, so the
    processes together see exactly what one process with the global batch would.
    ``state_dict()``/``load_state_dict()`` save and restore the position.
    """

    def __init__(
        self,
        tokens: Any,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.tokens = _as_tokens(tokens, "tokens")
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), shuffle
        self.n_windows = max(0, (len(self.tokens) - 1) // self.seq_len)
        self.per_epoch = self.n_windows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            need = self.batch_size * self.world_size * self.seq_len + 1
            raise ValueError(
                f"{len(self.tokens)} tokens are too few for one batch of "
                f"{self.batch_size * self.world_size} x {self.seq_len} "
                f"(need {need}); lower batch_size or seq_len, or add data"
            )
        self.epoch, self.index = 0, 0
        self._order: Optional[np.ndarray] = None

    def batch_at(self, epoch: int, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch ``index`` of ``epoch`` for this rank (does not move the position)."""
        starts = self._picked(epoch, index) * self.seq_len
        both = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)[None, :]].astype(np.int64)
        t = torch.from_numpy(both)
        return t[:, :-1], t[:, 1:]


def _is_pairs(data: Any) -> bool:
    """Whether ``data`` is a list of (prompt ids, target ids) pairs rather than a token stream."""
    if not isinstance(data, (list, tuple)) or not data:
        return False
    first = data[0]
    return (
        isinstance(first, (list, tuple))
        and len(first) == 2
        and all(isinstance(part, (list, tuple, np.ndarray, torch.Tensor)) for part in first)
    )


class ExampleBatches(_Epochs):
    """Supervised next-token batches ``(x, y)`` from ``(prompt ids, target ids)`` pairs, for
    fine-tuning on a task (instruction or classification data): the loss covers the target
    tokens only.

    A row is ``prompt + target``; ``x`` is the row without its last token and ``y`` the row
    without its first, with -100 (ignored by the loss) wherever ``y`` holds a prompt token or
    padding. Rows are right-padded with id 0 to the longest row of their batch (causal models
    never let a real position see the pads after it, so padding does not change a loss). A
    row longer than ``seq_len + 1`` tokens loses prompt tokens from the left; the target is
    never cut. Epochs visit the examples in a permutation seeded by ``(seed, epoch)``; under
    DDP rank r takes the r-th slice of each global batch, as :class:`TokenBatches` does.

    Example:
        >>> b = ExampleBatches([([1, 2, 3], [4, 5]), ([6], [7])], batch_size=2, seq_len=8, shuffle=False)
        >>> x, y = b.next()
        >>> x.tolist(), y.tolist()
        ([[1, 2, 3, 4], [6, 0, 0, 0]], [[-100, -100, 4, 5], [7, -100, -100, -100]])
    """

    def __init__(
        self,
        pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), shuffle
        self.rows: List[Tuple[np.ndarray, int]] = []  # (prompt + target, index of the first target token)
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"example {i}: expected a (prompt ids, target ids) pair, got {type(pair).__name__}")
            prompt, target = (np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p) for p in pair)
            for part, what in ((prompt, "prompt"), (target, "target")):
                if part.ndim != 1 or (part.size and not np.issubdtype(part.dtype, np.integer)):
                    raise ValueError(
                        f"example {i}: the {what} must be a 1-D sequence of int token ids, "
                        f"got shape {part.shape} dtype {part.dtype}"
                    )
            if target.size == 0:
                raise ValueError(f"example {i}: the target is empty (nothing to learn)")
            if target.size > self.seq_len:
                raise ValueError(f"example {i}: a target of {target.size} tokens does not fit seq_len={self.seq_len}")
            if prompt.size == 0:
                raise ValueError(
                    f"example {i}: the prompt is empty; give at least one token (for example a BOS / end-of-text id)"
                )
            keep = min(prompt.size, self.seq_len + 1 - target.size)
            self.rows.append((np.concatenate([prompt[prompt.size - keep :], target]).astype(np.int64), keep))
        self.n_windows = len(self.rows)
        self.per_epoch = self.n_windows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"{self.n_windows} examples are too few for one batch of {self.batch_size * self.world_size}; "
                "lower batch_size or add data"
            )
        self.epoch, self.index = 0, 0
        self._order: Optional[np.ndarray] = None

    def batch_at(self, epoch: int, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch ``index`` of ``epoch`` for this rank (does not move the position)."""
        picked = self._picked(epoch, index)
        width = max(self.rows[i][0].size for i in picked) - 1
        x = np.zeros((len(picked), width), dtype=np.int64)
        y = np.full((len(picked), width), -100, dtype=np.int64)
        for r, i in enumerate(picked):
            row, start = self.rows[i]
            x[r, : row.size - 1] = row[:-1]
            y[r, start - 1 : row.size - 1] = row[start:]
        return torch.from_numpy(x), torch.from_numpy(y)


class Seq2SeqBatches(_Epochs):
    """Teacher-forcing batches for encoder-decoder models from ``(source ids, target ids)``
    pairs: ``x = (src, tgt_in)`` and ``y`` with

    - ``src`` (B, S): the sources, right-padded with ``pad_id`` to the longest of the batch;
    - ``tgt_in`` (B, T): ``[bos_id] + target``, right-padded with ``pad_id``;
    - ``y`` (B, T): ``target + [eos_id]``, -100 (no loss) on the padding.

    Epochs visit the pairs in a permutation seeded by ``(seed, epoch)`` (DDP ranks take their
    slice of each global batch, as :class:`TokenBatches`), so training resumes exactly. The
    trainer builds one of these itself for a model with ``is_encoder_decoder`` and a list of
    pairs, taking the special ids from ``model.config``.

    Example:
        >>> b = Seq2SeqBatches([([5, 6, 7], [8]), ([9], [10, 11])], batch_size=2, pad_id=0, bos_id=1, eos_id=2,
        ...                    shuffle=False)
        >>> (src, tgt_in), y = b.next()
        >>> src.tolist(), tgt_in.tolist(), y.tolist()
        ([[5, 6, 7], [9, 0, 0]], [[1, 8, 0], [1, 10, 11]], [[8, 2, -100], [10, 11, 2]])
    """

    def __init__(
        self,
        pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
        batch_size: int,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        max_len: Optional[int] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.batch_size = int(batch_size)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), shuffle
        self.rows: List[Tuple[np.ndarray, np.ndarray]] = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"pair {i}: expected a (source ids, target ids) pair, got {type(pair).__name__}")
            src, tgt = (
                np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.int64) for p in pair
            )
            if src.ndim != 1 or src.size == 0:
                raise ValueError(f"pair {i}: the source must be a non-empty 1-D sequence of ids, got shape {src.shape}")
            if tgt.ndim != 1:
                raise ValueError(f"pair {i}: the target must be a 1-D sequence of ids, got shape {tgt.shape}")
            if self.pad_id in src or self.pad_id in tgt:
                raise ValueError(f"pair {i} holds pad_id={self.pad_id}; give the sequences unpadded")
            if max_len is not None and (src.size > max_len or tgt.size + 1 > max_len):
                raise ValueError(
                    f"pair {i}: source of {src.size} / target of {tgt.size} (+1 for BOS/EOS) tokens "
                    f"exceeds max_len={max_len}"
                )
            self.rows.append((src, tgt))
        self.n_windows = len(self.rows)
        self.per_epoch = self.n_windows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"{self.n_windows} pairs are too few for one batch of {self.batch_size * self.world_size}; "
                "lower batch_size or add data"
            )
        self.epoch, self.index = 0, 0
        self._order: Optional[np.ndarray] = None

    def batch_at(self, epoch: int, index: int) -> Tuple[Tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The batch ``index`` of ``epoch`` for this rank (does not move the position)."""
        picked = [self.rows[i] for i in self._picked(epoch, index)]
        S = max(s.size for s, _ in picked)
        T = max(t.size for _, t in picked) + 1
        src = np.full((len(picked), S), self.pad_id, dtype=np.int64)
        tgt_in = np.full((len(picked), T), self.pad_id, dtype=np.int64)
        y = np.full((len(picked), T), -100, dtype=np.int64)
        for r, (s, t) in enumerate(picked):
            src[r, : s.size] = s
            tgt_in[r, 0] = self.bos_id
            tgt_in[r, 1 : t.size + 1] = t
            y[r, : t.size] = t
            y[r, t.size] = self.eos_id
        return (torch.from_numpy(src), torch.from_numpy(tgt_in)), torch.from_numpy(y)


class SyntheticBatches:
    """Batches generated on the fly: batch ``index`` is ``make(rng)`` with ``rng`` a numpy
    ``Generator`` seeded by ``(seed, rank, index)``, so every batch is a pure function of its
    position (exact resume with no stored data) and DDP ranks draw different batches. For
    tasks whose examples are sampled rather than read (in-context regression, associative
    recall, ...); ``make`` returns ``(x, y)`` tensors in whatever form the model's
    ``forward(x, targets=y)`` takes.

    ``batch_at(0, i)`` for the first few ``i`` is a fixed set, which :func:`evaluate` uses as
    a validation set (give the validation source another seed).

    Example:
        >>> import torch
        >>> b = SyntheticBatches(lambda rng: (torch.from_numpy(rng.normal(size=(2, 3))), None), seed=1)
        >>> bool((b.next()[0] == b.batch_at(0, 0)[0]).all())
        True
    """

    def __init__(
        self, make: Callable[[np.random.Generator], Tuple[Any, Any]], seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not callable(make):
            raise TypeError(f"make must be a callable rng -> (x, y), got {type(make).__name__}")
        self.make, self.seed, self.rank, self.world_size = make, int(seed), int(rank), int(world_size)
        self.index = 0
        self.per_epoch = 2**62  # endless

    def batch_at(self, epoch: int, index: int) -> Tuple[Any, Any]:
        return self.make(np.random.default_rng([self.seed, self.rank, epoch, index]))

    def next(self) -> Tuple[Any, Any]:
        self.index += 1
        return self.batch_at(0, self.index - 1)

    def state_dict(self) -> Dict[str, int]:
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("seed") != self.seed or "index" not in state:
            raise ValueError(
                f"the checkpoint's data position is for another source (seed {state.get('seed')}), "
                f"this one has seed {self.seed}"
            )
        self.index = int(state["index"])


def batches_for(
    data: Any, cfg: Any, rank: int, world: int, shuffle: bool = True, model: Optional[torch.nn.Module] = None
):
    if isinstance(data, (_Epochs, SyntheticBatches)):
        return data  # a batch source built by the caller (its own batch size and seed)
    mc = getattr(model, "config", None)
    if getattr(model, "is_encoder_decoder", False) and mc is not None:
        if not _is_pairs(data):
            raise ValueError(
                f"{type(model).__name__} trains on (source ids, target ids) pairs (or a Seq2SeqBatches); "
                f"got {type(data).__name__}"
            )
        return Seq2SeqBatches(
            data, cfg.batch_size, mc.pad_id, mc.bos_id, mc.eos_id, mc.max_len, cfg.seed, rank, world, shuffle
        )
    if _is_pairs(data):
        return ExampleBatches(data, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, shuffle)
    return TokenBatches(data, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, shuffle)
