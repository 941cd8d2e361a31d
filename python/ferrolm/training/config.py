"""The options and the outcome of :func:`ferrolm.training.train`: :class:`TrainConfig` and
:class:`TrainResult` (their own module so the loop and the checkpoint code both import them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from .._config import Config

__all__ = ["TrainConfig", "TrainResult"]


@dataclass
class TrainConfig(Config):
    """Options of :func:`train`.

    Args:
        max_steps: optimizer steps. batch_size: sequences per micro-batch (per process under
            DDP). seq_len: tokens per sequence (T). grad_accum: micro-batches per step.
        lr, min_lr, warmup_steps: linear warmup to ``lr``, then cosine decay to ``min_lr`` at
            ``max_steps``. weight_decay (on matrices and embeddings only), beta1, beta2, eps:
            AdamW. grad_clip: max global gradient norm (0 = off). fused_adam: AdamW's fused
            kernel (one pass over each tensor; on one CPU core a step over SmolLM2-135M's
            parameters took 0.30 s instead of 1.55 s), rounding slightly differently.
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
    fused_adam: bool = False
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
