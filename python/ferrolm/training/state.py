"""Training checkpoints: ``train_state.pt`` (step, optimizer, RNG states, data position,
history; read back with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary pickle) beside ``model.safetensors`` (:func:`ferrolm.models.save_model`); and
the Ctrl-C flag that lets the loop stop between optimizer steps.

One checkpoint is one unit: both files are written into ``.checkpoint.pending/``, a ``COMMIT``
marker is written last, then the files are renamed into the folder and the pending folder is
removed. A crash or a second Ctrl-C before the marker leaves the previous pair untouched; one
after it is rolled forward by the next :func:`load_train_state` (or the next save), so the two
files never come from different steps. Both carry the step (``model.safetensors`` in its
metadata)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, Iterator

import torch

from .._io import PathLike, atomic_write
from ..errors import FormatError
from ..models import save_model
from ..models.registry import architecture_of
from .config import TrainConfig, TrainResult

__all__ = [
    "STATE_FILE",
    "MODEL_FILE",
    "save_checkpoint",
    "recover_checkpoint",
    "load_train_state",
    "set_rng_state",
    "sigint_deferred",
    "SigintFlag",
]

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.safetensors"
PENDING_DIR = ".checkpoint.pending"
COMMIT_FILE = "COMMIT"


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_checkpoint(out_dir: PathLike) -> None:
    """Finishes or discards an interrupted checkpoint in ``out_dir``: a pending one whose
    ``COMMIT`` marker was written is moved into place (roll forward), one without is removed."""
    out = Path(out_dir)
    pending = out / PENDING_DIR
    if not pending.is_dir():
        return
    if (pending / COMMIT_FILE).is_file():
        for name in (STATE_FILE, MODEL_FILE):
            if (pending / name).exists():
                os.replace(pending / name, out / name)
        _fsync_dir(out)
    shutil.rmtree(pending, ignore_errors=True)


def save_checkpoint(
    out_dir: PathLike,
    model: torch.nn.Module,
    optimizer,
    step: int,
    cfg: TrainConfig,
    data_state: Dict[str, int],
    result: TrainResult,
) -> Path:
    """Writes ``train_state.pt`` and ``model.safetensors`` into ``out_dir`` as one unit (see the
    module notes); a wrapper without an architecture (prompt tuning) and a model on a quantized
    base (QLoRA: its blocks are the GGUF file's, the adapter is the result) write the state only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(out)
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
    pending = out / PENDING_DIR
    pending.mkdir()
    atomic_write(pending / STATE_FILE, buf.getvalue())
    quantized = any(hasattr(m, "qweight") for m in model.modules())  # ferrolm.quant layers
    try:
        architecture_of(model)
    except TypeError:  # wrappers (prompt tuning) keep train_state.pt only
        pass
    else:
        if not quantized:
            save_model(model, pending / MODEL_FILE, metadata={"step": str(step)})
    _fsync_dir(pending)
    atomic_write(pending / COMMIT_FILE, str(step).encode())
    recover_checkpoint(out)
    return out


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block is done (then raises KeyboardInterrupt), so a checkpoint
    being written is finished first. Only in the main thread (signals go there)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: hits.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hits:
        raise KeyboardInterrupt


def load_train_state(out_dir: PathLike) -> Dict[str, Any]:
    """The training state saved in ``out_dir`` (``torch.load(weights_only=True)``: no pickle)."""
    recover_checkpoint(out_dir)
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
