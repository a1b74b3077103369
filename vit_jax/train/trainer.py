"""The training loop: one jitted, mesh-sharded step from one CPU to a pod.

``Setup`` builds everything that does not depend on data (mesh, abstract state, shardings,
jitted steps, checkpointer); ``train_and_evaluate`` runs the loop; ``evaluate`` runs one pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax.train import checkpointing, optimizer, sharding
from vit_jax.train.metrics_writer import MetricsWriter
from vit_jax.train.preemption import PreemptionGuard
from vit_jax.train.state import TrainState
from vit_jax.train.step import all_finite, make_eval_step, make_train_step
from vit_jax.train.task import Task, get_task


class NonFiniteLossError(RuntimeError):
  """The loss or the state became NaN or infinite."""


class MeshJit:
  """A jitted function traced, lowered and called with its mesh in context, so that the
  models' activation constraints (``layer_stack.constrain_batch``) see the mesh axes."""

  def __init__(self, mesh: jax.sharding.Mesh, jitted):
    self.mesh, self.jitted = mesh, jitted

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


@dataclasses.dataclass
class Setup:
  config: Any
  task: Task
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState
  shardings: TrainState
  batch_sharding: NamedSharding
  replicated: NamedSharding

  def init_state(self) -> TrainState:
    """Creates parameters and optimizer state already sharded (never whole on one device).

    With ``config.pretrained`` set, the parameters come from that checkpoint instead
    (``vit_jax.checkpoints.load_pretrained`` with ``config.pretrained_options``).
    """
    if self.config.get("pretrained"):
      return self._init_pretrained()
    return jax.jit(self._init, out_shardings=self.shardings)()

  def _init_pretrained(self) -> TrainState:
    from vit_jax import checkpoints
    model = self.task.build_model(nnx.Rngs(self.config.seed))
    checkpoints.load_pretrained(model, self.config.pretrained,
                                **dict(self.config.get("pretrained_options") or {}))
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), self.shardings.params)
    opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
    return TrainState(step=step, params=params, opt_state=opt_state)

  def _init(self) -> TrainState:
    model = self.task.build_model(nnx.Rngs(self.config.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

  def sharded_abstract_state(self) -> TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.shardings)

  def jit_train_step(self):
    step = make_train_step(self.graphdef, self.task, self.tx, self.schedule, seed=self.config.seed,
                           accum_steps=self.config.get("grad_accum_steps", 1))
    return MeshJit(self.mesh, jax.jit(step, in_shardings=(self.shardings, self.batch_sharding),
                                      out_shardings=(self.shardings, self.replicated), donate_argnums=0))

  def jit_eval_step(self):
    return MeshJit(self.mesh, jax.jit(make_eval_step(self.graphdef, self.task),
                                      in_shardings=(self.shardings.params, self.batch_sharding),
                                      out_shardings=self.replicated))

  def global_batch(self, local: dict) -> dict:
    """Host-local numpy batch -> global jax.Arrays split over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()}


def make_setup(config: Any, devices: list[jax.Device] | None = None) -> Setup:
  """Everything but the data: mesh (over ``devices``, default all), shardings, optimizer, steps."""
  task = get_task(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  rules = sharding.rules_dict(config.sharding_rules)
  abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract_model, nnx.Param)
  axes = sharding.logical_axes(abstract_model)
  schedule = optimizer.make_schedule(config.lr, config.total_steps, **config.schedule)
  tx = optimizer.make_optimizer(config.optimizer, schedule)
  replicated = NamedSharding(mesh, P())
  setup = Setup(config, task, mesh, graphdef, tx, schedule, None, None,
                sharding.batch_sharding(mesh), replicated)
  abstract_state = jax.eval_shape(setup._init)
  param_sh = sharding.param_shardings(abstract_state.params, axes, rules, mesh)
  # Optimizer leaves that mirror a parameter keep its sharding; factored statistics (adafactor's
  # row and column second moments) have other shapes and stay replicated.
  opt_sh = optax.tree_map_params(
      tx, lambda leaf, s, p: s if leaf.shape == p.shape else replicated,
      abstract_state.opt_state, param_sh, abstract_state.params,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  setup.abstract_state = abstract_state
  setup.shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh)
  return setup


def _meta(setup: Setup, step: int) -> dict:
  return {"signature": setup.task.signature(), "step": step, "dataset": setup.config.dataset,
          "examples_seen": step * setup.config.batch_size}


def restore_or_init(setup: Setup, ckpt: checkpointing.Checkpointer) -> TrainState:
  if ckpt.latest_step() is None:
    return setup.init_state()
  state, _ = ckpt.restore(setup.sharded_abstract_state(), setup.task.signature())
  return state


def evaluate(setup: Setup, params: Any, eval_step=None, split: str | None = None) -> dict:
  """One pass over the eval split (every example exactly once, padding masked out)."""
  eval_step = eval_step or setup.jit_eval_step()
  sums = None
  for local in setup.task.eval_data(split):
    out = eval_step(params, setup.global_batch(local))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError(f"the eval split {split or setup.config.eval_split!r} is empty")
  return setup.task.summarize(jax.device_get(sums))


def _check_finite(loss: float, step: int, last_ckpt: int | None) -> None:
  if not np.isfinite(loss):
    where = f"step {last_ckpt}" if last_ckpt is not None else "none yet"
    raise NonFiniteLossError(
        f"the loss became {loss} at step {step}; stopped without writing a checkpoint from this "
        f"state (last good checkpoint: {where}). Lower the learning rate, raise the warm-up or "
        f"set optimizer.grad_clip_norm.")


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its last checkpoint. Returns the final eval."""
  setup = make_setup(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  writer = MetricsWriter(workdir, total_steps=config.total_steps, batch_size=config.batch_size)
  state = restore_or_init(setup, ckpt)
  start = int(jax.device_get(state.step))
  train_step, eval_step = setup.jit_train_step(), setup.jit_eval_step()
  check_state = jax.jit(all_finite)
  last_ckpt = ckpt.latest_step()
  if start:
    writer.log(f"resumed from step {start} in {workdir}")
  batches: Iterator[dict] = setup.task.train_data(start)
  writer.start_clock(start)
  guard = PreemptionGuard()
  final = {}
  try:
    for step in range(start + 1, config.total_steps + 1):
      state, metrics = train_step(state, setup.global_batch(next(batches)))
      last = step == config.total_steps
      if step % config.log_every == 0 or last:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(m["loss"], step, last_ckpt)
        m.update(writer.progress(step, m["loss"]))
        writer.write(step, {f"train/{k}": v for k, v in m.items()})
      if step % config.eval_every == 0 or last:
        final = evaluate(setup, state.params, eval_step)
        writer.write(step, {f"eval/{k}": v for k, v in final.items()})
        writer.log(f"step {step}: eval top-1 {final['top1']:.4f} top-5 {final['top5']:.4f} "
                   f"loss {final['loss']:.4f}")
      preempted = guard.should_stop(at_sync_point=step % config.log_every == 0) and not last
      if step % config.checkpoint_every == 0 or last or preempted:
        _check_finite(float(jax.device_get(metrics["loss"])), step, last_ckpt)
        if not bool(check_state(state)):
          _check_finite(float("nan"), step, last_ckpt)
        ckpt.save(step, state, _meta(setup, step))
        last_ckpt = step
      if preempted:
        writer.log(f"SIGTERM: saved a checkpoint at step {step} in {workdir}; re-run the same "
                   "command to resume")
        return {"step": step, "preempted": True}
    if not final:  # resumed at the end: evaluate what is there
      final = evaluate(setup, state.params, eval_step)
  finally:
    guard.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  final = {"step": config.total_steps, **final}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  return final
