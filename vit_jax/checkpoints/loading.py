"""``load_pretrained``: a released or saved checkpoint into a model of ``vit_jax.models``."""

from __future__ import annotations

import logging
import os
from typing import Mapping

import numpy as np
from flax import nnx

from vit_jax.checkpoints import mapping, param_tree, posemb, readers
from vit_jax.checkpoints.mapping import Arrays, Family, Format, ModelSpec, natural_key
from vit_jax.checkpoints.readers import CheckpointError

log = logging.getLogger(__name__)


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


def _has_prefix(key: str, prefix: str) -> bool:
  return key == prefix or key.startswith(prefix + "/")


def _mismatch_message(path: str, fmt: str, model: nnx.Module, misshaped, missing, unexpected,
                      origin) -> str:
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
  return "\n".join(lines)


def load_pretrained(model: nnx.Module, path: str | os.PathLike | readers.Checkpoint, *, format: str = "auto",  # pylint: disable=redefined-builtin
                    resample_posemb: str = "zoom", reset_head: bool | None = None) -> nnx.Module:
  """Loads the checkpoint at ``path`` into ``model``'s parameters, in place; returns ``model``.

  Args:
    model: a model of ``vit_jax.models`` (any family with registered mappings).
    path: an ``.npz`` (original ViT or big_vision), ``.safetensors`` or torch state-dict file
      (timm names), or an orbax checkpoint of this library (step dir, checkpoints dir, workdir);
      or a ``Checkpoint`` already read (as ``infer_model`` returns).
    format: "auto" (detected from the names) or one of the family's formats ("vit",
      "big_vision", "timm", "vit_jax").
    resample_posemb: how to resample position embeddings to the model's grid: "zoom"
      (the original's ``scipy.ndimage.zoom(order=1)``), "bilinear" or "bicubic".
    reset_head: True re-initialises the head to zero, False keeps it (and fails if it does not
      fit); None (default) resets it when the checkpoint has none, when its shape differs (other
      number of classes) or when a representation layer is dropped.

  Dropped without error: checkpoint parameters of the family's ``optional`` prefixes that the
  model lacks (``pre_logits`` when the model has no representation layer, ``cls`` when it
  pools without a class token). Anything else that does not fit raises
  ``CheckpointMismatchError`` listing every misshaped, missing and unexpected parameter.
  """
  if resample_posemb not in posemb.METHODS:
    raise ValueError(f"resample_posemb {resample_posemb!r} is not one of {posemb.METHODS}")
  if reset_head not in (None, True, False):
    raise ValueError(f"reset_head must be True, False or None (automatic), got {reset_head!r}")
  family = mapping.family_of(model)
  ckpt = path if isinstance(path, readers.Checkpoint) else readers.read(os.fspath(path))
  fmt, prepared = detect_format(family, ckpt, format)
  shapes = param_tree.model_shapes(model, family.layer_lists)
  arrays, origin = to_model_arrays(family, fmt, prepared, shapes)

  dropped = sorted({p for k in arrays for p in family.optional
                    if _has_prefix(k, p) and not any(_has_prefix(m, p) for m in shapes)})
  arrays = {k: v for k, v in arrays.items() if not any(_has_prefix(k, p) for p in dropped)}
  for p in dropped:
    log.info("load_pretrained: dropped %s (the model has none)", p)

  for key in family.posemb:
    if key in arrays and key in shapes and arrays[key].shape != shapes[key]:
      old, new = arrays[key].shape, shapes[key]
      if old[0] == new[0] == 1 and old[2:] == new[2:]:
        arrays[key] = posemb.resample_posemb(arrays[key], new[1], resample_posemb)
        log.info("load_pretrained: resampled %s from %s to %s (%s)", key, old, new, resample_posemb)

  head_keys = [k for k in shapes if _has_prefix(k, family.head)]
  if reset_head is None:
    ckpt_head = [k for k in arrays if _has_prefix(k, family.head)]
    reset_head = bool(head_keys) and (
        not ckpt_head or any(k in shapes and arrays[k].shape != shapes[k] for k in ckpt_head)
        or any(_has_prefix(d, p) for d in dropped for p in family.reset_head_when_dropped))
  if reset_head:
    arrays = {k: v for k, v in arrays.items() if not _has_prefix(k, family.head)}
    arrays.update({k: np.zeros(shapes[k], np.float32) for k in head_keys})
    log.info("load_pretrained: head re-initialised to zeros")

  misshaped = [(k, tuple(arrays[k].shape), tuple(shapes[k])) for k in shapes
               if k in arrays and tuple(arrays[k].shape) != tuple(shapes[k])]
  missing = [(k, tuple(shapes[k])) for k in shapes if k not in arrays]
  unexpected = [(k, tuple(arrays[k].shape)) for k in arrays if k not in shapes]
  if misshaped or missing or unexpected:
    order = lambda item: natural_key(item[0])
    raise CheckpointMismatchError(_mismatch_message(
        ckpt.path, fmt.name, model, sorted(misshaped, key=order), sorted(missing, key=order),
        sorted(unexpected, key=order), origin))
  param_tree.assign(model, arrays, family.layer_lists)
  log.info("load_pretrained: loaded %d arrays from %s (format %s)", len(arrays), ckpt.path, fmt.name)
  return model


def infer_model(path: str | os.PathLike) -> tuple[ModelSpec, readers.Checkpoint]:
  """The model a checkpoint holds (for predicting without ``--model``), and the checkpoint.

  Orbax checkpoints of this library record it; for other files each family that can infer
  its models from the arrays is asked in turn (``Family.infer`` raises ValueError for a
  checkpoint of another family).
  """
  ckpt = readers.read(os.fspath(path))
  signature = ckpt.meta.get("signature")
  if ckpt.container == "orbax" and signature:
    return ModelSpec(signature["model"], int(signature["num_classes"]), int(signature["image_size"]),
                     dict(signature.get("options") or {})), ckpt
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
