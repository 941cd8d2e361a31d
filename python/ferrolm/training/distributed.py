"""DDP (gloo) for :func:`ferrolm.training.train`: the process group torchrun asks for, and the
two collectives the loop needs (a mean of a float, an any of a flag)."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Tuple

import torch

from .._io import PathLike, folder_lock

__all__ = ["setup", "all_mean", "any_rank", "output_lock"]


def output_lock(out_dir: PathLike) -> ContextManager:
    """:func:`ferrolm._io.folder_lock` on ``out_dir`` in the process that writes it (rank 0 under
    torchrun, which sets ``RANK``); the other ranks share that process's lock."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return folder_lock(out_dir)


def setup() -> Tuple[int, int, bool]:
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


def all_mean(value: float, world: int) -> float:
    if world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def any_rank(flag: bool, world: int) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t)
    return bool(t.item())
