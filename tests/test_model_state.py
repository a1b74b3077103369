"""A family added in one module with one registration trains with the unchanged trainer, and
its non-parameter variables (running statistics) live in the train state: updated by the step,
sharded by their logical axes, checkpointed and restored onto another mesh."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import base, default
from vit_jax.models import patches, registry
from vit_jax.models.layers import DTYPES, Dense
from vit_jax.train import checkpointing, trainer


@dataclasses.dataclass(frozen=True)
class StatsConfig(patches.PatchConfig):
  num_classes: int
  image_size: int = 8
  patch_size: int = 2
  channels: int = 1
  dtype: str = "float32"


class RunningStats(nnx.Variable):
  """Not a parameter: no gradient, no optimizer state."""


class StatsToy(nnx.Module):
  """Patch means, normalised by running statistics kept in training (like batch norm), then a
  Dense to the classes."""

  def __init__(self, cfg: StatsConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    width = cfg.grid ** 2 * cfg.channels
    self.mean = RunningStats(jnp.zeros((width,)), out_sharding=("stats_features",))
    self.head = Dense(width, cfg.num_classes, axes=("stats_features", "classes"), rngs=rngs,
                      dtype=DTYPES[cfg.dtype])

  def __call__(self, images, *, train: bool = False, rngs=None):
    x = jnp.mean(patches.patchify(images, self.config.patch_size), axis=(3, 4))
    x = x.reshape(x.shape[0], -1)
    if train:
      self.mean[...] = 0.9 * self.mean[...] + 0.1 * jnp.mean(x, axis=0)
    return self.head(x - self.mean[...]).astype(jnp.float32)


OPTIONS = registry.config_options(StatsConfig)


def build(match: re.Match, *, num_classes, image_size, rngs, overrides):
  registry.check_options("StatsToy", overrides, OPTIONS)
  return StatsToy(StatsConfig(num_classes=num_classes, image_size=image_size, **overrides), rngs=rngs)


@pytest.fixture(scope="module")
def stats_family():
  family = registry.register_family(
      "StatsToy", pattern=r"StatsToy-S", build=build, examples=("StatsToy-S",),
      help="StatsToy-S: running patch means and a linear head", sizes={"S": {}},
      flops=lambda m: 2 * m.config.grid ** 2 * m.config.channels * m.config.num_classes,
      sharding_rules=(("stats_features", "fsdp"),), options=OPTIONS)
  yield family
  registry.unregister("StatsToy")


def config(mesh: str):
  c = default.get_config()
  c.model = base.model_block(name="StatsToy-S", channels=1)
  c.update(batch_size=32, eval_batch_size=80, total_steps=4, lr=1e-2, mesh=mesh,
           label_smoothing=0.0, log_every=2, eval_every=4, checkpoint_every=4)
  c.schedule.warmup_steps = 0
  return c


def test_a_new_family_trains_with_its_running_statistics_in_the_state(stats_family, tmp_path):
  setup = trainer.make_setup(config("fsdp=8"))
  state = setup.init_state()
  assert set(state.model_state) == {"mean"} and "mean" not in state.params
  assert setup.shardings.model_state["mean"].spec == P("fsdp")
  assert setup.shardings.params["head"]["kernel"].spec == P("fsdp", None)
  rng = np.random.default_rng(0)
  batch = setup.global_batch({"image": rng.uniform(0, 1, (32, 8, 8, 1)).astype(np.float32),
                              "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]})
  step = setup.jit_train_step()
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  mean = np.asarray(jax.device_get(state.model_state["mean"]))
  np.testing.assert_allclose(mean, (1 - 0.9 ** 3) * 0.5, atol=0.05)  # moved towards the data mean
  assert state.model_state["mean"].sharding.spec == P("fsdp")
  # No optimizer state for it: Adam's moments mirror the parameters only.
  assert all("mean" not in jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0])

  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=1, async_save=False)
  ckpt.save(3, state, {"signature": setup.task.signature(), "step": 3})
  one = trainer.make_setup(config("data_parallel"), jax.devices()[:1])
  restored, _ = ckpt.restore(one.sharded_abstract_state(), one.task.signature())
  ckpt.close()
  np.testing.assert_array_equal(jax.device_get(restored.model_state["mean"]), mean)
  # Evaluation reads the statistics (the head sees x - mean).
  result = trainer.evaluate(one, restored)
  assert result["examples"] == 300 and 0.0 <= result["top1"] <= 1.0


def test_the_whole_loop_trains_the_new_family(stats_family, tmp_path):
  final = trainer.train_and_evaluate(config("data_parallel"), str(tmp_path))
  assert final["step"] == 4 and final["examples"] == 300
