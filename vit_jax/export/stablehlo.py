"""Serialised StableHLO (``jax.export``): one file that any JAX of a compatible version calls
without this library::

    exported = jax.export.deserialize(open(PATH, "rb").read())
    outputs = exported.call(images)          # {"logits": [b, classes]}

The parameters are constants of the module (closed over when traced), so the file is the whole
model. A ``<PATH>.json`` sidecar says what goes in and comes out (``serving.describe``).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
from flax import nnx

from vit_jax.export import serving as serving_lib
from vit_jax.export.preprocessing import Preprocessing
from vit_jax.export.serving import ServingConfig


def export_stablehlo(model: nnx.Module, serving: ServingConfig, out: str, *,
                     batch: int | None = None, preprocessing: Preprocessing | None = None,
                     platforms: Sequence[str] | None = None) -> list[str]:
  """Writes ``out`` (the serialised ``jax.export.Exported``) and ``out.json``; returns both paths.

  ``batch=None``: a symbolic batch dimension (any batch size at call time). ``platforms``: the
  backends to lower for (e.g. ("cpu", "cuda")); default the current one.
  """
  fn = serving_lib.serving_function(model, serving, preprocessing)
  specs = serving_lib.input_specs(serving, batch, preprocessing)
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(exported.serialize())
  outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
  sidecar = serving_lib.describe(serving, "stablehlo", specs, outputs, preprocessing)
  sidecar["platforms"] = list(exported.platforms)
  with open(out + ".json", "w") as f:
    json.dump(sidecar, f, indent=2)
    f.write("\n")
  return [out, out + ".json"]
