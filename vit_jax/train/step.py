"""The pure train and eval steps, jitted by the trainer over a plain pytree state.

The task's loss terms are ``(sum, weight)`` pairs; the objective is
``sum_i coef_i * sum_i / weight_i`` with every sum and weight taken over the whole global batch.
The weights are counts that carry no gradient, so under gradient accumulation the step adds the
gradients of each term's sum over the microbatches and divides by the term's total weight once:
the update is the full batch's, whatever the normaliser.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vit_jax.train.state import TrainState

NOT_PARAM = nnx.Not(nnx.Param)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, params, model_state) with the two states as plain nested dicts."""
  graphdef, params, rest = nnx.split(model, nnx.Param, NOT_PARAM)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _safe_div(s: jax.Array, w: jax.Array) -> jax.Array:
  return s / jnp.where(w == 0, jnp.ones_like(w), w)


def mean_terms(totals: dict) -> dict:
  """``{name: (sum, weight)}`` -> ``{name: sum / weight}`` (0 where the weight is 0)."""
  return {k: _safe_div(s, w) for k, (s, w) in totals.items()}


def make_loss_and_grads(graphdef: nnx.GraphDef, task: Any, *, accum_steps: int = 1) -> Callable:
  """``(params, model_state, batch, rng) -> (totals, grads, model_state)``.

  ``totals`` maps each loss term to its (sum, weight) over the batch; ``grads`` is the gradient
  of the objective. With ``accum_steps > 1`` the batch is split into strided microbatches
  (examples i, i+k, i+2k, ...: each stays spread over every device) processed in turn.
  """
  objective = dict(task.objective)
  names = list(objective)

  def sums_of(params, model_state, batch, rng):
    model = nnx.merge(graphdef, params, model_state)
    terms = task.loss(model, batch, rng, True)
    missing = [k for k in names if k not in terms]
    if missing:
      raise ValueError(f"the task's loss returned no {missing}; it returned {sorted(terms)}")
    terms = {k: (s, jax.lax.stop_gradient(w)) for k, (s, w) in terms.items()}
    return {k: terms[k][0] for k in names}, (terms, nnx.to_pure_dict(nnx.state(model, NOT_PARAM)))

  def coefficients(totals):
    return {k: objective[k] / jnp.where(totals[k][1] == 0, 1.0, totals[k][1]) for k in names}

  def whole_batch(params, model_state, batch, rng):
    sums, vjp, (terms, model_state) = jax.vjp(
        lambda p: sums_of(p, model_state, batch, rng), params, has_aux=True)
    cot = {k: c.astype(sums[k].dtype) for k, c in coefficients(terms).items()}
    return terms, vjp(cot)[0], model_state

  def accumulated(params, model_state, batch, rng):
    micro = jax.tree.map(
        lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)

    def per_term_grads(model_state, mb, key):
      sums, vjp, (terms, model_state) = jax.vjp(
          lambda p: sums_of(p, model_state, mb, key), params, has_aux=True)
      grads = {k: vjp({j: jnp.asarray(j == k, sums[j].dtype) for j in names})[0] for k in names}
      return terms, grads, model_state

    def body(carry, xs):
      totals, grads, model_state = carry
      i, mb = xs
      terms, g, model_state = per_term_grads(model_state, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, totals, terms), jax.tree.map(jnp.add, grads, g), model_state), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(per_term_grads, model_state, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:2])
    (totals, grads, model_state), _ = jax.lax.scan(
        body, (*zeros, model_state), (jnp.arange(accum_steps), micro))
    coef = coefficients(totals)
    grads = jax.tree.map(lambda *gs: sum(c * g for c, g in zip(coef.values(), gs)),
                         *[grads[k] for k in names])
    return totals, grads, model_state

  return whole_batch if accum_steps == 1 else accumulated


def make_train_step(graphdef: nnx.GraphDef, task: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, seed: int, accum_steps: int = 1) -> Callable:
  """``(state, batch) -> (state, metrics)``.

  Randomness (dropout, stochastic depth, mixup) is a function of (seed, step) only, so a
  resumed run repeats an uninterrupted one. ``metrics``: ``loss`` (the objective), the mean of
  every loss term, ``grad_norm`` and ``lr``.
  """
  loss_and_grads = make_loss_and_grads(graphdef, task, accum_steps=accum_steps)
  objective = dict(task.objective)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    totals, grads, model_state = loss_and_grads(state.params, state.model_state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = mean_terms(totals)
    metrics["loss"] = sum(c * metrics[k] for k, c in objective.items())
    metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           model_state=model_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, task: Any) -> Callable:
  """``(params, model_state, batch) -> outputs``: the task's eval outputs for the batch."""
  def eval_step(params, model_state, batch):
    return task.eval_outputs(nnx.merge(graphdef, params, model_state), batch)
  return eval_step


def all_finite(tree: Any) -> jax.Array:
  """One boolean: every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
