"""Gradient accumulation divides once: a loss normalised by a per-batch count accumulates to
exactly the full batch's loss and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.train_configs import tiny_config
from vit_jax.tasks.classification import Classification, softmax_xent
from vit_jax.train import trainer
from vit_jax.train.step import make_loss_and_grads, mean_terms


class ValidItemsTask(Classification):
  """Cross-entropy summed over the examples whose class is below 5 (a variable number per
  microbatch), divided by their count; plus a second term with another normaliser."""

  def __init__(self, config, objective):
    super().__init__(config)
    self.objective = objective

  def loss(self, model, batch, rng, train):
    logits = model(batch["image"], train=train)
    valid = (jnp.argmax(batch["labels"], -1) < 5).astype(jnp.float32)
    per_example = softmax_xent(logits, batch["labels"])
    return {"valid_xent": (jnp.sum(per_example * valid), jnp.sum(valid)),
            "logit_norm": (jnp.sum(jnp.square(logits)), jnp.asarray(batch["labels"].shape[0] * 3.0))}


def _batch(n=32):
  rng = np.random.default_rng(0)
  # Classes drawn so that the 4 strided microbatches hold 0 to 8 valid examples each.
  labels = rng.choice([0, 1, 7, 8, 9], size=n, p=[0.15, 0.15, 0.3, 0.2, 0.2])
  labels[0::4] = 9  # one microbatch without a single valid example
  return {"image": jnp.asarray(rng.uniform(-1, 1, (n, 8, 8, 1)), jnp.float32),
          "labels": jnp.asarray(np.eye(10, dtype=np.float32)[labels])}


def test_variable_count_loss_accumulates_exactly():
  # One device: what is checked is the arithmetic of accumulation (test_sharding compares meshes).
  setup = trainer.make_setup(tiny_config(label_smoothing=0.0), jax.devices()[:1])
  state = setup.init_state()
  # A random head, so that every parameter gets a gradient.
  params = dict(state.params, head=dict(state.params["head"], kernel=jax.random.normal(
      jax.random.key(1), state.params["head"]["kernel"].shape) * 0.3))
  batch = _batch()
  counts = [int(np.sum(np.argmax(batch["labels"][i::4], -1) < 5)) for i in range(4)]
  assert min(counts) == 0 and len(set(counts)) > 1, counts
  for objective in ({"valid_xent": 1.0}, {"valid_xent": 1.0, "logit_norm": 0.5}):
    task = ValidItemsTask(setup.config, objective)
    results = {}
    for k in (1, 4):
      fn = jax.jit(make_loss_and_grads(setup.graphdef, task, accum_steps=k))
      totals, grads, _ = fn(params, state.model_state, batch, jax.random.key(0))
      means = mean_terms(totals)
      results[k] = (sum(c * means[n] for n, c in objective.items()), grads)
    # The hand-computed full-batch objective and its gradient.
    graphdef = setup.graphdef

    def full(p):
      terms = task.loss(nnx.merge(graphdef, p, state.model_state), batch, None, True)
      return sum(c * terms[n][0] / terms[n][1] for n, c in objective.items())
    want_loss, want_grads = jax.jit(jax.value_and_grad(full))(params)
    # Within 1e-6 relative to the gradient's largest entry (float32 rounding of other sums).
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want_grads))
    for k in (1, 4):
      loss, grads = results[k]
      np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=f"accum {k}")
      for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * scale, err_msg=f"accum {k}, {objective}")
