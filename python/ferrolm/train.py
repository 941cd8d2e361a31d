"""Training loop for ferrolm's language models: AdamW, warmup + cosine schedule, gradient
clipping and accumulation, periodic eval loss and perplexity, a tqdm bar with tokens/s,
atomic checkpoints with exact resume, Ctrl-C that saves before exiting, and DDP (gloo) when
launched by ``torchrun``.

Exact resume: the batch order is a pure function of (seed, epoch, position) — a seeded
permutation of the windows per epoch — so a checkpoint stores the position, not a sampler;
torch's and Python's RNG states (dropout, sampling) are saved with the model and optimizer.
A checkpoint folder holds ``train_state.pt`` (read back with ``torch.load(weights_only=True)``:
tensors and plain containers only, never arbitrary pickle) and ``model.safetensors`` (the
weights for :func:`ferrolm.models.load_model`); each file is written to a temporary name and
renamed.

Example:
    >>> from ferrolm.models import GPT, GPTConfig
    >>> from ferrolm.train import TrainConfig, train
    >>> import numpy as np
    >>> tokens = np.random.default_rng(0).integers(0, 64, 20_000)
    >>> model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16))
    >>> result = train(model, tokens, config=TrainConfig(max_steps=5, batch_size=4, seq_len=32, progress=False))
    >>> len(result.history)
    5
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._config import Config
from ._io import PathLike, atomic_write

__all__ = ["TrainConfig", "TrainResult", "TokenBatches", "ExampleBatches", "Seq2SeqBatches", "SyntheticBatches", "train", "lr_at", "evaluate", "load_train_state"]

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.safetensors"


@dataclass
class TrainConfig(Config):
    """Options of :func:`train`.

    Args:
        max_steps: optimizer steps. batch_size: sequences per micro-batch (per process under
            DDP). seq_len: tokens per sequence (T). grad_accum: micro-batches per step.
        lr, min_lr, warmup_steps: linear warmup to ``lr``, then cosine decay to ``min_lr`` at
            ``max_steps``. weight_decay (on matrices and embeddings only), beta1, beta2, eps:
            AdamW. grad_clip: max global gradient norm (0 = off).
        eval_interval, eval_batches: evaluate every this many steps (and at the end) on this
            many validation batches. checkpoint_interval: steps between checkpoints (0 = only
            at the end and on Ctrl-C; needs ``out_dir``).
        seed: model-independent RNG seed (batch order, dropout). progress: show a tqdm bar.
    """

    max_steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 0
    seed: int = 1337
    progress: bool = True

    def __post_init__(self) -> None:
        self._positive("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"TrainConfig needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.grad_clip and weight_decay must be >= 0")



@dataclass
class TrainResult:
    """What :func:`train` did: per-step ``history`` (step, loss, lr, grad_norm, tokens_per_s),
    ``evals`` (step, val_loss, val_ppl), the last step, and whether Ctrl-C stopped it."""

    history: List[Dict[str, float]] = field(default_factory=list)
    evals: List[Dict[str, float]] = field(default_factory=list)
    step: int = 0
    tokens: int = 0
    interrupted: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# --------------------------------------------------------------------------- data


def _as_tokens(data: Any, what: str) -> np.ndarray:
    from .data import TokenShard

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
        raise ValueError(f"{what} must be a 1-D integer token stream (array, tensor, shard path or TokenShard), got shape {arr.shape} dtype {arr.dtype}")
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
            raise ValueError(f"the checkpoint's data position is for another stream ({state.get('n_windows')} windows, seed {state.get('seed')}), "
                             f"this one has {self.n_windows} windows, seed {self.seed}; resume on the same data and seq_len")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


class TokenBatches(_Epochs):
    """Next-token batches ``(x, y)`` (batch_size, seq_len) int64 from a 1-D token stream.

    The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (stride seq_len);
    each epoch visits them in a permutation seeded by ``(seed, epoch)``. Under DDP a global
    batch is ``world_size * batch_size`` windows and rank r takes its r-th slice, so the
    processes together see exactly what one process with the global batch would.
    ``state_dict()``/``load_state_dict()`` save and restore the position.
    """

    def __init__(self, tokens: Any, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.tokens = _as_tokens(tokens, "tokens")
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), shuffle
        self.n_windows = max(0, (len(self.tokens) - 1) // self.seq_len)
        self.per_epoch = self.n_windows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            need = self.batch_size * self.world_size * self.seq_len + 1
            raise ValueError(f"{len(self.tokens)} tokens are too few for one batch of {self.batch_size * self.world_size} x {self.seq_len} "
                             f"(need {need}); lower batch_size or seq_len, or add data")
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
    return (isinstance(first, (list, tuple)) and len(first) == 2
            and all(isinstance(part, (list, tuple, np.ndarray, torch.Tensor)) for part in first))


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

    def __init__(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), shuffle
        self.rows: List[Tuple[np.ndarray, int]] = []  # (prompt + target, index of the first target token)
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"example {i}: expected a (prompt ids, target ids) pair, got {type(pair).__name__}")
            prompt, target = (np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p) for p in pair)
            for part, what in ((prompt, "prompt"), (target, "target")):
                if part.ndim != 1 or (part.size and not np.issubdtype(part.dtype, np.integer)):
                    raise ValueError(f"example {i}: the {what} must be a 1-D sequence of int token ids, got shape {part.shape} dtype {part.dtype}")
            if target.size == 0:
                raise ValueError(f"example {i}: the target is empty (nothing to learn)")
            if target.size > self.seq_len:
                raise ValueError(f"example {i}: a target of {target.size} tokens does not fit seq_len={self.seq_len}")
            if prompt.size == 0:
                raise ValueError(f"example {i}: the prompt is empty; give at least one token (for example a BOS / end-of-text id)")
            keep = min(prompt.size, self.seq_len + 1 - target.size)
            self.rows.append((np.concatenate([prompt[prompt.size - keep :], target]).astype(np.int64), keep))
        self.n_windows = len(self.rows)
        self.per_epoch = self.n_windows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            raise ValueError(f"{self.n_windows} examples are too few for one batch of {self.batch_size * self.world_size}; lower batch_size or add data")
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
        >>> b = Seq2SeqBatches([([5, 6, 7], [8]), ([9], [10, 11])], batch_size=2, pad_id=0, bos_id=1, eos_id=2, shuffle=False)
        >>> (src, tgt_in), y = b.next()
        >>> src.tolist(), tgt_in.tolist(), y.tolist()
        ([[5, 6, 7], [9, 0, 0]], [[1, 8, 0], [1, 10, 11]], [[8, 2, -100], [10, 11, 2]])
    """

    def __init__(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], batch_size: int, pad_id: int, bos_id: int, eos_id: int,
                 max_len: Optional[int] = None, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.batch_size = int(batch_size)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), shuffle
        self.rows: List[Tuple[np.ndarray, np.ndarray]] = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"pair {i}: expected a (source ids, target ids) pair, got {type(pair).__name__}")
            src, tgt = (np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.int64) for p in pair)
            if src.ndim != 1 or src.size == 0:
                raise ValueError(f"pair {i}: the source must be a non-empty 1-D sequence of ids, got shape {src.shape}")
            if tgt.ndim != 1:
                raise ValueError(f"pair {i}: the target must be a 1-D sequence of ids, got shape {tgt.shape}")
            if self.pad_id in src or self.pad_id in tgt:
                raise ValueError(f"pair {i} holds pad_id={self.pad_id}; give the sequences unpadded")
            if max_len is not None and (src.size > max_len or tgt.size + 1 > max_len):
                raise ValueError(f"pair {i}: source of {src.size} / target of {tgt.size} (+1 for BOS/EOS) tokens exceeds max_len={max_len}")
            self.rows.append((src, tgt))
        self.n_windows = len(self.rows)
        self.per_epoch = self.n_windows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            raise ValueError(f"{self.n_windows} pairs are too few for one batch of {self.batch_size * self.world_size}; lower batch_size or add data")
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

    def __init__(self, make: Callable[[np.random.Generator], Tuple[Any, Any]], seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
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
            raise ValueError(f"the checkpoint's data position is for another source (seed {state.get('seed')}), this one has seed {self.seed}")
        self.index = int(state["index"])


def _batches(data: Any, cfg: "TrainConfig", rank: int, world: int, shuffle: bool = True, model: Optional[torch.nn.Module] = None):
    if isinstance(data, (_Epochs, SyntheticBatches)):
        return data  # a batch source built by the caller (its own batch size and seed)
    mc = getattr(model, "config", None)
    if getattr(model, "is_encoder_decoder", False) and mc is not None:
        if not _is_pairs(data):
            raise ValueError(f"{type(model).__name__} trains on (source ids, target ids) pairs (or a Seq2SeqBatches); got {type(data).__name__}")
        return Seq2SeqBatches(data, cfg.batch_size, mc.pad_id, mc.bos_id, mc.eos_id, mc.max_len, cfg.seed, rank, world, shuffle)
    if _is_pairs(data):
        return ExampleBatches(data, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, shuffle)
    return TokenBatches(data, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, shuffle)


# --------------------------------------------------------------------------- distributed


def _dist_setup() -> Tuple[int, int, bool]:
    """(rank, world_size, initialised_here); initialises gloo when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")
    # Never oversubscribe the cores: split them between the processes.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return dist.get_rank(), dist.get_world_size(), True


def _all_mean(value: float, world: int) -> float:
    if world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _any(flag: bool, world: int) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t)
    return bool(t.item())


# --------------------------------------------------------------------------- optimizer, eval


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: _Epochs, n_batches: int, world: int = 1) -> float:
    """Mean next-token loss over the first ``n_batches`` batches of ``batches`` (a fixed,
    unshuffled set, so evaluations are comparable)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(min(n_batches, batches.per_epoch)):
        x, y = batches.batch_at(0, i)
        _, loss = _run(model, _to(x, device), _to(y, device))
        total += float(loss)
        count += 1
    model.train(was)
    return _all_mean(total / max(1, count), world)


def _to(x: Any, device) -> Any:
    """A batch part on ``device``: a tensor, or a tuple of them (encoder-decoder inputs)."""
    if isinstance(x, (tuple, list)):
        return tuple(_to(t, device) for t in x)
    return x.to(device, non_blocking=True)


def _run(net: torch.nn.Module, x: Any, y: Any):
    """``net(x, targets=y)``, or ``net(*x, targets=y)`` for a tuple of inputs (src, tgt)."""
    return net(*x, targets=y) if isinstance(x, tuple) else net(x, targets=y)


def _positions(x: Any) -> int:
    """Input positions of a batch, padding included (both sides for (src, tgt) inputs)."""
    if isinstance(x, (tuple, list)):
        return sum(_positions(t) for t in x)
    return x.shape[0] * (x.shape[1] if x.dim() > 1 else 1)


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(out_dir: PathLike, model: torch.nn.Module, optimizer, step: int, cfg: TrainConfig, data_state: Dict[str, int],
                    result: TrainResult) -> Path:
    """Writes ``train_state.pt`` and ``model.safetensors`` into ``out_dir`` atomically."""
    from .models import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "ferrolm-train-1",
        "step": step,
        "tokens": result.tokens,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "data": dict(data_state),
        "train_config": dataclasses.asdict(cfg),
        "history": result.history,
        "evals": result.evals,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(out / STATE_FILE, buf.getvalue())
    from .models import _MODELS, _with_seq2seq

    _with_seq2seq()
    if type(model) in _MODELS.values():  # wrappers (prompt tuning) keep train_state.pt only
        save_model(model, out / MODEL_FILE)
    return out


def load_train_state(out_dir: PathLike) -> Dict[str, Any]:
    """The training state saved in ``out_dir`` (``torch.load(weights_only=True)``: no pickle)."""
    from .errors import FormatError

    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise FormatError(f"{path} is not a readable ferrolm training checkpoint: {e}") from None
    if not isinstance(state, dict) or state.get("format") != "ferrolm-train-1":
        raise FormatError(f"{path} is not a ferrolm training checkpoint")
    return state


class _SigintFlag:
    """Turns Ctrl-C into a flag checked between optimizer steps, so the checkpoint written on
    exit is never of a half-updated model; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.hit = False
        self.hard = False
        self._old: Any = None

    def __enter__(self) -> "_SigintFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            self.hard = True
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# --------------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    train_data: Any,
    val_data: Any = None,
    config: Optional[TrainConfig] = None,
    out_dir: Optional[PathLike] = None,
    resume: bool = False,
    callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> TrainResult:
    """Trains a language model (``model(x, targets=y) -> (logits, loss)``) on a token stream.

    Args:
        model: a :class:`ferrolm.models.GPT` or :class:`~ferrolm.models.LSTMLanguageModel` (or
            any module with that forward).
        train_data, val_data: 1-D token streams: numpy arrays, tensors, shard paths or
            :class:`ferrolm.data.TokenShard` (lists of shards concatenate); or lists of
            ``(prompt ids, target ids)`` pairs for supervised fine-tuning, where the loss covers
            the target tokens only (:class:`ExampleBatches`); or a batch source built by the
            caller (:class:`TokenBatches`, :class:`ExampleBatches`, :class:`SyntheticBatches`).
        config: :class:`TrainConfig`.
        out_dir: checkpoint folder (``train_state.pt`` + ``model.safetensors``).
        resume: continue from ``out_dir``'s checkpoint: the model, optimizer, RNG and data
            position are restored, so the loss curve continues exactly as without the stop.
        callback: called after each step with (step, metrics); raising KeyboardInterrupt from
            it stops training like Ctrl-C.

    Returns:
        :class:`TrainResult`. On Ctrl-C the checkpoint is written (when ``out_dir`` is set),
        the result has ``interrupted=True`` and the loop returns instead of raising.
    """
    cfg = config or TrainConfig()
    rank, world, owns_group = _dist_setup()
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the folder holding the checkpoint)")
    batches = _batches(train_data, cfg, rank, world, model=model)
    val = _batches(val_data, cfg, rank, world, shuffle=False, model=model) if val_data is not None else None
    block = getattr(getattr(model, "config", None), "block_size", None)
    if block is not None and cfg.seq_len > block and not isinstance(batches, SyntheticBatches):
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's block_size={block}")
    optimizer = make_optimizer(model, cfg)
    result = TrainResult()
    start = 0
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if resume:
        state = load_train_state(out_dir)  # type: ignore[arg-type]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
        result.history, result.evals = list(state["history"]), list(state["evals"])
        result.tokens = int(state["tokens"])
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    model.train()
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def checkpoint(step: int) -> None:
        if out_dir is not None and rank == 0:
            save_checkpoint(out_dir, model, optimizer, step, cfg, batches.state_dict(), result)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    device = next(model.parameters()).device
    step = start
    sigint = _SigintFlag()
    try:
        with sigint:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, step_tokens = 0.0, 0
                for micro in range(cfg.grad_accum):
                    x, y = batches.next()
                    step_tokens += _positions(x)  # positions, padding included
                    x, y = _to(x, device), _to(y, device)
                    sync = micro == cfg.grad_accum - 1
                    ctx = net.no_sync() if (world > 1 and not sync) else _null()  # type: ignore[operator]
                    with ctx:
                        _, loss = _run(net, x, y)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach())
                gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if cfg.grad_clip > 0 else float("nan")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                tokens_per_step = step_tokens * world
                result.tokens += tokens_per_step
                metrics = {"step": step, "loss": _all_mean(loss_sum / cfg.grad_accum, world), "lr": lr, "grad_norm": gnorm,
                           "tokens_per_s": tokens_per_step / dt if dt > 0 else float("inf")}
                result.history.append(metrics)
                if val is not None and cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
                    vl = evaluate(model, val, cfg.eval_batches, world)
                    result.evals.append({"step": step, "val_loss": vl, "val_ppl": math.exp(min(vl, 700.0))})
                if bar is not None:
                    post = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
                    if result.evals and result.evals[-1]["step"] == step:
                        post["val_ppl"] = f"{result.evals[-1]['val_ppl']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if callback is not None:
                    callback(step, metrics)
                if _any(sigint.hit, world):
                    raise KeyboardInterrupt
                if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < cfg.max_steps:
                    checkpoint(step)
    except KeyboardInterrupt:
        result.interrupted = True
        if sigint.hard:  # a second Ctrl-C may have landed mid-step: keep the last good checkpoint
            raise
    finally:
        if bar is not None:
            bar.close()
    result.step = step
    checkpoint(step)
    if owns_group:
        import torch.distributed as dist

        # The DDP wrapper (its reducer holds gloo work objects) goes before the group does:
        # destroyed later, at interpreter exit, it aborted the process ("terminate called
        # without an active exception", 1 run in 6).
        del net
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return result


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None
