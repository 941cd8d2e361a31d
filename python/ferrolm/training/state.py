"""Training checkpoints: ``train_state.pt`` (step, optimizer, RNG states, data position,
history; read back with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary pickle) beside ``model.safetensors`` (:func:`ferrolm.models.save_model`), each
written to a temporary name and renamed; and the Ctrl-C flag that lets the loop stop between
optimizer steps."""

from __future__ import annotations

import dataclasses
import io
import random
import signal
from pathlib import Path
from typing import Any, Dict

import torch

from .._io import PathLike, atomic_write
from ..errors import FormatError
from ..models import save_model
from ..models.registry import architecture_of
from .config import TrainConfig, TrainResult

__all__ = ["STATE_FILE", "MODEL_FILE", "save_checkpoint", "load_train_state", "set_rng_state", "SigintFlag"]

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.safetensors"


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(
    out_dir: PathLike,
    model: torch.nn.Module,
    optimizer,
    step: int,
    cfg: TrainConfig,
    data_state: Dict[str, int],
    result: TrainResult,
) -> Path:
    """Writes ``train_state.pt`` and ``model.safetensors`` into ``out_dir`` atomically."""
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
    try:
        architecture_of(model)
    except TypeError:  # wrappers (prompt tuning) keep train_state.pt only
        return out
    save_model(model, out / MODEL_FILE)
    return out


def load_train_state(out_dir: PathLike) -> Dict[str, Any]:
    """The training state saved in ``out_dir`` (``torch.load(weights_only=True)``: no pickle)."""
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


class SigintFlag:
    """Turns Ctrl-C into a flag checked between optimizer steps, so the checkpoint written on
    exit is never of a half-updated model; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.hit = False
        self.hard = False
        self._old: Any = None

    def __enter__(self) -> "SigintFlag":
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
