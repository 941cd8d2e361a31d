"""The config dataclasses' shared behaviour: dict round trips that reject unknown keys, and
the common value checks."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

__all__ = ["Config"]


class Config:
    """Mixin for config dataclasses. ``to_dict`` leaves out fields that are not constructor
    arguments (``init=False``, such as a model's ``architecture`` tag)."""

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: dataclasses.asdict(self)[f.name] for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The config from a dict; unknown keys raise ValueError naming them and the known ones."""
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}")

    def _dropout(self, value: float) -> None:
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got {value}")
