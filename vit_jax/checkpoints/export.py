"""``export_npz``: a model's parameters as an original-ViT or big_vision ``.npz``."""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from vit_jax.checkpoints import mapping, param_tree

WRITABLE = ("vit", "big_vision")


def export_npz(model: nnx.Module, path: str | os.PathLike, format: str = "vit", *,  # pylint: disable=redefined-builtin
               scan: bool = False) -> str:
  """Writes ``model``'s parameters (float32) to ``path`` in ``format``; returns ``path``.

  ``format="vit"`` writes the original names (``Transformer/encoderblock_{i}/...``), which
  the original code, timm's npz reader and ``load_pretrained`` read. ``format="big_vision"``
  writes ``params/...`` with Linen block names (``scan=True``: blocks stacked as
  ``Transformer/encoderblock`` with a leading depth axis). A token-pooling model's class-token
  position embedding is folded into ``cls`` there (big_vision has no slot for it): the same
  function, other numbers.
  """
  if format not in WRITABLE:
    raise ValueError(f"format {format!r} is not one of {WRITABLE}")
  family = mapping.family_of(model)
  fmt = next((f for f in mapping.formats_for(family.name) if f.name == format), None)
  if fmt is None:
    raise ValueError(f"{family.name} models have no {format!r} format; they have "
                     f"{mapping.format_names(family.name)}")
  arrays = param_tree.model_arrays(model, family.layer_lists)
  out = mapping.to_checkpoint_names(fmt.rules, arrays)
  if fmt.finish is not None:
    out = fmt.finish(out, scan=scan) if scan else fmt.finish(out)
  elif scan:
    raise ValueError(f"format {format!r} has no scan layout")
  path = os.fspath(path)
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in out.items()})
  return path
