"""LSTM and GRU workloads: ferrolm.nn against torch.nn (oneDNN for the LSTM, torch's native GRU) with the same
weights and threads (``torch.get_num_threads()``): inference (no_grad) and training (forward + backward) on dense
batches, and forward + backward on a variable-length PackedSequence.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from ..harness import Result, Workload, measure

__all__ = ["rnn_workloads", "run"]


def rnn_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The recurrent comparisons, each sized in GFLOP of its matrix products (the packed one: ``var-len``).

    Args:
        smoke: tiny shapes, for a run that only checks the workloads work.
        full: five more shapes (512 wide, two layers) and a larger packed batch.
    """
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    from ... import nn as fnn

    # (batch, steps, input, hidden, layers)
    if smoke:
        shapes = [(1, 64, 32, 32, 1), (4, 32, 32, 32, 2)]
    else:
        shapes = [(1, 512, 256, 256, 1), (8, 256, 256, 256, 1), (64, 128, 256, 256, 1)]
    if full:
        shapes += [
            (1, 512, 512, 512, 1),
            (8, 256, 512, 512, 1),
            (32, 128, 512, 512, 1),
            (8, 256, 256, 256, 2),
            (32, 128, 512, 512, 2),
        ]
    out = []
    g = torch.Generator().manual_seed(0)
    for kind, torch_cls, ours_cls, gates in (("LSTM", torch.nn.LSTM, fnn.LSTM, 4), ("GRU", torch.nn.GRU, fnn.GRU, 3)):
        for b, t, i, h, layers in shapes:
            ref = torch_cls(i, h, num_layers=layers)
            ours = ours_cls(i, h, num_layers=layers)
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(t, b, i, generator=g)
            xg = x.clone().requires_grad_(True)
            flops = 2.0 * t * b * (i + h) * gates * h + 2.0 * t * b * 2 * h * gates * h * (layers - 1)
            shape = f"B={b} T={t} I={i} H={h}" + (f" L={layers}" if layers > 1 else "")

            def infer(m, x=x):
                with torch.no_grad():
                    return m(x)

            def train(m, xg=xg):
                m(xg)[0].sum().backward()

            # Defaults bind this iteration's functions and modules (closures bind late).
            out.append(
                Workload(
                    f"{kind} {shape}: forward (no_grad)",
                    {"ferrolm": lambda m=ours, f=infer: f(m), "torch": lambda m=ref, f=infer: f(m)},
                    f"{flops / 1e9:.2f} GFLOP",
                    {"gflop": flops / 1e9},
                )
            )
            out.append(
                Workload(
                    f"{kind} {shape}: forward+backward",
                    {"ferrolm": lambda m=ours, f=train: f(m), "torch": lambda m=ref, f=train: f(m)},
                    f"{3 * flops / 1e9:.2f} GFLOP",
                    {"gflop": 3 * flops / 1e9},
                )
            )
    b, t, i, h = (4, 32, 32, 32) if smoke else (16, 256, 512, 512) if full else (16, 128, 256, 256)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    lengths[0] = t
    x = torch.randn(t, b, i, generator=g, requires_grad=True)
    for kind, torch_cls, ours_cls in (("LSTM", torch.nn.LSTM, fnn.LSTM), ("GRU", torch.nn.GRU, fnn.GRU)):
        ref = torch_cls(i, h)
        ours = ours_cls(i, h)
        ours.load_state_dict(ref.state_dict())

        def packed_train(m, x=x, lengths=lengths):
            m(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data.sum().backward()

        fns = {"ferrolm": lambda m=ours, f=packed_train: f(m), "torch": lambda m=ref, f=packed_train: f(m)}
        out.append(
            Workload(f"{kind} PackedSequence B={b} T={t} H={h}, lengths 25-100%: forward+backward", fns, "var-len")
        )
    return out


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The rnn rows of ``ferrolm bench``, each yielded as soon as it is timed."""
    for w in rnn_workloads(full=full):
        yield measure("rnn", w, repeats)
