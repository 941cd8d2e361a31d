"""Training ferrolm's models: :mod:`.loop` (:func:`train`, :class:`TrainConfig`: AdamW, warmup +
cosine, clipping, accumulation, eval perplexity, a progress bar with tokens/s, Ctrl-C that saves,
DDP under torchrun), :mod:`.batches` (the batch sources, exact resume), :mod:`.state`
(checkpoints) and :mod:`.distributed` (gloo process groups).

Example:
    >>> from ferrolm.models import GPT, GPTConfig
    >>> from ferrolm.training import TrainConfig, train
    >>> import numpy as np
    >>> tokens = np.random.default_rng(0).integers(0, 64, 20_000)
    >>> model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16))
    >>> result = train(model, tokens, config=TrainConfig(max_steps=5, batch_size=4, seq_len=32, progress=False))
    >>> len(result.history)
    5
"""

from __future__ import annotations

from .batches import ExampleBatches, Seq2SeqBatches, SyntheticBatches, TokenBatches
from .loop import TrainConfig, TrainResult, evaluate, lr_at, make_optimizer, train
from .state import load_train_state

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TokenBatches",
    "ExampleBatches",
    "Seq2SeqBatches",
    "SyntheticBatches",
    "train",
    "lr_at",
    "evaluate",
    "load_train_state",
    "make_optimizer",
]
