"""The tables that say how checkpoint names map to model parameter names.

A *family* (``Family``) describes the model side: which model class it covers, which per-layer
lists may be stored stacked, which position embeddings get resampled and where the head is
(which parameters to load or keep as initialised is the caller's choice: ``load_pretrained``'s
``load`` and ``init`` patterns). A *format* (``Format``)
describes one checkpoint naming scheme for one family as an ordered list of ``Rule`` s.

Names on both sides are '/'-joined paths (timm's '.'-joined names are kept as they are). Model
names are always *per-layer*: ``Transformer/blocks/3/LayerNorm_0/scale`` even when the model
stores its blocks stacked (``vit_jax.checkpoints.param_tree`` converts).

Templates: ``{name}`` matches one path component (no '/' or '.'), ``{name:*}`` matches any rest
of a path. All templates of a rule share their placeholders.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
import re
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]
Shape = tuple[int, ...]
# Load: (checkpoint arrays, model shapes or None where the model has no such parameter)
#   -> model arrays. Save: model arrays -> checkpoint arrays.
LoadFn = Callable[[Sequence[np.ndarray], Sequence[Shape | None]], Sequence[np.ndarray]]
SaveFn = Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]]

_PLACEHOLDER = re.compile(r"\{(\w+)(:\*)?\}")


def _compile(template: str) -> re.Pattern:
  out, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    out.append(re.escape(template[pos:m.start()]))
    out.append(f"(?P<{m[1]}>.+)" if m[2] else f"(?P<{m[1]}>[^/.]+)")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out))


def _fill(template: str, values: Mapping[str, str]) -> str:
  return _PLACEHOLDER.sub(lambda m: values[m[1]], template)


def _identity_load(arrays, shapes):
  del shapes
  return list(arrays)


def _identity_save(arrays):
  return list(arrays)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Checkpoint names <-> model names, with array transforms for each direction.

  ``checkpoint`` and ``model`` are one template or a tuple of them (a fused timm ``qkv`` weight
  is one checkpoint array for three model arrays). ``load`` maps the checkpoint arrays to the
  model arrays (it also gets the model's shapes, None where the model lacks the parameter, and
  must then return the arrays unreshaped so that the mismatch is reported); ``save`` maps back.
  ``save=None`` means this format cannot be written.
  """
  checkpoint: str | tuple[str, ...]
  model: str | tuple[str, ...]
  load: LoadFn = _identity_load
  save: SaveFn | None = _identity_save

  @property
  def checkpoint_templates(self) -> tuple[str, ...]:
    return (self.checkpoint,) if isinstance(self.checkpoint, str) else tuple(self.checkpoint)

  @property
  def model_templates(self) -> tuple[str, ...]:
    return (self.model,) if isinstance(self.model, str) else tuple(self.model)


def rename(checkpoint: str, model: str) -> Rule:
  """A one-to-one rename (the arrays are the same)."""
  return Rule(checkpoint, model)


def _apply(rules: Sequence[Rule], arrays: Mapping[str, np.ndarray], *, forward: bool,
           shapes: Mapping[str, Shape] | None = None) -> tuple[Arrays, dict[str, str], list[str]]:
  """Applies ``rules`` in order; each rule takes every key its first source template matches
  (and whose companion keys exist). Returns (converted, origin of each output, unmatched)."""
  remaining = dict(arrays)
  out: Arrays = {}
  origin: dict[str, str] = {}
  for rule in rules:
    src, dst = ((rule.checkpoint_templates, rule.model_templates) if forward
                else (rule.model_templates, rule.checkpoint_templates))
    fn = rule.load if forward else rule.save
    first = _compile(src[0])
    for key in [k for k in remaining if first.fullmatch(k)]:
      if key not in remaining:
        continue
      values = first.fullmatch(key).groupdict()
      src_keys = [_fill(t, values) for t in src]
      if not all(k in remaining for k in src_keys):
        continue
      if fn is None:
        raise ValueError(f"this format cannot be written: no inverse for {src_keys}")
      dst_keys = [_fill(t, values) for t in dst]
      src_arrays = [remaining.pop(k) for k in src_keys]
      if forward:
        result = fn(src_arrays, [None if shapes is None else shapes.get(k) for k in dst_keys])
      else:
        result = fn(src_arrays)
      if len(result) != len(dst_keys):
        raise AssertionError(f"rule for {src} returned {len(result)} arrays for {dst_keys}")
      for k, a in zip(dst_keys, result):
        out[k] = a
        origin[k] = ", ".join(src_keys)
  return out, origin, sorted(remaining, key=natural_key)


def to_model_names(rules: Sequence[Rule], arrays: Mapping[str, np.ndarray],
                   shapes: Mapping[str, Shape] | None) -> tuple[Arrays, dict[str, str], list[str]]:
  return _apply(rules, arrays, forward=True, shapes=shapes)


def to_checkpoint_names(rules: Sequence[Rule], arrays: Mapping[str, np.ndarray]) -> Arrays:
  out, _, unmatched = _apply(rules, arrays, forward=False)
  if unmatched:
    raise ValueError(f"no rule writes the model parameters {unmatched}")
  return out


def natural_key(name: str) -> list:
  """Sort key putting ``blocks/2`` before ``blocks/10``."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What ``models.create`` needs to rebuild the model a checkpoint holds."""
  name: str
  num_classes: int
  image_size: int | tuple[int, int]  # a detector's: the (height, width) canvas it was trained on
  overrides: dict
  task: str = "classification"


@dataclasses.dataclass(frozen=True)
class Family:
  """The model side of a family of checkpoints.

  layer_lists: model paths of per-layer lists (``Transformer/blocks``) that the model may hold
    as ``blocks/{i}/...`` or stacked on a leading axis as ``blocks/...``.
  posemb: model paths of learned position embeddings [1, tokens, width] resampled to the
    model's grid (class-token rows kept apart).
  head: model path prefix of the classifier (``load_pretrained(..., init=["head/.*"])`` keeps
    a new model's head instead of the checkpoint's).
  infer: checkpoint arrays in model names -> ModelSpec (for predict.py), or None.
  """
  name: str
  model_type: type
  layer_lists: tuple[str, ...] = ()
  posemb: tuple[str, ...] = ()
  head: str = "head"
  infer: Callable[[Arrays], ModelSpec] | None = None


@dataclasses.dataclass(frozen=True)
class Format:
  """One checkpoint naming scheme of one family (``family="*"``: of every family).

  containers: file kinds this format is read from ("npz", "safetensors", "torch", "orbax").
  detect: whether a set of (prepared) checkpoint keys is in this format.
  prepare: whole-checkpoint pass before the rules (strip prefixes, split a scanned stack).
  finish: whole-checkpoint pass after the rules when writing (add prefixes, stack layers).
  """
  family: str
  name: str
  rules: tuple[Rule, ...]
  detect: Callable[[Collection[str]], bool]
  containers: tuple[str, ...] = ("npz",)
  prepare: Callable[[Arrays], Arrays] = dict
  finish: Callable[..., Arrays] | None = None


_FAMILIES: dict[str, Family] = {}
_FORMATS: list[Format] = []
_discovered = False


def register_family(family: Family) -> None:
  """Registers (or replaces) the model side of a family."""
  _FAMILIES[family.name] = family


def register_format(fmt: Format) -> None:
  """Registers a checkpoint format; formats registered earlier are detected first."""
  _FORMATS[:] = [f for f in _FORMATS if (f.family, f.name) != (fmt.family, fmt.name)]
  _FORMATS.append(fmt)


_IMPORT_ERRORS: dict[str, str] = {}


def discover() -> None:
  """Imports every module of this package once, so that each registers its tables.

  A module that fails to import is reported (a warning, and in the error for a model whose
  family it would have registered) without breaking the other families.
  """
  global _discovered
  if _discovered:
    return
  _discovered = True
  package = importlib.import_module("vit_jax.checkpoints")
  for info in pkgutil.iter_modules(package.__path__):
    try:
      importlib.import_module(f"vit_jax.checkpoints.{info.name}")
    except Exception as e:  # pylint: disable=broad-except  # Reported, see above.
      _IMPORT_ERRORS[info.name] = f"{type(e).__name__}: {e}"
      logging.getLogger(__name__).warning("vit_jax.checkpoints.%s failed to import: %s", info.name, e)


def family_of(model: object) -> Family:
  """The most specific registered family whose model type ``model`` is an instance of."""
  discover()
  for cls in type(model).__mro__:
    for family in _FAMILIES.values():
      if family.model_type is cls:
        return family
  failed = "".join(f"; {name} failed to import ({error})" for name, error in _IMPORT_ERRORS.items())
  raise ValueError(f"no checkpoint mapping is registered for {type(model).__name__}; "
                   f"registered model types: {sorted(f.model_type.__name__ for f in _FAMILIES.values())}"
                   + failed)


def families() -> list[Family]:
  discover()
  return list(_FAMILIES.values())


def formats_for(family: str) -> list[Format]:
  discover()
  return [f for f in _FORMATS if f.family in (family, "*")]


def format_names(family: str) -> list[str]:
  return [f.name for f in formats_for(family)]


def strip_prefix(arrays: Mapping[str, np.ndarray], prefixes: Iterable[str]) -> Arrays:
  """Drops the first of ``prefixes`` that some key starts with (keys without it are dropped)."""
  for prefix in prefixes:
    if any(k.startswith(prefix) for k in arrays):
      return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  return dict(arrays)
