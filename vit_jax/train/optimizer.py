"""optax optimizers and learning-rate schedules built from the config."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
OPTIMIZERS = ("adamw", "sgd", "adafactor")


def make_schedule(lr: float, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
                  end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr``, then ``name`` decay (rsqrt decays from the warm-up end)."""
  if name not in SCHEDULES:
    raise ValueError(f"schedule {name!r} is not one of {SCHEDULES}")
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if name == "cosine":
      decay = end_lr / lr + (1 - end_lr / lr) * 0.5 * (1 + jnp.cos(jnp.pi * t))
    elif name == "linear":
      decay = 1.0 - t * (1.0 - end_lr / lr)
    elif name == "rsqrt":
      decay = jax.lax.rsqrt(jnp.maximum(step, warmup_steps) + 1) * jnp.sqrt(warmup_steps + 1.0)
    else:
      decay = 1.0
    return lr * warm * decay

  return schedule


def decay_mask(params: Any) -> Any:
  """True for weight matrices (``kernel``); biases, norms, position embeddings, cls and probe
  tokens are not decayed."""
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``cfg`` is the config's ``optimizer`` block: name plus that optimizer's options.

  Gradient clipping (``grad_clip_norm``) comes first; weight decay is decoupled and masked.
  """
  name = cfg.name
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
  chain = []
  if cfg.get("grad_clip_norm", 0.0):
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  wd = cfg.get("weight_decay", 0.0)
  mu_dtype = jnp.dtype(cfg.mu_dtype) if cfg.get("mu_dtype") else None  # "" or None: as params
  if name == "adamw":
    chain.append(optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                     eps=cfg.get("eps", 1e-8), mu_dtype=mu_dtype))
  elif name == "sgd":
    if cfg.get("momentum", 0.0):
      chain.append(optax.trace(decay=cfg.momentum, nesterov=cfg.get("nesterov", False),
                               accumulator_dtype=mu_dtype))
  else:
    chain.append(optax.scale_by_factored_rms(decay_rate=cfg.get("decay_rate", 0.8)))
    chain.append(optax.clip_by_block_rms(cfg.get("update_clip", 1.0)))
    if cfg.get("momentum", 0.0):
      chain.append(optax.trace(decay=cfg.momentum, accumulator_dtype=mu_dtype))
  if wd:
    chain.append(optax.add_decayed_weights(wd, mask=decay_mask))
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain)
