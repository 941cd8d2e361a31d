"""Sequence classification: a language-model backbone (GPT, LSTM LM or AttentionLSTM), a
pooling of its hidden states (last, mean, max, first) and a linear head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._config import Config
from ..nn import Dropout
from .common import Checkpointable, check_lengths, pool
from .gpt import GPTConfig
from .lstm import LSTMConfig
from .registry import config_from_dict, model_class

__all__ = ["ClassifierConfig", "SequenceClassifier", "backbone_width"]

POOLINGS = ("last", "mean", "max", "first")


@dataclass
class ClassifierConfig(Config):
    """A language-model backbone, a pooling of its hidden states and a linear head.

    Args:
        backbone: a :class:`GPTConfig` or :class:`LSTMConfig` (or its dict with an
            ``"architecture"`` key).
        num_classes: output classes. pooling: "last" (the last real token; right for causal
            models), "mean", "max" or "first". dropout: before the head.
    """

    backbone: Union[GPTConfig, LSTMConfig] = field(default_factory=GPTConfig)
    num_classes: int = 2
    pooling: str = "last"
    dropout: float = 0.0
    architecture: str = field(default="classifier", init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, Mapping):
            self.backbone = config_from_dict(self.backbone)  # type: ignore[assignment]
        if getattr(self.backbone, "architecture", None) not in _BACKBONES:
            raise TypeError(
                "ClassifierConfig.backbone must be a GPTConfig, LSTMConfig or AttentionLSTMConfig, "
                f"got {type(self.backbone).__name__}"
            )
        self._positive("num_classes")
        if self.pooling not in POOLINGS:
            raise ValueError(f"ClassifierConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self._dropout(self.dropout)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "backbone": {"architecture": self.backbone.architecture, **self.backbone.to_dict()},
            "num_classes": self.num_classes,
            "pooling": self.pooling,
            "dropout": self.dropout,
        }


_BACKBONES = ("gpt", "lstm", "attention_lstm")


def backbone_width(config) -> int:
    """The width of the hidden states a backbone with this config returns."""
    if isinstance(config, GPTConfig):
        return config.n_embd
    if isinstance(config, LSTMConfig):
        return config.hidden_size
    return config.output_size


def build_backbone(config) -> nn.Module:
    return model_class(config.architecture)(config)


class SequenceClassifier(Checkpointable, nn.Module):
    """A language-model backbone (``backbone``), pooling of its hidden states, dropout and a
    linear head (``head``).

    ``forward(idx, labels=None, lengths=None)`` -> ``(logits (B, num_classes), loss or None)``;
    ``lengths`` marks the real tokens of right-padded rows.
    """

    def __init__(self, config: ClassifierConfig, backbone: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"SequenceClassifier needs a ClassifierConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        width = backbone_width(config.backbone)
        self.drop = Dropout(config.dropout)
        self.head = nn.Linear(width, config.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_backbone(
        cls, backbone: nn.Module, num_classes: int, pooling: str = "last", dropout: float = 0.0
    ) -> "SequenceClassifier":
        """A classifier on a (pretrained) :class:`GPT`, :class:`LSTMLanguageModel` or
        :class:`~ferrolm.models.AttentionLSTM`."""
        if getattr(getattr(backbone, "config", None), "architecture", None) not in _BACKBONES or not isinstance(
            backbone, nn.Module
        ):
            raise TypeError(
                f"backbone must be a ferrolm GPT, LSTMLanguageModel or AttentionLSTM, got {type(backbone).__name__}"
            )
        return cls(ClassifierConfig(backbone.config, num_classes, pooling, dropout), backbone=backbone)

    def forward(self, idx: torch.Tensor, labels: Optional[torch.Tensor] = None, lengths=None):
        B, T = idx.shape if isinstance(idx, torch.Tensor) and idx.dim() == 2 else (None, None)
        if lengths is not None and B is not None:
            lengths = check_lengths(lengths, B, T)
        hidden = self.backbone.hidden_states(idx, lengths=lengths)
        logits = self.head(self.drop(pool(hidden, lengths, self.config.pooling)))
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long()
            if labels.shape != (logits.size(0),):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({logits.size(0)},)")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.config.num_classes):
                raise ValueError(f"labels must be in [0, {self.config.num_classes}), got {labels.tolist()[:8]}")
            loss = F.cross_entropy(logits, labels)
        return logits, loss
