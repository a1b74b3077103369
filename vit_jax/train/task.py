"""Tasks supply what the trainer must not know: model, loss, metrics, batch format and data.

The trainer (step, sharding, checkpoints, logging) is the same for every task; a task is
chosen by ``config.task``.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax import models
from vit_jax.train import losses


class Task(Protocol):
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module: ...
  def signature(self) -> dict: ...
  def loss(self, model: nnx.Module, batch: dict, rng: jax.Array, train: bool) -> tuple[jax.Array, dict]: ...
  def eval_sums(self, model: nnx.Module, batch: dict) -> dict: ...
  def summarize(self, sums: dict) -> dict: ...
  def input_spec(self, batch_size: int) -> dict: ...
  def train_data(self, start_step: int) -> Iterator[dict]: ...
  def eval_data(self, split: str | None = None) -> Iterator[dict]: ...


def model_kwargs(config: Any) -> dict:
  """The model's ``create`` options from the config's ``model`` block (minus ``name``)."""
  return {k: v for k, v in config.model.items() if k != "name"}


class Classification:
  """Image classification with one-hot (or soft) labels: batches {"image", "labels"[, "mask"]}."""

  def __init__(self, config: Any):
    self.config = config
    self.loss_name = config.loss
    self.per_example_loss = losses.loss_fn(config.loss)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    c = self.config
    return models.create(c.model.name, num_classes=c.num_classes, image_size=c.image_size,
                         rngs=rngs, **model_kwargs(c))

  def signature(self) -> dict:
    """What a checkpoint must match to be resumed by this config."""
    c = self.config
    return {"task": "classification", "model": c.model.name, "num_classes": c.num_classes,
            "image_size": c.image_size, "options": {k: v for k, v in sorted(model_kwargs(c).items())}}

  def loss(self, model, batch, rng, train):
    c = self.config
    images, labels = batch["image"], batch["labels"]
    mix_key, drop_key = jax.random.split(rng)
    if train and c.mixup_alpha:
      images, labels = losses.mixup(mix_key, images, labels, c.mixup_alpha)
    if train:
      labels = losses.smooth_labels(labels, c.label_smoothing)
    logits = model(images, train=train, rngs=nnx.Rngs(dropout=drop_key))
    loss = jnp.mean(self.per_example_loss(logits, labels))
    return loss, {"loss": loss}

  def eval_sums(self, model, batch):
    logits = model(batch["image"], train=False)
    labels = batch["labels"]
    mask = batch.get("mask", jnp.ones(labels.shape[:1], jnp.float32))
    label = jnp.argmax(labels, axis=-1)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == label).astype(jnp.float32)
    top5 = jnp.any(topk == label[:, None], axis=-1).astype(jnp.float32)
    loss = self.per_example_loss(logits, labels)
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}

  def summarize(self, sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"top1": float(sums["top1"]) / n, "top5": float(sums["top5"]) / n,
            "loss": float(sums["loss"]) / n, "examples": int(sums["count"])}

  def input_spec(self, batch_size: int) -> dict:
    c = self.config
    channels = c.model.get("channels", 3)
    return {"image": jax.ShapeDtypeStruct((batch_size, c.image_size, c.image_size, channels), jnp.float32),
            "labels": jax.ShapeDtypeStruct((batch_size, c.num_classes), jnp.float32)}

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


TASKS = {"classification": Classification}


def get_task(config: Any) -> Task:
  if config.task not in TASKS:
    raise ValueError(f"task {config.task!r} is not one of {sorted(TASKS)}")
  return TASKS[config.task](config)
