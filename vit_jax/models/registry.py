"""Model registry: families register a name pattern; ``create`` builds a model by name."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  pattern: re.Pattern
  build: Callable[..., nnx.Module]
  examples: tuple[str, ...]
  help: str


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, *, pattern: str, build: Callable[..., nnx.Module],
                    examples: tuple[str, ...], help: str) -> None:
  """Registers a model family whose names match ``pattern`` (a full match)."""
  _FAMILIES[name] = Family(name, re.compile(pattern), build, tuple(examples), help)


def names() -> list[str]:
  """Example names of every registered family (each family also takes other sizes)."""
  return [n for f in _FAMILIES.values() for n in f.examples]


def describe() -> str:
  return "; ".join(f.help for f in _FAMILIES.values())


def resolve(name: str) -> tuple[Family, re.Match]:
  for family in _FAMILIES.values():
    match = family.pattern.fullmatch(name)
    if match:
      return family, match
  raise ValueError(f"unknown model name {name!r}. Valid names: {', '.join(names())} "
                   f"(patterns: {describe()})")


def create(name: str, *, num_classes: int, image_size: int = 224, rngs: nnx.Rngs | None = None,
           **overrides: Any) -> nnx.Module:
  """Builds the model called ``name`` with float32 parameters.

  Works with no device mesh in context: parameters carry logical axis names as metadata and
  the trainer applies shardings. ``overrides`` set any option of the family's config (for ViT:
  classifier, representation_size, posemb, dropout_rate, dtype, gelu_approximate, ...).
  """
  family, match = resolve(name)
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  with nnx.use_eager_sharding(False):
    return family.build(match, num_classes=num_classes, image_size=image_size, rngs=rngs,
                        overrides=dict(overrides))
