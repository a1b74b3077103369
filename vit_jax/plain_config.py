"""A read-only config over plain nested dicts, for using the core without ml_collections.

The trainer reads its config by attribute (``config.model.name``), with ``get``, ``items`` and
``**`` unpacking; an ml_collections ``ConfigDict`` does all of that, and so does
``PlainConfig(config.to_dict())`` where ml_collections is not installed (e.g. a config saved as
JSON and trained on a GPU machine that has only the JAX stack).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping


class PlainConfig(Mapping):
  """Attribute and item access over a nested dict; a missing key is an error that lists the
  valid ones."""

  def __init__(self, values: Mapping[str, Any]):
    object.__setattr__(self, "_values", {
        k: PlainConfig(v) if isinstance(v, Mapping) else v for k, v in values.items()})

  @classmethod
  def from_json(cls, path: str) -> "PlainConfig":
    with open(path) as f:
      return cls(json.load(f))

  def __getattr__(self, key: str) -> Any:
    try:
      return self._values[key]
    except KeyError:
      raise AttributeError(f"config has no key {key!r}; valid keys: {sorted(self._values)}") from None

  def __setattr__(self, key: str, value: Any) -> None:
    raise TypeError("PlainConfig is read-only")

  def __getitem__(self, key: str) -> Any:
    return self._values[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._values)

  def __len__(self) -> int:
    return len(self._values)

  def to_dict(self) -> dict:
    return {k: v.to_dict() if isinstance(v, PlainConfig) else v for k, v in self._values.items()}

  def __repr__(self) -> str:
    return f"PlainConfig({self.to_dict()!r})"
