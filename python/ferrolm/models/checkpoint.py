"""Model checkpoints: one safetensors file, the weights plus the config as JSON metadata.

:func:`save_model` writes through a temporary name and a rename, tied (shared) tensors stored
once by ``safetensors.torch.save_model``; :func:`load_model` reads the metadata with
``safetensors.safe_open``, builds the architecture it names (:mod:`.registry`) and loads the
tensors. No pickle is ever read.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Type, Union

import torch
from torch import nn

from .._io import PathLike, atomic_path
from ..errors import FormatError
from .registry import ARCHITECTURES, architecture_of, config_from_dict, model_class

__all__ = ["FORMAT", "save_model", "load_model"]

FORMAT = "ferrolm-model-1"


def save_model(model: nn.Module, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes ``model``'s weights and config to one safetensors file, atomically (temporary
    name, then rename). Shared (tied) tensors are stored once.

    A model with LoRA or (IA)³ updates (:func:`ferrolm.finetune.apply_lora`, ``load_lora``,
    ``apply_lora_rnn``, ``apply_ia3``, ``load_ia3``) is saved with the updates merged into its weights, under the plain
    architecture's names, so :func:`load_model` reads it back as an ordinary model with the same
    outputs; ``model`` itself keeps its LoRA layers. Keep the adapter apart with
    :func:`ferrolm.finetune.save_lora`.

    Args:
        metadata: extra string entries for the file's metadata (e.g. the training step).

    Raises:
        TypeError: ``model`` is not a ferrolm model (see :data:`~.registry.ARCHITECTURES`).
    """
    from safetensors.torch import save_model as _save

    arch = architecture_of(model)
    model = _merged(model)
    meta = {**(metadata or {}), "format": FORMAT, "architecture": arch, "config": json.dumps(model.config.to_dict())}
    with atomic_path(path) as tmp:
        _save(model, str(tmp), metadata=meta, force_contiguous=True)


def _is_adapter_layer(m: nn.Module) -> bool:
    """A :class:`ferrolm.finetune.LoRALinear` or ``IA3Linear`` (by their interface: models never
    import finetune): a ``base`` layer and ``folded(attr)``, its weight or bias with the update in."""
    return hasattr(m, "base") and hasattr(m, "merged") and callable(getattr(m, "folded", None))


def _merged(model: nn.Module) -> nn.Module:
    """``model``, or when it has LoRA updates a fresh model of its class holding the merged
    weights under the plain names (``model`` is not changed: a deep copy would share torch's
    parametrized class, which removing the parametrization alters)."""
    from torch.nn.utils import parametrize

    lora = any(_is_adapter_layer(m) for m in model.modules())
    if not lora and not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    fresh = type(model)(model.config)
    state = {}
    with torch.no_grad():
        for key in fresh.state_dict():
            path, _, attr = key.rpartition(".")
            mod = model.get_submodule(path) if path else model
            if _is_adapter_layer(mod):
                if not isinstance(getattr(mod.base, "weight", None), nn.Parameter):
                    raise ValueError(
                        f"{path} has an adapter over a base without a float weight ({type(mod.base).__name__}); save "
                        "the adapter with ferrolm.finetune.save_lora / save_ia3, or load the base dequantized to save "
                        "merged weights"
                    )
                value = mod.folded(attr)
            else:
                value = getattr(mod, attr)  # a parametrized weight reads merged
            state[key] = value.detach()
    fresh.load_state_dict(state)
    return fresh


def _check_against_tensors(path: PathLike, cls: Type[nn.Module], config, tensors: Dict[str, torch.Tensor]) -> None:
    """Builds the model on the meta device (no memory) and compares its tensor names and shapes
    with the file's, so a config that claims more than the file holds (``n_layer=60`` in a
    350 KB file) is refused before gigabytes are allocated. Names that share one tensor (tied
    weights) count as present when one of them is."""
    try:
        with torch.device("meta"):
            shadow = cls(config)
    except (TypeError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: the config in the checkpoint's metadata cannot build a model: {e}") from None
    own = shadow.state_dict(keep_vars=True)
    groups: Dict[int, list] = {}
    for k, v in own.items():
        groups.setdefault(id(v), []).append(k)  # meta tensors have no data_ptr; tied names share the object
    missing, shapes = [], []
    for names in groups.values():
        present = [k for k in names if k in tensors]
        if not present:
            missing.append(names[0])
            continue
        want = tuple(own[names[0]].shape)
        got = tuple(tensors[present[0]].shape)
        if want != got:
            shapes.append(f"{present[0]}: file {got} vs config {want}")
    if missing or shapes:
        parts = ([f"missing tensors {missing[:5]}"] if missing else []) + (
            [f"shapes that differ {shapes[:5]}"] if shapes else []
        )
        raise FormatError(
            f"{path}: the config in the metadata does not match the tensors in the file ({'; '.join(parts)}); "
            "the checkpoint is corrupt or was edited"
        )


def _read_checkpoint(path: PathLike):
    """``(tensors, metadata)`` of a safetensors file, with a FormatError for a corrupt one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors: Dict[str, torch.Tensor] = {k: f.get_tensor(k) for k in f.keys()}
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; expected a .safetensors checkpoint file") from None
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, OSError) and not isinstance(e, SafetensorError) and e.errno is not None:
            raise
        raise FormatError(f"{path} is not a valid safetensors checkpoint: {e}") from None
    return tensors, meta


def load_model(
    path: PathLike, expect: Optional[Type[nn.Module]] = None, map_location: Union[str, torch.device] = "cpu"
) -> nn.Module:
    """The model saved at ``path`` by :func:`save_model` (safetensors only; no pickle).

    Args:
        expect: a model class; a checkpoint of another architecture raises ValueError.

    Raises:
        FileNotFoundError, FormatError (not a ferrolm checkpoint), ValueError (wrong
        architecture, unknown config keys, missing/extra weights).
    """
    tensors, meta = _read_checkpoint(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise FormatError(f"{path} is a safetensors file but not a ferrolm model checkpoint (no '{FORMAT}' metadata)")
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise FormatError(f"{path}: unknown architecture {arch!r}")
    cls = model_class(arch)
    if expect is not None and cls is not expect:
        raise ValueError(f"{path} holds a {cls.__name__} ({arch!r}) checkpoint, not a {expect.__name__}")
    try:
        fields = json.loads(meta["config"])
        aliases = json.loads(meta.get("aliases", "{}"))  # checkpoints written before shared tensors were dropped
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: the config in the checkpoint's metadata is not valid JSON ({e})") from None
    if not isinstance(fields, dict) or not isinstance(aliases, dict):
        raise FormatError(
            f"{path}: the checkpoint's config metadata must be a JSON object, got {meta['config'][:80]!r}"
        )
    try:
        config = config_from_dict({"architecture": arch, **fields})
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: the config in the checkpoint's metadata is invalid: {e}") from None
    for alias, source in aliases.items():
        if isinstance(source, str) and source in tensors:
            tensors[alias] = tensors[source]
    _check_against_tensors(path, cls, config, tensors)
    model = cls(config)
    # Tensors that safetensors stored once for several names: the model ties them itself.
    own = model.state_dict()
    by_storage = {}
    for k, v in own.items():
        by_storage.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    for names in by_storage.values():
        present = [k for k in names if k in tensors]
        if present:
            for k in names:
                tensors.setdefault(k, tensors[present[0]])
    model.load_state_dict(tensors)
    return model.to(map_location)
