"""Fused dropout over the Rust dropout kernel (``rust/kernels/dropout.rs``): the mask is a
counter-based function of (seed, element index), regenerated in the backward instead of
stored.
"""

from __future__ import annotations

import torch

from .. import _core
from ._common import num_threads

__all__ = ["dropout"]


def _dropout_into(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    x = x.detach().contiguous()
    out = torch.empty_like(x)
    _core.dropout(x.numpy(), out.numpy(), p, seed, num_threads())
    return out


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        return _dropout_into(x, p, seed)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # The mask is a pure function of (seed, element index): regenerated, never stored.
        return _dropout_into(grad, ctx.p, ctx.seed), None, None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout`` with a fused Rust kernel for CPU float32/float64.

    Each element is kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``, as torch's;
    the mask comes from a counter-based hash of a seed drawn from torch's global generator (so
    ``torch.manual_seed`` makes it reproducible) and the element's index, and the backward
    regenerates it instead of keeping it in memory. The random numbers differ from torch's
    own dropout (the distribution is the same). Other devices and dtypes use
    ``torch.nn.functional.dropout``.

    Raises:
        ValueError: ``p`` outside [0, 1].
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.nn.functional.dropout(x, p, True)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return _Dropout.apply(x, float(p), seed)
