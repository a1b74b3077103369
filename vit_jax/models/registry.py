"""Model registry: each family file makes one ``register_family`` call; ``create`` builds by name.

A registration carries all that the rest of the library needs to know about a family: its name
pattern and builder, its size table, its analytic FLOPs formula (``vit_jax.flops``), the sharding
rules of the logical axis names only it uses (``vit_jax.train.sharding``), the type of every
option its builder takes (the config's ``model`` block) and the name of its checkpoint mapping
(``vit_jax.checkpoints.mapping``). ``vit_jax.models`` imports every module of its package, so a
new family is a new file there and nothing else.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Callable, Iterable, Mapping

from flax import nnx

# The option types a config file can declare (``int | None`` counts as int).
OPTION_TYPES = (int, float, str, bool, tuple)
Rule = tuple[str, str | None]


@dataclasses.dataclass(frozen=True)
class Family:
  """One registered model family (see ``register_family``)."""
  name: str
  pattern: re.Pattern
  build: Callable[..., nnx.Module]
  examples: tuple[str, ...]
  help: str
  sizes: Mapping[Any, Any]
  flops: Callable[[nnx.Module], int] | None
  sharding_rules: tuple[Rule, ...]
  options: Mapping[str, type]
  checkpoint_family: str | None


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, *, pattern: str, build: Callable[..., nnx.Module],
                    examples: Iterable[str], help: str, sizes: Mapping[Any, Any],
                    flops: Callable[[nnx.Module], int] | None, options: Mapping[str, type],
                    sharding_rules: Iterable[Rule] = (),
                    checkpoint_family: str | None = None) -> Family:
  """Registers a model family whose names match ``pattern`` (a full match).

  build: ``build(match, *, num_classes, image_size, rngs, overrides) -> model`` (``image_size``
    as given to ``create``: an int, or a (height, width) tuple for the families that take one).
  sizes: the family's size table (for documentation and tests).
  flops: ``flops(abstract_model) -> int``, 2 x the multiply-adds of one image's forward pass, read
    from the model's config (None: counted from the traced forward pass instead).
  options: name -> type (int, float, str, bool or tuple) of every override ``build`` takes.
  sharding_rules: (logical axis, mesh axis or None) for the axis names only this family uses;
    the same name must map to the same mesh axis in every family.
  checkpoint_family: the name of its ``vit_jax.checkpoints.mapping.Family``, if it has one.
  """
  if name in _FAMILIES:
    raise ValueError(f"model family {name!r} is already registered")
  rules = tuple((str(axis), mesh_axis) for axis, mesh_axis in sharding_rules)
  for key, kind in options.items():
    if kind not in OPTION_TYPES:
      raise ValueError(f"family {name}: option {key!r} has type {kind!r}; declare one of "
                       f"{[t.__name__ for t in OPTION_TYPES]}")
  family = Family(name, re.compile(pattern), build, tuple(examples), help, sizes, flops, rules,
                  dict(options), checkpoint_family)
  others = list(_FAMILIES.values())
  _merged_rules(others + [family])
  _merged_options(others + [family])
  _FAMILIES[name] = family
  return family


def unregister(name: str) -> None:
  """Removes the family ``name`` (for tests that register their own)."""
  if _FAMILIES.pop(name, None) is None:
    raise ValueError(f"no model family {name!r} is registered")


def families() -> list[Family]:
  """Every registered family, in registration order."""
  return list(_FAMILIES.values())


def options() -> dict[str, type]:
  """Every option of every family: name -> type (the same name has one type in all families)."""
  return _merged_options(_FAMILIES.values())


def sharding_rules() -> dict[str, str | None]:
  """The families' own logical-axis -> mesh-axis rules, merged (``sharding.default_rules`` adds
  the core ones)."""
  return _merged_rules(_FAMILIES.values())


def _merged_options(fams: Iterable[Family]) -> dict[str, type]:
  merged: dict[str, type] = {}
  owner: dict[str, str] = {}
  for family in fams:
    for key, kind in family.options.items():
      if merged.setdefault(key, kind) is not kind:
        raise ValueError(f"option {key!r} is {kind.__name__} in family {family.name} but "
                         f"{merged[key].__name__} in {owner[key]}")
      owner.setdefault(key, family.name)
  return merged


def _merged_rules(fams: Iterable[Family]) -> dict[str, str | None]:
  merged: dict[str, str | None] = {}
  owner: dict[str, str] = {}
  for family in fams:
    for axis, mesh_axis in family.sharding_rules:
      if axis in merged and merged[axis] != mesh_axis:
        raise ValueError(f"sharding rule ({axis!r}, {mesh_axis!r}) of family {family.name} "
                         f"contradicts ({axis!r}, {merged[axis]!r}) of {owner[axis]}")
      merged[axis] = mesh_axis
      owner.setdefault(axis, family.name)
  return merged


def config_options(config: type, exclude: Iterable[str] = ("num_classes", "image_size")
                   ) -> dict[str, type]:
  """Option name -> type of the fields of the dataclass ``config`` (``int | None`` -> int,
  ``tuple[int, ...]`` -> tuple), less ``exclude`` (the ones ``create`` sets itself)."""
  hints = typing.get_type_hints(config)
  skip = set(exclude)
  return {f.name: _option_type(config, f.name, hints[f.name])
          for f in dataclasses.fields(config) if f.name not in skip}


def _option_type(config: type, name: str, hint: Any) -> type:
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    kinds = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = kinds[0] if len(kinds) == 1 else hint
  kind = typing.get_origin(hint) or hint
  if kind not in OPTION_TYPES:
    raise TypeError(f"{config.__name__}.{name}: type {hint!r} is not one of the option types")
  return kind


def patch_model_builder(what: str, model: Callable[..., nnx.Module], config: type,
                        variants: Mapping[str, Mapping[str, Any]], valid: Mapping[str, type]
                        ) -> Callable[..., nnx.Module]:
  """``build`` for names whose pattern has the groups ``variant`` and ``patch`` ("ViT-B/16"):
  ``model(config(num_classes, image_size, **variant sizes, patch_size, **overrides), rngs=...)``,
  refusing an override that is not in ``valid`` (named as a ``what`` option)."""
  def build(match: re.Match, *, num_classes: int, image_size: int, rngs: nnx.Rngs,
            overrides: dict[str, Any]) -> nnx.Module:
    kwargs = {**variants[match["variant"]], "patch_size": int(match["patch"]), **overrides}
    check_options(what, kwargs, valid)
    return model(config(num_classes=num_classes, image_size=image_size, **kwargs), rngs=rngs)
  return build


def check_options(what: str, given: Iterable[str], valid: Iterable[str], hint: str = "") -> None:
  """Raises a ValueError naming the options in ``given`` that ``valid`` lacks, and the valid ones."""
  valid = set(valid)
  unknown = sorted(set(given) - valid)
  if unknown:
    raise ValueError(f"unknown {what} option(s) {unknown}; valid options: {sorted(valid)}{hint}")


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


def create(name: str, *, num_classes: int, image_size: int | tuple[int, int] = 224,
           rngs: nnx.Rngs | None = None, **overrides: Any) -> nnx.Module:
  """Builds the model called ``name`` with float32 parameters.

  ``image_size``: the input size of a classifier (an int: squares), or for a detector the
  training size as (height, width) or an int, the size its position embeddings are stored for.

  Works with no device mesh in context: parameters carry logical axis names as metadata and
  the trainer applies shardings. ``overrides`` set any option of the family's config (for ViT:
  classifier, representation_size, posemb, dropout_rate, dtype, gelu_approximate, ...).
  """
  family, match = resolve(name)
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  with nnx.use_eager_sharding(False):
    return family.build(match, num_classes=num_classes, image_size=image_size, rngs=rngs,
                        overrides=dict(overrides))
