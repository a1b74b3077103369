"""Image classification: batches ``{"image", "labels"[, "mask"]}`` with one-hot (or soft)
labels; softmax or sigmoid cross-entropy, label smoothing, mixup; top-1 and top-5."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax import models
from vit_jax.tasks.base import LossTerms, SumEvaluator, model_kwargs, register

LOSSES = ("softmax_xent", "sigmoid_xent")


def smooth_labels(labels: jax.Array, smoothing: float) -> jax.Array:
  if not smoothing:
    return labels
  return labels * (1.0 - smoothing) + smoothing / labels.shape[-1]


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy against (soft) one-hot labels."""
  return -jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example sum over classes of binary cross-entropy (big_vision's sigmoid_xent)."""
  logits = logits.astype(jnp.float32)
  return -jnp.sum(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits),
                  axis=-1)


def loss_fn(name: str):
  if name not in LOSSES:
    raise ValueError(f"loss {name!r} is not one of {LOSSES}")
  return {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}[name]


def mixup(key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float):
  """Mixes each example with the batch rolled by one, one Beta(alpha, alpha) ratio per batch."""
  lam = jax.random.beta(key, alpha, alpha)
  lam = jnp.maximum(lam, 1.0 - lam)
  mix = lambda x: lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0)
  return mix(images).astype(images.dtype), mix(labels)


def _mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  """1 for real examples, 0 for the padding of a last eval batch."""
  n = batch["labels"].shape[0]
  return batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones((n,), jnp.float32)


class Classification:
  """Image classification with any registered model."""

  objective = {"loss": 1.0}

  def __init__(self, config: Any):
    self.config = config
    self.per_example_loss = loss_fn(config.loss)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    c = self.config
    return models.create(c.model.name, num_classes=c.num_classes, image_size=c.image_size,
                         rngs=rngs, **model_kwargs(c))

  def signature(self) -> dict:
    """What a checkpoint must match to be resumed by this config."""
    c = self.config
    return {"task": "classification", "model": c.model.name, "num_classes": c.num_classes,
            "image_size": c.image_size, "options": dict(sorted(model_kwargs(c).items()))}

  def loss(self, model: nnx.Module, batch: dict, rng: jax.Array, train: bool) -> LossTerms:
    c = self.config
    images, labels = batch["image"], batch["labels"]
    mix_key, drop_key = jax.random.split(rng)
    if train and c.mixup_alpha:
      images, labels = mixup(mix_key, images, labels, c.mixup_alpha)
    if train:
      labels = smooth_labels(labels, c.label_smoothing)
    logits = model(images, train=train, rngs=nnx.Rngs(dropout=drop_key))
    mask = _mask(batch)
    return {"loss": (jnp.sum(self.per_example_loss(logits, labels) * mask), jnp.sum(mask))}

  def eval_outputs(self, model: nnx.Module, batch: dict) -> LossTerms:
    logits = model(batch["image"], train=False)
    labels, mask = batch["labels"], _mask(batch)
    label = jnp.argmax(labels, axis=-1)
    topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    top1 = (topk[:, 0] == label).astype(jnp.float32)
    top5 = jnp.any(topk == label[:, None], axis=-1).astype(jnp.float32)
    loss = self.per_example_loss(logits, labels)
    count = jnp.sum(mask)
    return {"top1": (jnp.sum(top1 * mask), count), "top5": (jnp.sum(top5 * mask), count),
            "loss": (jnp.sum(loss * mask), count)}

  def evaluator(self) -> SumEvaluator:
    return SumEvaluator(count_name="examples")

  def format_metrics(self, metrics: Mapping[str, Any]) -> str:
    return (f"top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, loss {metrics['loss']:.4f} "
            f"on {metrics['examples']} images")

  def input_spec(self, batch_size: int) -> dict:
    c = self.config
    channels = c.model.get("channels") or 3
    return {"image": jax.ShapeDtypeStruct((batch_size, c.image_size, c.image_size, channels), jnp.float32),
            "labels": jax.ShapeDtypeStruct((batch_size, c.num_classes), jnp.float32)}

  def input_specs(self, batch_size: int) -> list[dict]:
    return [self.input_spec(batch_size)]

  def data_order(self) -> dict:
    return {}

  def train_data(self, start_step: int) -> Iterator[dict]:
    from vit_jax import data
    c = self.config
    return data.train_batches(dataset=c.dataset, split=c.train_split, pp=c.pp_train,
                              batch_size=c.batch_size, seed=c.seed, start_step=start_step,
                              data_dir=c.data_dir, shuffle_buffer=c.shuffle_buffer,
                              num_shards=c.num_data_shards or None)

  def eval_data(self, split: str | None = None) -> Iterator[dict]:
    from vit_jax import data
    c = self.config
    return data.eval_batches(dataset=c.dataset, split=split or c.eval_split, pp=c.pp_eval,
                             batch_size=c.eval_batch_size, data_dir=c.data_dir,
                             num_shards=c.num_data_shards or None)


register("classification", Classification)
