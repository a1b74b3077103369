"""Name-and-layout rules between our parameters and a foreign checkpoint (timm, original npz).

A family lists ``Rule``s: which of our flat parameter paths (``"Transformer/blocks/0/..."``, as
``nnx.to_pure_dict`` joined by "/") come from which foreign key, and how the array is laid
out there. ``import_params`` applies them to a flat foreign dict and returns the nested params
of a model (stacking per-layer blocks when the model scans its layers); ``export_params`` goes
back. Both check that every parameter and every foreign key is accounted for.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Rule:
  """``ours`` (one or more flat paths) <-> ``theirs`` (one foreign key).

  ``to_ours(theirs_array) -> tuple of our arrays``; ``to_theirs(tuple of ours) -> array``.
  """
  ours: tuple[str, ...]
  theirs: str
  to_ours: Callable[[Array], tuple[Array, ...]]
  to_theirs: Callable[[tuple[Array, ...]], Array]


def same(ours: str, theirs: str) -> Rule:
  return Rule((ours,), theirs, lambda a: (a,), lambda t: t[0])


def linear(ours: str, theirs: str) -> Rule:
  """torch Linear weight (out, in) <-> our kernel (in, out)."""
  return Rule((ours,), theirs, lambda a: (a.T,), lambda t: t[0].T)


def conv(ours: str, theirs: str) -> Rule:
  """torch Conv2d weight OIHW <-> our kernel HWIO."""
  return Rule((ours,), theirs, lambda a: (a.transpose(2, 3, 1, 0),), lambda t: t[0].transpose(3, 2, 0, 1))


def conv_as_linear(ours: str, theirs: str) -> Rule:
  """torch 1x1 Conv2d weight (out, in, 1, 1) <-> our Dense kernel (in, out)."""
  return Rule((ours,), theirs, lambda a: (a[:, :, 0, 0].T,), lambda t: t[0].T[:, :, None, None])


def patch_conv(ours: str, theirs: str) -> Rule:
  """torch patchify Conv2d weight (D, C, p, p) <-> our Dense kernel (p, p, C, D)."""
  return conv(ours, theirs)


def fused_heads(ours: Iterable[str], theirs: str, num_heads: int, bias: bool = False) -> Rule:
  """torch fused projection weight (n*D_out, D_in) (or bias (n*D_out,)) split into ``n`` of our
  per-head kernels (D_in, heads, head_dim) (or biases (heads, head_dim))."""
  ours = tuple(ours)
  n = len(ours)

  def split(a: Array) -> tuple[Array, ...]:
    parts = np.split(a, n, axis=0)
    if bias:
      return tuple(p.reshape(num_heads, -1) for p in parts)
    return tuple(p.T.reshape(p.shape[1], num_heads, -1) for p in parts)

  def join(t: tuple[Array, ...]) -> Array:
    if bias:
      return np.concatenate([p.reshape(-1) for p in t])
    return np.concatenate([p.reshape(p.shape[0], -1).T for p in t], axis=0)

  return Rule(ours, theirs, split, join)


def heads_out(ours: str, theirs: str) -> Rule:
  """torch output projection weight (D_out, heads*head_dim) <-> our kernel (heads, head_dim, D_out)."""
  def split(a: Array) -> tuple[Array, ...]:
    return (a.T,)  # reshaped to the template's shape by import_params
  return Rule((ours,), theirs, split, lambda t: t[0].reshape(-1, t[0].shape[-1]).T)


def flat_params(model: nnx.Module) -> dict[str, Array]:
  """Our parameters as {path: numpy array}, per-layer paths even when layers are scanned."""
  from vit_jax.train.sharding import logical_axes  # the axes tell scanned stacks apart
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  axes = dict(_flatten(logical_axes(model)))
  out = {}
  for path, value in _flatten(params):
    value = np.asarray(value)
    for p, v in _unstack(path, value, axes.get(path)):
      out[p] = v
  return out


def flat_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Shapes of ``flat_params(model)`` without materialising values."""
  from vit_jax.train.sharding import logical_axes
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  axes = dict(_flatten(logical_axes(model)))
  out = {}
  for path, value in _flatten(params):
    shape = tuple(value.shape)
    ax = axes.get(path)
    if ax and ax[0] == "layers":
      for i in range(shape[0]):
        out[_layer_path(path, i)] = shape[1:]
    else:
      out[path] = shape
  return out


def import_params(model: nnx.Module, rules: list[Rule], theirs: Mapping[str, Array], *,
                  what: str = "checkpoint", keep: Iterable[str] = ()) -> dict:
  """Nested params for ``model`` (as ``nnx.to_pure_dict``) from the foreign flat dict.

  Parameters whose path starts with one of ``keep`` (e.g. "head") keep the model's current
  values, and the foreign keys for them are ignored (a new head for another label set).
  """
  from vit_jax.train.sharding import logical_axes
  keep = tuple(keep)
  kept = lambda path: any(path == k or path.startswith(k.rstrip("/") + "/") for k in keep)
  shapes = flat_shapes(model)
  ignored = {r.theirs for r in rules if all(kept(p) for p in r.ours)}
  rules = [r for r in rules if r.theirs not in ignored]
  missing = [r.theirs for r in rules if r.theirs not in theirs]
  if missing:
    raise ValueError(f"{what} lacks {len(missing)} expected key(s), e.g. {missing[:5]}")
  used = {r.theirs for r in rules} | ignored
  extra = sorted(k for k in theirs if k not in used)
  if extra:
    raise ValueError(f"{what} has {len(extra)} key(s) this model has no place for, e.g. {extra[:5]}")
  flat: dict[str, Array] = {}
  for r in rules:
    arrays = r.to_ours(np.asarray(theirs[r.theirs]))
    for path, a in zip(r.ours, arrays):
      if path not in shapes:
        raise ValueError(f"rule for {r.theirs!r} names {path!r}, which this model does not have")
      if a.size != int(np.prod(shapes[path])):
        raise ValueError(f"{what} key {r.theirs!r} has shape {np.shape(theirs[r.theirs])}, which "
                         f"does not fit {path!r} of shape {shapes[path]}")
      flat[path] = a.reshape(shapes[path]).astype(np.float32)
  if keep:
    current = flat_params(model)
    flat.update({p: v for p, v in current.items() if kept(p)})
  unset = sorted(set(shapes) - set(flat))
  if unset:
    raise ValueError(f"{what} gives no value for {len(unset)} parameter(s), e.g. {unset[:5]}")
  axes = dict(_flatten(logical_axes(model)))
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return _fill(template, flat, axes)


def export_params(model: nnx.Module, rules: list[Rule]) -> dict[str, Array]:
  """The foreign flat dict of ``model``'s parameters."""
  ours = flat_params(model)
  covered = {p for r in rules for p in r.ours}
  left = sorted(set(ours) - covered)
  if left:
    raise ValueError(f"no export rule for {len(left)} parameter(s), e.g. {left[:5]}")
  return {r.theirs: np.asarray(r.to_theirs(tuple(ours[p] for p in r.ours))) for r in rules}


def load_into(model: nnx.Module, params: dict) -> None:
  """Writes nested ``params`` (from ``import_params``) into ``model`` in place."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (str(k),))
  else:
    yield "/".join(prefix), tree


def _layer_path(path: str, i: int) -> str:
  # A scanned stack lives at ".../blocks/<rest>"; its layer i is ".../blocks/i/<rest>".
  head, sep, rest = path.partition("blocks/")
  if not sep:
    raise ValueError(f"scanned parameter {path!r} is not under a 'blocks' stack")
  return f"{head}blocks/{i}/{rest}"


def _unstack(path: str, value: Array, axes) -> list[tuple[str, Array]]:
  if axes and axes[0] == "layers":
    return [(_layer_path(path, i), value[i]) for i in range(value.shape[0])]
  return [(path, value)]


def _fill(template, flat: dict[str, Array], axes: dict, prefix=()):
  if isinstance(template, Mapping):
    return {k: _fill(v, flat, axes, prefix + (str(k),)) for k, v in template.items()}
  path = "/".join(prefix)
  ax = axes.get(path)
  if ax and ax[0] == "layers":
    return np.stack([flat[_layer_path(path, i)] for i in range(template.shape[0])])
  return flat[path]


def layer_norm(ours: str, theirs: str) -> list[Rule]:
  """Our LayerNorm/GroupNorm ``scale``/``bias`` <-> torch ``weight``/``bias``."""
  return [same(f"{ours}/scale", f"{theirs}.weight"), same(f"{ours}/bias", f"{theirs}.bias")]


def dense(ours: str, theirs: str, use_bias: bool = True) -> list[Rule]:
  """Our Dense ``kernel``/``bias`` <-> torch Linear ``weight``/``bias``."""
  rules = [linear(f"{ours}/kernel", f"{theirs}.weight")]
  return rules + ([same(f"{ours}/bias", f"{theirs}.bias")] if use_bias else [])


def renamed(model: nnx.Module, rename: Callable[[str], str], *, skip: Callable[[str], bool] = lambda p: False
            ) -> list[Rule]:
  """Same layout, other names: one ``same`` rule per parameter, named by ``rename(path)``."""
  return [same(p, rename(p)) for p in flat_shapes(model) if not skip(p)]
