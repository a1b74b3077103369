"""The train step, optimizer, losses, checkpoints and the loop (in-process, tiny models)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train_configs import tiny_config
from vit_jax.tasks import classification as losses
from vit_jax.train import checkpointing, optimizer, trainer


def fixed_batch(setup, n=32, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
  return setup.global_batch({"image": images, "labels": labels})


def test_one_step_lowers_the_loss_on_a_fixed_batch():
  setup = trainer.make_setup(tiny_config(label_smoothing=0.0))
  state = setup.init_state()
  step = setup.jit_train_step()
  batch = fixed_batch(setup)
  losses_seen = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses_seen.append(float(metrics["loss"]))
  assert losses_seen[2] < losses_seen[1] < losses_seen[0]
  assert int(state.step) == 3


def test_state_is_a_plain_pytree_of_arrays():
  setup = trainer.make_setup(tiny_config())
  state = setup.init_state()
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert isinstance(state.params["Transformer"]["blocks"][0]["LayerNorm_0"]["scale"], jax.Array)


@pytest.mark.parametrize("name", ["cosine", "linear", "rsqrt", "constant"])
def test_schedules_warm_up_then_decay(name):
  s = optimizer.make_schedule(1.0, 100, name, warmup_steps=10)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(9)) == pytest.approx(1.0)
  if name == "constant":
    assert float(s(99)) == pytest.approx(1.0)
  else:
    assert float(s(99)) < float(s(50)) < 1.0


def test_step_schedule_multiplies_at_each_boundary():
  s = optimizer.make_schedule(1.0, 100, "step", warmup_steps=0, boundaries=(40, 80), factor=0.1)
  assert [float(s(i)) for i in (0, 39, 40, 79, 80)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_unknown_schedule_and_optimizer():
  with pytest.raises(ValueError, match="not one of"):
    optimizer.make_schedule(1.0, 10, "exponential")
  with pytest.raises(ValueError, match="needs schedule.boundaries"):
    optimizer.make_schedule(1.0, 10, "step")
  cfg = tiny_config()
  cfg.optimizer.name = "lamb"
  with pytest.raises(ValueError, match=r"optimizer 'lamb' is not one of \('adamw', 'sgd', 'adafactor'\)"):
    trainer.make_setup(cfg)
  cfg = tiny_config()
  cfg.optimizer.adamw.beta1 = 0.9
  with pytest.raises(ValueError, match="optimizer.adamw has no option 'beta1'; optax.scale_by_adam "
                                       "takes: b1, b2, eps, eps_root, mu_dtype, nesterov"):
    trainer.make_setup(cfg)


def test_weight_decay_only_on_kernels():
  params = {"embedding": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "cls": jnp.ones((1, 1, 2)),
            "Transformer": {"posembed_input": {"pos_embedding": jnp.ones((1, 3, 2))},
                            "encoder_norm": {"scale": jnp.ones(2)}}}
  mask = optimizer.decay_mask(params)
  assert mask["embedding"]["kernel"] and not mask["embedding"]["bias"] and not mask["cls"]
  assert not mask["Transformer"]["posembed_input"]["pos_embedding"]
  assert not mask["Transformer"]["encoder_norm"]["scale"]
  # The optimizer decays exactly those leaves: with zero gradients, sgd and lr 1, the update of
  # each leaf is -weight_decay * value on kernels and 0 elsewhere.
  tx = optimizer.make_optimizer(dict(name="sgd", weight_decay=0.5, sgd=dict(momentum=0.0)),
                                lambda step: 1.0)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    want = -0.5 if optimizer.param_path(path) == "embedding/kernel" else 0.0
    np.testing.assert_array_equal(u, want, err_msg=optimizer.param_path(path))


@pytest.mark.parametrize("name,options", [("adamw", {}), ("sgd", {"momentum": 0.9}),
                                          ("adafactor", {"momentum": 0.9})])
def test_optimizers_train(name, options):
  cfg = tiny_config(lr=3e-3)
  cfg.optimizer.update(name=name, weight_decay=1e-4, grad_clip_norm=1.0)
  cfg.optimizer[name].update(options)  # optax's own option names
  setup = trainer.make_setup(cfg)
  state, step, batch = setup.init_state(), setup.jit_train_step(), fixed_batch(setup)
  state, metrics = step(state, batch)
  first = float(metrics["loss"])
  for _ in range(5):
    state, metrics = step(state, batch)
  assert float(metrics["loss"]) < first


def test_global_norm_clipping():
  cfg = tiny_config()
  cfg.optimizer.grad_clip_norm = 1e-3
  setup = trainer.make_setup(cfg)
  grads = {"a": jnp.full((4,), 10.0)}
  clipped, _ = optax.clip_by_global_norm(1e-3).update(grads, None)
  assert float(optax.global_norm(clipped)) == pytest.approx(1e-3, rel=1e-4)
  assert setup.tx is not None


def test_label_smoothing_and_losses():
  labels = jnp.eye(4)[jnp.array([0, 1])]
  smooth = losses.smooth_labels(labels, 0.1)
  np.testing.assert_allclose(smooth[0], [0.925, 0.025, 0.025, 0.025])
  logits = jnp.array([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(losses.softmax_xent(logits, labels)[1], np.log(4), rtol=1e-6)
  np.testing.assert_allclose(losses.sigmoid_xent(jnp.zeros((1, 4)), labels[:1]), [4 * np.log(2)],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="not one of"):
    losses.loss_fn("hinge")


def test_mixup_mixes_images_and_labels_alike():
  images = jnp.stack([jnp.zeros((2, 2, 1)), jnp.ones((2, 2, 1))])
  labels = jnp.eye(2)
  mixed_images, mixed_labels = losses.mixup(jax.random.key(0), images, labels, 0.4)
  lam = float(mixed_labels[0, 0])
  assert 0.5 <= lam <= 1.0
  np.testing.assert_allclose(mixed_images[0], 1 - lam, rtol=1e-6)
  np.testing.assert_allclose(mixed_labels.sum(-1), 1.0, rtol=1e-6)


def test_gradient_accumulation_matches_full_batch():
  results = []
  for k in (1, 4):
    setup = trainer.make_setup(tiny_config(grad_accum_steps=k, label_smoothing=0.0))
    state, step = setup.init_state(), setup.jit_train_step()
    state, metrics = step(state, fixed_batch(setup))
    results.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_and_evaluate_writes_metrics_and_checkpoints(tmp_path):
  final = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  assert final["examples"] == 300 and 0.0 <= final["top1"] <= 1.0
  assert json.loads((tmp_path / "final_metrics.json").read_text())["top1"] == final["top1"]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"train/loss", "train/lr", "train/grad_norm"} <= set(lines[0])
  assert any("eval/top5" in l for l in lines)
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]


def test_non_finite_loss_stops_without_a_checkpoint(tmp_path):
  cfg = tiny_config(lr=1e30, log_every=1, label_smoothing=0.0)
  cfg.optimizer.grad_clip_norm = 0.0
  with pytest.raises(trainer.NonFiniteLossError, match=r"loss became (nan|inf).*no checkpoint|without writing a checkpoint"):
    trainer.train_and_evaluate(cfg, str(tmp_path), jax.devices()[:1])
  assert not os.path.exists(tmp_path / "checkpoints") or not [
      d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


def test_checkpoint_of_another_model_is_refused(tmp_path):
  trainer.train_and_evaluate(tiny_config(total_steps=5), str(tmp_path), jax.devices()[:1])
  other = tiny_config(total_steps=10)
  other.model.hidden_size = 64
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"another model.*hidden_size"):
    trainer.train_and_evaluate(other, str(tmp_path), jax.devices()[:1])


@pytest.mark.parametrize("change,named", [
    (dict(batch_size=16), "batch_size: the checkpoint's run had 32, the config has 16"),
    (dict(seed=7), "seed: the checkpoint's run had 0, the config has 7"),
    (dict(num_data_shards=4), "num_data_shards: the checkpoint's run had None, the config has 4"),
])
def test_resuming_with_another_data_order_is_refused(tmp_path_factory, change, named):
  workdir = tmp_path_factory.mktemp("order")
  trainer.train_and_evaluate(tiny_config(total_steps=5), str(workdir), jax.devices()[:1])
  with pytest.raises(ValueError, match=r"would change the order of the training data \(" + re.escape(named)):
    trainer.train_and_evaluate(tiny_config(total_steps=10, **change), str(workdir), jax.devices()[:1])


def test_nested_round_trip():
  tree = {"a": [jnp.ones(2), (jnp.zeros(1), {"b": jnp.ones(3)})]}
  nested = checkpointing.to_nested(tree)
  assert set(nested["a"]) == {"0", "1"}
  back = checkpointing.from_nested(nested, tree)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
