"""The one place that maps between per-layer names and a model's actual parameter tree.

Converters see every model as per-layer: ``Transformer/blocks/{i}/...``. A model built with
``scan=True`` holds those blocks stacked (``Transformer/blocks/...`` with a leading layer axis);
``stack_layers`` and ``unstack_layers`` convert between the two, for any family's
``layer_lists``.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.checkpoints.mapping import Arrays, Shape


def _key(part) -> str:
  return str(getattr(part, "key", part))


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {"/".join(_key(p) for p in path): v
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def stacked_lists(keys: Sequence[str], layer_lists: Sequence[str]) -> list[str]:
  """The layer lists that ``keys`` hold stacked (``prefix/name`` rather than ``prefix/0/name``)."""
  out = []
  for prefix in layer_lists:
    below = [k[len(prefix) + 1:] for k in keys if k.startswith(prefix + "/")]
    if below and not any(re.match(r"\d+/", rest) for rest in below):
      out.append(prefix)
  return out


def unstack_layers(arrays: Mapping[str, np.ndarray], layer_lists: Sequence[str]) -> Arrays:
  """``prefix/name`` [L, ...] -> ``prefix/{i}/name`` [...] for each stacked list."""
  stacked = stacked_lists(list(arrays), layer_lists)
  out: Arrays = {}
  for k, v in arrays.items():
    prefix = next((p for p in stacked if k.startswith(p + "/")), None)
    if prefix is None:
      out[k] = v
      continue
    rest = k[len(prefix) + 1:]
    for i in range(v.shape[0]):
      out[f"{prefix}/{i}/{rest}"] = v[i]
  return out


def stack_layers(arrays: Mapping[str, np.ndarray], layer_lists: Sequence[str]) -> Arrays:
  """``prefix/{i}/name`` -> ``prefix/name`` stacked on a new leading axis (inverse of unstack)."""
  out: Arrays = {}
  groups: dict[str, dict[int, np.ndarray]] = {}
  for k, v in arrays.items():
    prefix = next((p for p in layer_lists if re.match(re.escape(p) + r"/\d+/", k)), None)
    if prefix is None:
      out[k] = v
      continue
    i, rest = k[len(prefix) + 1:].split("/", 1)
    groups.setdefault(f"{prefix}/{rest}", {})[int(i)] = v
  for k, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"cannot stack {k}: layers {sorted(layers)} are not 0..{len(layers) - 1}")
    out[k] = np.stack([layers[i] for i in range(len(layers))])
  return out


def model_shapes(model: nnx.Module, layer_lists: Sequence[str]) -> dict[str, Shape]:
  """Per-layer name -> shape of every parameter of ``model`` (works on abstract models too)."""
  flat = _flat_params(model)
  stacked = stacked_lists(list(flat), layer_lists)
  out: dict[str, Shape] = {}
  for k, v in flat.items():
    shape = tuple(v.shape)
    prefix = next((p for p in stacked if k.startswith(p + "/")), None)
    if prefix is None:
      out[k] = shape
    else:
      rest = k[len(prefix) + 1:]
      for i in range(shape[0]):
        out[f"{prefix}/{i}/{rest}"] = shape[1:]
  return out


def model_arrays(model: nnx.Module, layer_lists: Sequence[str]) -> Arrays:
  """Per-layer name -> numpy value of every parameter of ``model``."""
  flat = {k: np.asarray(jax.device_get(v[...])) for k, v in _flat_params(model).items()}
  return unstack_layers(flat, layer_lists)


def assign(model: nnx.Module, arrays: Mapping[str, np.ndarray], layer_lists: Sequence[str]) -> None:
  """Sets every parameter of ``model`` from per-layer ``arrays`` (which must cover them all)."""
  flat = _flat_params(model)
  stacked = stacked_lists(list(flat), layer_lists)
  values = stack_layers(arrays, stacked) if stacked else dict(arrays)
  missing = sorted(set(flat) - set(values))
  if missing:
    raise AssertionError(f"assign: no values for {missing}")
  for k, var in flat.items():
    value = values[k]
    if tuple(value.shape) != tuple(var.shape):
      raise AssertionError(f"assign: {k} has shape {value.shape}, the model {var.shape}")
    var[...] = jnp.asarray(value, dtype=var.dtype)
