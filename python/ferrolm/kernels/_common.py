"""What the kernels share: the thread count they run on and the tensor <-> numpy hand-off.

The Rust kernels take numpy views of contiguous CPU tensors (no copy) and return numpy
arrays that ``torch.from_numpy`` wraps (no copy); they run on ``torch.get_num_threads()``
threads so ferrolm never oversubscribes the cores torch already uses.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["num_threads", "needs_grad"]


def num_threads() -> int:
    """The kernels' thread count: ``torch.get_num_threads()`` (never more than that)."""
    return max(1, torch.get_num_threads())


def to_numpy(t: Optional[torch.Tensor]):
    """A numpy view of ``t`` made contiguous (None stays None)."""
    if t is None:
        return None
    return t.detach().contiguous().numpy()


def from_numpy(a) -> Optional[torch.Tensor]:
    """``torch.from_numpy(a)`` (None stays None)."""
    return None if a is None else torch.from_numpy(a)


def needs_grad(*tensors) -> bool:
    """Whether autograd will record a call on these tensors (grad mode on and one requires it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
