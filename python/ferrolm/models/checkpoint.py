"""Model checkpoints: one safetensors file, the weights plus the config as JSON metadata.

:func:`save_model` writes through a temporary name and a rename, tied (shared) tensors stored
once by ``safetensors.torch.save_model``; :func:`load_model` reads the metadata with
``safetensors.safe_open``, builds the architecture it names (:mod:`.registry`) and loads the
tensors. No pickle is ever read.

Quantized layers (:class:`ferrolm.quant.QuantLinear` / :class:`~ferrolm.quant.QuantEmbedding`)
are stored as their blocks: the uint8 tensor ``<layer>.qweight``, with the metadata entry
``quant`` (JSON: layer name -> ``{"qtype", "shape": [rows, cols], "kind": "linear" |
"embedding", "bias", "tie"}``) naming each one's block type and logical shape, so
:func:`load_model` rebuilds the quantized layers from the same bytes. Layers sharing one set of
blocks (a quantized head tied to the embedding) name the same ``tie`` and are stored once.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Type, Union

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
    quant = _quant_layers(model)
    if quant:
        meta["quant"] = json.dumps(quant)
    with atomic_path(path) as tmp:
        _save(model, str(tmp), metadata=meta, force_contiguous=True)


def _quant_layers(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """The ``quant`` metadata of ``model``: each quantized layer's block type and logical shape."""
    from ..quant import QuantEmbedding, QuantLinear

    out: Dict[str, Dict[str, Any]] = {}
    owner: Dict[int, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            entry = {"qtype": mod.qtype, "shape": [mod.out_features, mod.in_features], "kind": "linear"}
            entry["bias"] = mod.bias is not None
        elif isinstance(mod, QuantEmbedding):
            entry = {"qtype": mod.qtype, "shape": [mod.num_embeddings, mod.embedding_dim], "kind": "embedding"}
        else:
            continue
        entry["tie"] = owner.setdefault(mod.qweight.data_ptr(), name)
        out[name] = entry
    return out


def _install_quant(model: nn.Module, quant: Any, tensors: Dict[str, torch.Tensor], path: PathLike) -> None:
    """Replaces the layers that ``quant`` (the checkpoint's metadata) names by quantized layers
    on the file's blocks, every entry checked against the tensors and the architecture
    (FormatError naming the tensor). Layers with the same ``tie`` share one blocks tensor."""
    from ..quant import QTYPES, QuantEmbedding, QuantLinear, row_bytes

    if not isinstance(quant, dict):
        raise FormatError(f"{path}: the checkpoint's quant metadata must be a JSON object, got {type(quant).__name__}")
    shared: Dict[str, torch.Tensor] = {}
    for name, e in quant.items():
        key = f"{name}.qweight"
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("qtype"), str)
            and e.get("kind") in ("linear", "embedding")
            and isinstance(e.get("shape"), list)
            and len(e["shape"]) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in e["shape"])
        )
        if not ok:
            raise FormatError(
                f"{path}: the quant metadata of {key!r} must be {{'qtype': str, 'shape': [rows, cols], 'kind': "
                f"'linear' | 'embedding'}}, got {e!r:.200}"
            )
        qtype, (n, k) = e["qtype"], e["shape"]
        if qtype.upper() not in QTYPES:
            raise FormatError(
                f"{path}: tensor {key!r} has unknown block type {qtype!r}; expected one of {', '.join(QTYPES)}"
            )
        tie = e.get("tie", name)
        blocks = tensors.get(key)
        if blocks is None:
            blocks = next(
                (
                    tensors[f"{o}.qweight"]
                    for o, oe in quant.items()
                    if isinstance(oe, dict) and oe.get("tie", o) == tie and f"{o}.qweight" in tensors
                ),
                None,
            )
        if blocks is None:
            raise FormatError(f"{path}: the quant metadata names {key!r}, but the file has no such tensor")
        if blocks.dtype != torch.uint8:
            raise FormatError(f"{path}: tensor {key!r} must hold uint8 blocks, got {blocks.dtype}")
        try:
            rb = row_bytes(qtype, k, key)
        except ValueError as err:
            raise FormatError(f"{path}: {err}") from None
        if blocks.numel() != n * rb:
            raise FormatError(
                f"{path}: tensor {key!r} holds {blocks.numel()} bytes, but {qtype.upper()} weights of shape "
                f"({n}, {k}) take {n * rb} ({n} rows of {rb}); the checkpoint is corrupt or its metadata was edited"
            )
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(
                f"{path}: the quant metadata names layer {name!r}, which the architecture lacks"
            ) from None
        want = (
            (getattr(old, "out_features", None), getattr(old, "in_features", None))
            if e["kind"] == "linear"
            else (getattr(old, "num_embeddings", None), getattr(old, "embedding_dim", None))
        )
        if want != (n, k):
            raise FormatError(
                f"{path}: tensor {key!r} is a {e['kind']} of shape ({n}, {k}), but the config's {name} is "
                f"{type(old).__name__} {want}"
            )
        blocks = blocks.reshape(n, rb)
        if e["kind"] == "linear":
            new: nn.Module = QuantLinear(k, n, qtype, bias=bool(e.get("bias")), blocks=blocks)
        else:
            new = QuantEmbedding(n, k, qtype, blocks=blocks)
        first = shared.setdefault(tie, new.qweight)
        if first is not new.qweight:
            if first.shape != new.qweight.shape:
                raise FormatError(f"{path}: {key!r} shares its blocks ({tie!r}) with a layer of another shape")
            new.qweight = first  # one tensor for the tied layers, as when saved
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)


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


def _check_against_tensors(
    path: PathLike, cls: Type[nn.Module], config, tensors: Dict[str, torch.Tensor], quant: Any = None
) -> None:
    """Builds the model on the meta device (no memory) and compares its tensor names and shapes
    with the file's, so a config that claims more than the file holds (``n_layer=60`` in a
    350 KB file) is refused before gigabytes are allocated. Names that share one tensor (tied
    weights) count as present when one of them is."""
    try:
        with torch.device("meta"):
            shadow = cls(config)
    except (TypeError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: the config in the checkpoint's metadata cannot build a model: {e}") from None
    if quant:
        _install_quant(shadow, quant, tensors, path)
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
        quant = json.loads(meta.get("quant", "{}"))
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
    _check_against_tensors(path, cls, config, tensors, quant)
    model = cls(config)
    if quant:
        _install_quant(model, quant, tensors, path)
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
