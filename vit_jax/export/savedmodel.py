"""TensorFlow SavedModel through ``jax2tf``, served as ``serving_default``::

    loaded = tf.saved_model.load(PATH)
    outputs = loaded.signatures["serving_default"](images=images)   # {"logits": ...}

jax2tf writes *native serialisation*: the model is one ``XlaCallModule`` op holding the
StableHLO module, which TensorFlow runs on CPU and GPU (TF Serving included) but which TFLite
and tf2onnx cannot convert. The parameters are TF variables (``variables/``), so models past
protobuf's 2 GB limit save too. TensorFlow is imported only here, when a SavedModel is written.

jax serialises CHLO ops (``erf``: the exact GELU) as StableHLO composites, which TensorFlow's
XlaCallModule (TF 2.21) does not refine to the actual batch size ("Module has dynamic shapes");
``_inline_composites`` replaces them by their bodies before the conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from vit_jax.export import serving as serving_lib
from vit_jax.export.preprocessing import Preprocessing
from vit_jax.export.serving import ServingConfig


def _inline_composites(exported: jax.export.Exported) -> jax.export.Exported:
  """``exported`` with every StableHLO composite replaced by its decomposition."""
  import jax.extend.mlir  # pylint: disable=g-import-not-at-top
  from jax.interpreters import mlir  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir import ir, passmanager  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir.dialects import stablehlo  # pylint: disable=g-import-not-at-top
  stablehlo.register_stablehlo_passes()
  with mlir.make_ir_context():
    module = ir.Module.parse(exported.mlir_module())
    passmanager.PassManager.parse(
        "builtin.module(func.func(stablehlo-legalize-composite-to-call),inline,symbol-dce)"
    ).run(module.operation)
    version = stablehlo.get_version_from_compatibility_requirement(
        stablehlo.StablehloCompatibilityRequirement.WEEK_4)
    data = jax.extend.mlir.serialize_portable_artifact(module, version, False)
  return dataclasses.replace(exported, mlir_module_serialized=data)


def export_savedmodel(model: nnx.Module, serving: ServingConfig, out: str, *,
                      batch: int | None = None, preprocessing: Preprocessing | None = None,
                      platforms: Sequence[str] | None = None) -> list[str]:
  """Writes the SavedModel directory ``out`` and ``out.json``; returns both paths.

  The ``serving_default`` signature takes ``images`` (and a detector's ``pixel_mask`` and
  ``image_sizes``) with a batch dimension of any size (``batch=None``) or of ``batch``.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  params = [np.asarray(jax.device_get(leaf)) for leaf in leaves]

  def apply(param_leaves, *inputs):
    net = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, param_leaves))
    return serving_lib.outputs(net, serving, preprocessing, *inputs)

  specs = serving_lib.input_specs(serving, batch, preprocessing)
  param_specs = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
  exported = _inline_composites(
      jax.export.export(jax.jit(apply), platforms=platforms)(param_specs, *specs))
  polymorphic = [None] + [None if batch is not None else
                          "(b, " + ", ".join(str(d) for d in s.shape[1:]) + ")" for s in specs]
  converted = jax2tf.convert(exported.call, polymorphic_shapes=polymorphic, with_gradient=False,
                             native_serialization_platforms=platforms)

  names = serving_lib.INPUT_NAMES
  signature = [tf.TensorSpec([batch] + list(s.shape[1:]), tf.as_dtype(np.dtype(s.dtype)), name=n)
               for n, s in zip(names, specs)]
  module = tf.Module()
  module.params = [tf.Variable(p, trainable=False, name=f"param_{i}") for i, p in enumerate(params)]

  @tf.function(autograph=False, input_signature=signature)
  def serve(*inputs):
    return converted(module.params, *inputs)

  module.serve = serve
  out = os.fspath(out)
  tf.saved_model.save(module, out, signatures={"serving_default": serve})
  outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
  sidecar = serving_lib.describe(serving, "savedmodel", specs, outputs, preprocessing)
  with open(out + ".json", "w") as f:
    json.dump(sidecar, f, indent=2)
    f.write("\n")
  return [out, out + ".json"]
