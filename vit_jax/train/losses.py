"""Classification losses and mixup."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
