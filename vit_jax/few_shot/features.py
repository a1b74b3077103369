"""Frozen pre-logits features (the input of the classifier head) of every example of a split.

Any classification family serves: every one keeps its classifier in the attribute ``head``, so
the jitted step merges the model, puts a pass-through in the head's place and calls it as the
classification task does. The step runs on the run's mesh with the run's shardings; its outputs
are replicated, so every process holds the whole split's features, in the pipeline's order (the
same for any device count, and for any process count with a fixed ``num_data_shards``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.train.trainer import MeshJit, Setup

HEAD = "head"
FeatureStep = Callable[[Any, Any, dict], dict]


class _PassThrough(nnx.Module):
  """Takes the head's place: returns its input, the pre-logits."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def check_classifier(setup: Setup) -> None:
  """Raises a ValueError unless the run's model has a classifier head to take features from."""
  model = nnx.merge(setup.graphdef, setup.abstract_state.params, setup.abstract_state.model_state)
  if not isinstance(getattr(model, HEAD, None), nnx.Module):
    c = setup.config
    raise ValueError(
        f"few-shot evaluation takes the input of the classifier head (the model's {HEAD!r}), but "
        f"the {c.task!r} task's model {c.model.name!r} has none; it serves the classification "
        f"task's models (config.task='classification')")


def make_feature_step(setup: Setup) -> FeatureStep:
  """``(params, model_state, batch) -> {"features" [B, D] float32, the batch's "label" or
  "labels", "mask"}``, jitted on the run's mesh, every output replicated."""
  graphdef = setup.graphdef

  def feature_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    setattr(model, HEAD, _PassThrough())
    features = model(batch["image"], train=False).astype(jnp.float32)
    return {"features": features, **{k: v for k, v in batch.items() if k != "image"}}

  return MeshJit(setup.mesh, jax.jit(
      feature_step,
      in_shardings=(setup.shardings.params, setup.shardings.model_state, setup.batch_sharding),
      out_shardings=setup.replicated))


def _labels(outputs: dict, where: str, pp: str) -> np.ndarray:
  if "label" in outputs:
    return np.asarray(outputs["label"]).astype(np.int64)
  if "labels" not in outputs:
    raise ValueError(f"{where}: the preprocessing {pp!r} keeps neither 'label' (an integer) nor "
                     "'labels' (one-hot); keep one of them (config.few_shot.pp)")
  labels = np.asarray(outputs["labels"])
  if np.any((labels.max(axis=1) <= 0) & (outputs["mask"] > 0)):
    raise ValueError(f"{where}: some one-hot labels are all zero, so the dataset has more classes "
                     f"than the preprocessing {pp!r} makes; give config.few_shot.pp one that keeps "
                     "'label' (e.g. \"decode|value_range(-1, 1)|keep('image', 'label')\")")
  return np.argmax(labels, axis=1).astype(np.int64)


def extract(setup: Setup, state: Any, *, dataset: str, split: str, pp: str,
            feature_step: FeatureStep | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D] float32, labels [N] int64) of every example of ``split``, each once (the
  pipeline's padding dropped), read through ``vit_jax.data.eval_batches`` with ``pp``."""
  from vit_jax import data  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  c = setup.config
  feature_step = feature_step or make_feature_step(setup)
  where = f"few-shot dataset {dataset!r} split {split!r}"
  features, labels = [], []
  for local in data.eval_batches(dataset=dataset, split=split, pp=pp, batch_size=c.eval_batch_size,
                                 data_dir=c.data_dir, num_shards=c.num_data_shards or None):
    if "image" not in local:
      raise ValueError(f"{where}: the preprocessing {pp!r} keeps no 'image' (it keeps "
                       f"{sorted(local)})")
    batch = {k: v for k, v in local.items() if k in ("image", "label", "labels", "mask")}
    out = jax.device_get(feature_step(state.params, state.model_state, setup.global_batch(batch)))
    real = np.asarray(out["mask"]) > 0
    features.append(np.asarray(out["features"])[real])
    labels.append(_labels(out, where, pp)[real])
  if not features or not sum(len(f) for f in features):
    raise ValueError(f"{where} is empty")
  return np.concatenate(features), np.concatenate(labels)
