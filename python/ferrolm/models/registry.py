"""The static table of ferrolm's architectures: the name stored in a config and a checkpoint
(``"gpt"``, ``"lstm"``, ...) -> the module, config class and model class that implement it.

Classes are named, not imported, here and resolved on first use (as transformers' ``auto``
mappings do), so this module imports no model and no model imports it back; adding an
architecture is one line in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Mapping, NamedTuple, Type

__all__ = ["ARCHITECTURES", "Architecture", "config_class", "model_class", "architecture_of", "config_from_dict"]


class Architecture(NamedTuple):
    module: str  #: a module of :mod:`ferrolm.models`
    config: str  #: its config class
    model: str  #: its model class


ARCHITECTURES: Dict[str, Architecture] = {
    "gpt": Architecture("gpt", "GPTConfig", "GPT"),
    "lstm": Architecture("lstm", "LSTMConfig", "LSTMLanguageModel"),
    "classifier": Architecture("classifier", "ClassifierConfig", "SequenceClassifier"),
    "seq2seq_transformer": Architecture("seq2seq", "Seq2SeqTransformerConfig", "Seq2SeqTransformer"),
    "seq2seq_lstm": Architecture("seq2seq", "Seq2SeqLSTMConfig", "Seq2SeqLSTM"),
    "attention_lstm": Architecture("attention_lstm", "AttentionLSTMConfig", "AttentionLSTM"),
    "llama": Architecture("llama", "LlamaConfig", "Llama"),
}


def _lookup(name: str, what: str):
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is None:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return getattr(importlib.import_module(f"ferrolm.models.{arch.module}"), getattr(arch, what))


def config_class(name: str) -> Type[Any]:
    """The config dataclass of architecture ``name`` (ValueError for an unknown name)."""
    return _lookup(name, "config")


def model_class(name: str) -> Type[Any]:
    """The model class of architecture ``name`` (ValueError for an unknown name)."""
    return _lookup(name, "model")


def architecture_of(model: Any) -> str:
    """The architecture name of a ferrolm model instance (its exact class, not a subclass).

    Raises:
        TypeError: ``model`` is not one of the table's model classes.
    """
    for name in ARCHITECTURES:
        if type(model) is model_class(name):
            return name
    names = ", ".join(a.model for a in ARCHITECTURES.values())
    raise TypeError(f"expected a ferrolm model ({names}), got {type(model).__name__}")


def config_from_dict(d: Mapping[str, Any]):
    """A config from ``{"architecture": NAME, **fields}`` (NAME from :data:`ARCHITECTURES`)."""
    if not isinstance(d, Mapping) or "architecture" not in d:
        raise ValueError(f"a model config needs an 'architecture' key (one of {sorted(ARCHITECTURES)})")
    rest = {k: v for k, v in d.items() if k != "architecture"}
    return config_class(d["architecture"]).from_dict(rest)
