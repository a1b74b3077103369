"""The pure train and eval steps, jitted by the trainer over a plain pytree state."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vit_jax.train.state import TrainState


def make_train_step(graphdef: nnx.GraphDef, task: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, seed: int, accum_steps: int = 1) -> Callable:
  """``(state, batch) -> (state, metrics)``.

  Randomness (dropout, stochastic depth, mixup) is a function of (seed, step) only, so a
  resumed run repeats an uninterrupted one. With ``accum_steps > 1`` the batch is split into
  that many microbatches whose gradients are averaged (same update as the full batch).
  """

  def loss_and_grad(params, batch, rng):
    def loss_of(p):
      return task.loss(nnx.merge(graphdef, p), batch, rng, True)
    return jax.value_and_grad(loss_of, has_aux=True)(params)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if accum_steps == 1:
      (loss, metrics), grads = loss_and_grad(state.params, batch, rng)
    else:
      # Strided microbatches (examples i, i+k, i+2k, ...): each stays spread over every device.
      micro = jax.tree.map(
          lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        i, mb = xs
        (loss, metrics), grads = loss_and_grad(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      zero_metrics = jax.eval_shape(lambda: loss_and_grad(state.params, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
      zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics)
      (grads, metrics), _ = jax.lax.scan(body, (zeros, zero_metrics),
                                         (jnp.arange(accum_steps), micro))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      metrics = jax.tree.map(lambda m: m / accum_steps, metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, task: Any) -> Callable:
  """``(params, batch) -> sums`` of the task's eval metrics over the (masked) batch."""
  def eval_step(params, batch):
    return task.eval_sums(nnx.merge(graphdef, params), batch)
  return eval_step


def all_finite(tree: Any) -> jax.Array:
  """One boolean: every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
