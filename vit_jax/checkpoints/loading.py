"""``load_pretrained``: a released or saved checkpoint into a model of ``vit_jax.models``."""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.checkpoints import hf_export, mapping, param_tree, posemb, readers
from vit_jax.checkpoints.mapping import Arrays, Family, Format, ModelSpec, Shape, natural_key
from vit_jax.checkpoints.readers import CheckpointError

log = logging.getLogger(__name__)

# The model variables besides parameters that a checkpoint can fill: model state such as frozen
# batch-norm statistics (PyTorch buffers); not kept activations or RNG state.
STATE = nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.Intermediate), nnx.Not(nnx.RngState))


def _flat_state(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {"/".join(str(getattr(p, "key", p)) for p in path): v
          for path, v in nnx.to_flat_state(nnx.state(model, STATE))}


def state_shapes(model: nnx.Module, layer_lists: Sequence[str] = ()) -> dict[str, Shape]:
  """Per-layer name -> shape of every model-state variable (``STATE``) of ``model``."""
  placeholders = {k: np.broadcast_to(np.float32(0), tuple(v.shape))
                  for k, v in _flat_state(model).items()}
  unstacked = param_tree.unstack_layers(placeholders, layer_lists)
  return {k: tuple(a.shape) for k, a in unstacked.items()}


def state_arrays(model: nnx.Module, layer_lists: Sequence[str] = ()) -> Arrays:
  """Per-layer name -> numpy value of every model-state variable of ``model``."""
  flat = {k: np.asarray(jax.device_get(v[...])) for k, v in _flat_state(model).items()}
  return param_tree.unstack_layers(flat, layer_lists)


def _assign_state(model: nnx.Module, arrays: Mapping[str, np.ndarray], layer_lists) -> None:
  """Sets the model-state variables named in ``arrays`` (per-layer names); keeps the others."""
  flat = _flat_state(model)
  values = {**state_arrays(model, layer_lists), **arrays}
  stacked = param_tree.stacked_lists(list(flat), layer_lists)
  values = param_tree.stack_layers(values, stacked) if stacked else values
  for k, var in flat.items():
    var[...] = jnp.asarray(values[k], dtype=var.dtype)


def read_checkpoint(path: str | os.PathLike) -> readers.Checkpoint:
  """A checkpoint file, an HF model folder (``config.json`` and weights) or an orbax checkpoint
  of this library."""
  if hf_export.is_hf_folder(path):
    return hf_export.read_hf_folder(path)
  return readers.read(os.fspath(path))


class CheckpointMismatchError(CheckpointError):
  """The checkpoint holds another architecture than the model."""


def detect_format(family: Family, ckpt: readers.Checkpoint, fmt: str = "auto") -> tuple[Format, Arrays]:
  """The format of ``ckpt`` for ``family`` and its arrays after the format's ``prepare``."""
  candidates = mapping.formats_for(family.name)
  names = [f.name for f in candidates]
  if fmt != "auto":
    chosen = [f for f in candidates if f.name == fmt]
    if not chosen:
      raise ValueError(f"format {fmt!r} is not one of {['auto', *names]} for {family.name} models")
    f = chosen[0]
    if ckpt.container not in f.containers:
      raise CheckpointError(f"{ckpt.path!r} is a {ckpt.container} file; format {fmt!r} is read "
                            f"from {', '.join(f.containers)} files")
    return f, f.prepare(dict(ckpt.arrays))
  for f in candidates:
    if ckpt.container in f.containers:
      prepared = f.prepare(dict(ckpt.arrays))
      if f.detect(prepared.keys()):
        return f, prepared
  keys = sorted(ckpt.arrays, key=natural_key)
  raise CheckpointMismatchError(
      f"{ckpt.path!r} ({ckpt.container}) is not a {family.name} checkpoint in any known format "
      f"({', '.join(names)}); its first parameters are: "
      + ", ".join(f"{k} {tuple(ckpt.arrays[k].shape)}" for k in keys[:8]))


def to_model_arrays(family: Family, fmt: Format, arrays: Arrays,
                    shapes: Mapping[str, tuple] | None) -> tuple[Arrays, dict[str, str]]:
  """Checkpoint arrays -> per-layer model names (and the checkpoint name of each)."""
  converted, origin, _ = mapping.to_model_names(fmt.rules, arrays, shapes)
  unstacked = param_tree.unstack_layers(converted, family.layer_lists)
  if unstacked.keys() != converted.keys():
    origin = {k: origin.get(k, k) for k in unstacked}
  return unstacked, origin


def _patterns(patterns, option: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  out = []
  for p in patterns or ():
    if not isinstance(p, str):
      raise ValueError(f"{option}: {p!r} is not a regex string")
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{option}: {p!r} is not a valid regex ({e})") from None
  return out


def _matches(patterns: list[re.Pattern], key: str) -> bool:
  return any(p.fullmatch(key) for p in patterns)


def _init_suggestion(keys: list[str], universe: list[str]) -> list[str]:
  """A few ``init`` patterns naming ``keys``: ``top/.*`` for a top-level name all of whose
  entries (in ``universe``) are listed, the exact key otherwise."""
  out = []
  for key in keys:
    top = key.split("/")[0]
    whole = all(k in keys for k in universe if k.split("/")[0] == top)
    pattern = (top if top == key else f"{top}/.*") if whole else re.escape(key)
    if pattern not in out:
      out.append(pattern)
  return out


def _mismatch_message(path: str, fmt: str, model: nnx.Module, misshaped, missing, unexpected,
                      origin, shapes, arrays) -> str:
  lines = [f"checkpoint {path!r} (format {fmt!r}) does not fit this {type(model).__name__}: "
           f"{len(misshaped)} misshaped, {len(missing)} missing and {len(unexpected)} "
           "unexpected parameters."]

  def name(k):
    return k if origin.get(k, k) == k else f"{k} (checkpoint {origin[k]})"

  if misshaped:
    lines.append("misshaped (checkpoint vs model):")
    lines += [f"  {name(k)}: {a} vs {b}" for k, a, b in misshaped]
  if missing:
    lines.append("missing from the checkpoint:")
    lines += [f"  {k} {s}" for k, s in missing]
  if unexpected:
    lines.append("unexpected (the model has no such parameter):")
    lines += [f"  {name(k)} {s}" for k, s in unexpected]
  hint = []
  not_loaded = [k for k, *_ in misshaped] + [k for k, _ in missing]
  if not_loaded:
    hint.append("name the misshaped and missing parameters in init=[...] to keep the model's "
                "own initialisation for them instead (a new head: init=['head/.*'])")
  if unexpected:
    hint.append("name the unexpected checkpoint arrays in init=[...] to drop them (a "
                "representation layer the model lacks: init=['pre_logits/.*'])")
  suggestion = (_init_suggestion(not_loaded, list(shapes))
                + _init_suggestion([k for k, _ in unexpected], list(arrays)))
  lines.append("To accept them, " + "; ".join(hint) + (
      f". Here: init={suggestion}." if len(suggestion) <= 4 else
      ". (So many differences suggest another architecture: check the model's options.)"))
  return "\n".join(lines)


def _model_values(model: nnx.Module, keys: list[str], layer_lists) -> Arrays:
  """The current values of the per-layer parameters ``keys`` of ``model`` (fetching only the
  variables that hold them)."""
  flat = {"/".join(str(getattr(p, "key", p)) for p in path): v
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  def holder(key):
    if key in flat:
      return key
    for prefix in layer_lists:
      m = re.fullmatch(re.escape(prefix) + r"/\d+/(.+)", key)
      if m and f"{prefix}/{m[1]}" in flat:
        return f"{prefix}/{m[1]}"
    raise AssertionError(f"no model variable holds {key}")

  needed = {holder(k) for k in keys}
  values = param_tree.unstack_layers(
      {n: np.asarray(jax.device_get(flat[n][...])) for n in needed}, layer_lists)
  return {k: values[k] for k in keys}


def load_pretrained(model: nnx.Module, path: str | os.PathLike | readers.Checkpoint, *, format: str = "auto",  # pylint: disable=redefined-builtin
                    resample_posemb: str = "zoom", load: Sequence[str] = (".*",),
                    init: Sequence[str] = ()) -> nnx.Module:
  """Loads the checkpoint at ``path`` into ``model``'s parameters, in place; returns ``model``.

  Args:
    model: a model of ``vit_jax.models`` (any family with registered mappings).
    path: an ``.npz`` (original ViT or big_vision), ``.safetensors`` or torch state-dict file
      (timm names), an HF model folder, or an orbax checkpoint of this library (step dir,
      checkpoints dir, workdir); or a ``Checkpoint`` already read (as ``infer_model`` returns).
    format: "auto" (detected from the names) or one of the family's formats ("vit",
      "big_vision", "timm", "vit_jax").
    resample_posemb: how to resample position embeddings to the model's grid: "zoom"
      (the original's ``scipy.ndimage.zoom(order=1)``), "bilinear" or "bicubic".
    load: regexes of model parameters to take from the checkpoint.
    init: regexes of model parameters to keep as the model initialised them (and of checkpoint
      arrays to drop).

  Patterns are Python regexes matched against the whole per-layer model name
  (``re.fullmatch``): ``head/kernel``, ``pre_logits/bias``, ``cls``,
  ``Transformer/blocks/3/LayerNorm_0/scale`` (per layer even for a ``scan=True`` model),
  ``Transformer/posembed_input/pos_embedding``. Checkpoint names are mapped to these first.

  * A model parameter is taken from the checkpoint iff it matches some ``load`` pattern and no
    ``init`` pattern; otherwise it keeps its current value (the model's initialisation: zeros
    for a ViT's head).
  * A checkpoint array that is not taken is dropped (logged at INFO) if it maps to a model
    parameter that keeps its initialisation, or if it matches an ``init`` pattern (so
    ``init=["pre_logits/.*"]`` drops a representation layer the model lacks, ``init=["cls"]`` a
    class token a ``gap`` model has no use for). Any other array the model lacks is unexpected.
  * Every model parameter to take that the checkpoint lacks (missing) or holds with another
    shape (misshaped), and every unexpected array, raise one ``CheckpointMismatchError``
    listing them all, with the ``init`` patterns that would accept them.

  Model state (variables that are not parameters, ``STATE``: DETR's frozen batch-norm
  statistics) is loaded the same way when the checkpoint holds some of it (PyTorch buffers);
  a checkpoint that holds none of it leaves it as it is.

  Position embeddings are resampled to the model's grid first (a class token's row is kept
  apart, or dropped for a model without one), so a new resolution is never a mismatch. Typical:
  ``init=["head/.*"]`` for a new head (other classes), ``init=["head/.*", "pre_logits/.*"]`` to
  also drop (or re-initialise) a representation layer, the original fine-tuning recipe.
  """
  if resample_posemb not in posemb.METHODS:
    raise ValueError(f"resample_posemb {resample_posemb!r} is not one of {posemb.METHODS}")
  load_rx, init_rx = _patterns(load, "load"), _patterns(init, "init")
  family = mapping.family_of(model)
  ckpt = path if isinstance(path, readers.Checkpoint) else read_checkpoint(path)
  fmt, prepared = detect_format(family, ckpt, format)
  shapes = param_tree.model_shapes(model, family.layer_lists)
  model_state = state_shapes(model, family.layer_lists)
  arrays, origin = to_model_arrays(family, fmt, prepared, {**model_state, **shapes})
  if any(k in model_state for k in arrays):
    shapes = {**shapes, **model_state}  # the checkpoint holds model state: load it as parameters
  else:
    model_state = {}
  all_arrays = list(arrays)

  taken = [k for k in shapes if _matches(load_rx, k) and not _matches(init_rx, k)]
  taken_set = set(taken)
  kept = [k for k in shapes if k not in taken_set]
  dropped = sorted((k for k in arrays if k not in taken_set
                    and (k in shapes or _matches(init_rx, k))), key=natural_key)
  arrays = {k: v for k, v in arrays.items() if k not in set(dropped)}
  if dropped:
    log.info("load_pretrained: dropped checkpoint arrays %s", ", ".join(dropped))
  if kept:
    log.info("load_pretrained: kept the model's initialisation for %s", ", ".join(kept))

  for key in family.posemb:
    if key in arrays and key in shapes and arrays[key].shape != shapes[key]:
      old, new = arrays[key].shape, shapes[key]
      if old[0] == new[0] == 1 and old[2:] == new[2:]:
        arrays[key] = posemb.resample_posemb(arrays[key], new[1], resample_posemb)
        log.info("load_pretrained: resampled %s from %s to %s (%s)", key, old, new, resample_posemb)

  misshaped = [(k, tuple(arrays[k].shape), tuple(shapes[k])) for k in taken
               if k in arrays and tuple(arrays[k].shape) != tuple(shapes[k])]
  missing = [(k, tuple(shapes[k])) for k in taken if k not in arrays]
  unexpected = [(k, tuple(arrays[k].shape)) for k in arrays if k not in shapes]
  if misshaped or missing or unexpected:
    order = lambda item: natural_key(item[0])
    raise CheckpointMismatchError(_mismatch_message(
        ckpt.path, fmt.name, model, sorted(misshaped, key=order), sorted(missing, key=order),
        sorted(unexpected, key=order), origin, shapes, all_arrays))
  state = {k: arrays.pop(k) for k in list(arrays) if k in model_state}
  kept_params = [k for k in kept if k not in model_state]
  if kept_params:
    arrays.update(_model_values(model, kept_params, family.layer_lists))
  param_tree.assign(model, arrays, family.layer_lists)
  if state:
    _assign_state(model, state, family.layer_lists)
  log.info("load_pretrained: loaded %d arrays from %s (format %s)", len(taken), ckpt.path, fmt.name)
  return model


def infer_model(path: str | os.PathLike) -> tuple[ModelSpec, readers.Checkpoint]:
  """The model a checkpoint holds (for predicting without ``--model``), and the checkpoint.

  Orbax checkpoints of this library record it; for other files each family that can infer
  its models from the arrays is asked in turn (``Family.infer`` raises ValueError for a
  checkpoint of another family).
  """
  return infer_checkpoint(readers.read(os.fspath(path)))


def infer_checkpoint(ckpt: readers.Checkpoint) -> tuple[ModelSpec, readers.Checkpoint]:
  """``infer_model`` of a checkpoint already read (its arrays possibly prepared by the caller)."""
  signature = ckpt.meta.get("signature")
  if ckpt.container == "orbax" and signature:
    task = signature.get("task", "classification")
    size = (tuple(int(v) for v in signature["canvas"]) if "canvas" in signature
            else int(signature["image_size"]))
    return ModelSpec(signature["model"], int(signature["num_classes"]), size,
                     dict(signature.get("options") or {}), task), ckpt
  for family in mapping.families():
    if family.infer is None:
      continue
    try:
      fmt, prepared = detect_format(family, ckpt)
      arrays, _ = to_model_arrays(family, fmt, prepared, None)
      return family.infer(arrays), ckpt
    except ValueError:  # Not this family's checkpoint (CheckpointError is a ValueError).
      continue
  raise CheckpointError(f"cannot tell which model {ckpt.path!r} holds; pass the model name "
                        f"(e.g. --model ViT-B/16)")


def resolve_model(checkpoint: str, model: str | None = None, num_classes: int | None = None,
                  size_options: Sequence[str] = ()) -> tuple[ModelSpec, readers.Checkpoint]:
  """(ModelSpec, Checkpoint) of ``checkpoint``: read from it, with ``model`` (a name) and
  ``num_classes`` overriding; options in ``size_options`` come from the name when it is given."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  try:
    spec, ckpt = infer_model(checkpoint)
  except readers.CheckpointNotFoundError:
    raise
  except readers.CheckpointError:
    if not model:
      raise
    spec, ckpt = None, readers.read(checkpoint)
  if not model:
    return spec, ckpt
  same_family = spec is not None and models.resolve(spec.name)[0] is models.resolve(model)[0]
  num_classes = num_classes or (spec.num_classes if spec else None)
  if not num_classes:
    raise ValueError(f"cannot read the number of classes from {checkpoint!r}; pass --num_classes")
  # The name fixes the sizes; options such as the classifier still come from the checkpoint.
  overrides = {k: v for k, v in spec.overrides.items() if k not in size_options} if same_family else {}
  return ModelSpec(model, num_classes, spec.image_size if spec else 224, overrides,
                  spec.task if spec else "classification"), ckpt
