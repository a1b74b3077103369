"""The set loss and its gradients for YOLOS and DETR, jitted with parameters and batch sharded
over 8 fake devices (data=8 and fsdp=8), equal one device's."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from vit_jax import detection, models
from vit_jax.train import sharding
from vit_jax.train.step import mean_terms, split_model

# Widths divisible by 8, so that fsdp=8 really splits the parameters.
MODELS = {
    "YOLOS": ("YOLOS-Ti/8", dict(image_size=(32, 48), hidden_size=64, num_layers=2, num_heads=4,
                                 mlp_dim=128, num_det_tokens=10,
                                 use_mid_position_embeddings=True)),
    "DETR": ("DETR-R50", dict(resnet_layers=(1, 1), resnet_width=8, hidden_size=32,
                              encoder_layers=1, decoder_layers=2, num_heads=4, mlp_dim=64,
                              num_queries=10, dropout_rate=0.0, attention_dropout_rate=0.0)),
}
NUM_CLASSES = 6
BATCH = 8


def batch_and_targets(seed: int = 0) -> tuple[dict, dict]:
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (BATCH, 32, 48, 3)).astype(np.float32)
  mask = np.ones((BATCH, 32, 48), np.float32)
  mask[1::2, :, 40:] = 0  # every other image padded on the right
  counts = rng.integers(0, 5, BATCH)
  counts[0] = 0  # an image without boxes
  box_mask = np.arange(4)[None, :] < counts[:, None]
  centres = rng.uniform(0.2, 0.8, (BATCH, 4, 2))
  sizes = rng.uniform(0.05, 0.3, (BATCH, 4, 2))
  targets = {"labels": rng.integers(0, NUM_CLASSES, (BATCH, 4)).astype(np.int32),
             "boxes": np.concatenate([centres, sizes], -1).astype(np.float32),
             "box_mask": box_mask}
  return {"image": images, "pixel_mask": mask}, targets


@functools.cache
def model_arrays(name: str, options: tuple) -> tuple:
  """(abstract model, graphdef, params, model_state): the model initialised by one compiled
  program (eager initialisation compiles one small program per parameter shape)."""
  create = lambda: models.create(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), **dict(options))
  abstract = nnx.eval_shape(create)
  graphdef = split_model(abstract)[0]
  params, model_state = jax.device_get(jax.jit(lambda: split_model(create())[1:])())
  # Random heads at a trained scale, so that every parameter gets a gradient well above rounding.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: (p + 0.02 * rng.standard_normal(p.shape)).astype(np.float32),
                        params)
  return abstract, graphdef, params, model_state


def loss_and_grads(name: str, options: dict, mesh_spec: str, devices: list) -> tuple:
  model, graphdef, params, model_state = model_arrays(name, tuple(sorted(options.items())))
  mesh = sharding.make_mesh(mesh_spec, devices)
  rules = sharding.default_rules()
  params = jax.device_put(params, sharding.param_shardings(
      params, sharding.logical_axes(model), rules, mesh))
  model_state = jax.device_put(model_state, sharding.param_shardings(
      model_state, sharding.logical_axes(model, nnx.Not(nnx.Param)), rules, mesh))
  batch, targets = batch_and_targets()
  data = sharding.batch_sharding(mesh)
  batch, targets = jax.device_put((batch, targets), data)
  config = detection.SetLossConfig(matcher="jax")  # the matcher for pods: no host round trip
  num_aux = model.config.decoder_layers - 1 if name.startswith("DETR") else 0
  coefs = detection.objective(config, num_aux)

  detection.check_labels(targets, NUM_CLASSES)  # on the host, as the task does

  def objective(params, model_state, batch, targets):
    outputs = nnx.merge(graphdef, params, model_state)(batch["image"],
                                                       pixel_mask=batch["pixel_mask"])
    terms = mean_terms(detection.set_loss(outputs, targets, config))
    return sum(c * terms[k] for k, c in coefs.items()), terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      params, model_state, batch, targets)
  return jax.device_get((loss, terms, grads))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_sharded_set_loss_equals_one_device(family):
  name, options = MODELS[family]
  ref_loss, ref_terms, ref_grads = loss_and_grads(name, options, "data=1", jax.devices()[:1])
  assert np.isfinite(ref_loss) and ref_terms["loss_bbox"] > 0
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  for mesh in ("data=8", "fsdp=8"):
    loss, terms, grads = loss_and_grads(name, options, mesh, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=mesh)
    for k in ref_terms:
      np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-5, atol=1e-7, err_msg=f"{mesh} {k}")
    flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    for (path, g), w in zip(flat_ref, jax.tree.leaves(grads)):
      # Relative to the largest gradient entry: float32 sums in another order.
      np.testing.assert_allclose(w, g, rtol=1e-5, atol=1e-5 * scale,
                                 err_msg=f"{mesh} {jax.tree_util.keystr(path)}")
