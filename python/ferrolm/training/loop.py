"""Training loop for ferrolm's language models: AdamW, warmup + cosine schedule, gradient
clipping and accumulation, periodic eval loss and perplexity, a tqdm bar with tokens/s,
atomic checkpoints with exact resume, Ctrl-C that saves before exiting, and DDP (gloo) when
launched by ``torchrun``.

Exact resume: the batch order is a pure function of (seed, epoch, position) — a seeded
permutation of the windows per epoch — so a checkpoint stores the position, not a sampler;
torch's and Python's RNG states (dropout, sampling) are saved with the model and optimizer.
A checkpoint folder holds ``train_state.pt`` (read back with ``torch.load(weights_only=True)``:
tensors and plain containers only, never arbitrary pickle) and ``model.safetensors`` (the
weights for :func:`ferrolm.models.load_model`), written as one unit (:mod:`.state`); the folder
is locked while a run writes into it (a second run into it is refused, naming the first's pid).

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

import contextlib
import math
import random
import time
from typing import Any, Callable, Dict, Optional

import torch

from .._io import PathLike, folder_lock
from .batches import SyntheticBatches, _Epochs, batches_for
from .config import TrainConfig, TrainResult
from .distributed import all_mean, any_rank, setup
from .state import SigintFlag, load_train_state, save_checkpoint, set_rng_state, sigint_deferred

__all__ = ["TrainConfig", "TrainResult", "train", "lr_at", "evaluate", "make_optimizer"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


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
    fused = {"fused": True} if cfg.fused_adam else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)


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
    return all_mean(total / max(1, count), world)


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

    Raises:
        ferrolm._io.FolderLockedError (an OSError): another process trains into ``out_dir``.
    """
    cfg = config or TrainConfig()
    rank, world, owns_group = setup()
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the folder holding the checkpoint)")
    lock = folder_lock(out_dir) if out_dir is not None and rank == 0 else contextlib.nullcontext()
    with lock:
        return _train(model, train_data, val_data, cfg, out_dir, resume, callback, rank, world, owns_group)


def _train(model, train_data, val_data, cfg, out_dir, resume, callback, rank, world, owns_group) -> TrainResult:
    batches = batches_for(train_data, cfg, rank, world, model=model)
    val = batches_for(val_data, cfg, rank, world, shuffle=False, model=model) if val_data is not None else None
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
        set_rng_state(state["rng"])
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
            with sigint_deferred():  # Ctrl-C lands after the checkpoint is whole
                save_checkpoint(out_dir, model, optimizer, step, cfg, batches.state_dict(), result)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    device = next(model.parameters()).device
    step = start
    sigint = SigintFlag()
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
                    ctx = net.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()  # type: ignore[operator]
                    with ctx:
                        _, loss = _run(net, x, y)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach())
                gnorm = (
                    float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                    if cfg.grad_clip > 0
                    else float("nan")
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                tokens_per_step = step_tokens * world
                result.tokens += tokens_per_step
                metrics = {
                    "step": step,
                    "loss": all_mean(loss_sum / cfg.grad_accum, world),
                    "lr": lr,
                    "grad_norm": gnorm,
                    "tokens_per_s": tokens_per_step / dt if dt > 0 else float("inf"),
                }
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
                if any_rank(sigint.hit, world):
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
