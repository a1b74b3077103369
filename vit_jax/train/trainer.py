"""The training loop: one jitted, mesh-sharded step from one CPU to a pod.

``Setup`` builds everything that does not depend on data (mesh, abstract state, shardings,
jitted steps, checkpointer); ``train_and_evaluate`` runs the loop; ``evaluate`` runs one pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import tasks
from vit_jax.tasks import Task
from vit_jax.train import (checkpointing, config_checks, disk_space, optimizer, sharding, stages,
                           workdir_lock)
from vit_jax.train.metrics_writer import MetricsWriter
from vit_jax.train.preemption import PreemptionGuard
from vit_jax.train.state import TrainState
from vit_jax.train.step import NOT_PARAM, all_finite, make_eval_step, make_train_step, split_model


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
    if self.config.pretrained:
      return self._init_pretrained()
    return jax.jit(self._init, out_shardings=self.shardings)()

  def _init_pretrained(self) -> TrainState:
    from vit_jax import checkpoints
    model = self.task.build_model(nnx.Rngs(self.config.seed))
    options = dict(self.config.pretrained_options)
    # A task may know more ways in (a detector started from a classifier).
    load = getattr(self.task, "load_pretrained", None) or checkpoints.load_pretrained
    load(model, self.config.pretrained, **options)
    _, params, model_state = split_model(model)
    params = jax.device_put(params, self.shardings.params)
    model_state = jax.device_put(model_state, self.shardings.model_state)
    opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
    return TrainState(step=step, params=params, opt_state=opt_state, model_state=model_state)

  def _init(self) -> TrainState:
    _, params, model_state = split_model(self.task.build_model(nnx.Rngs(self.config.seed)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      model_state=model_state)

  def sharded_abstract_state(self) -> TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.shardings)

  def jit_train_step(self):
    step = make_train_step(self.graphdef, self.task, self.tx, self.schedule, seed=self.config.seed,
                           accum_steps=self.config.grad_accum_steps)
    return MeshJit(self.mesh, jax.jit(step, in_shardings=(self.shardings, self.batch_sharding),
                                      out_shardings=(self.shardings, self.replicated), donate_argnums=0))

  def jit_eval_step(self):
    return MeshJit(self.mesh, jax.jit(
        make_eval_step(self.graphdef, self.task),
        in_shardings=(self.shardings.params, self.shardings.model_state, self.batch_sharding),
        out_shardings=self.replicated))

  def global_batch(self, local: dict) -> dict:
    """Host-local numpy batch -> global jax.Arrays split over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()}


def make_setup(config: Any, devices: list[jax.Device] | None = None) -> Setup:
  """Everything but the data: mesh (over ``devices``, default all), shardings, optimizer, steps."""
  config_checks.check_config(config)
  task = tasks.create(config)
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ValueError(f"grad_accum_steps {config.grad_accum_steps} must be >= 1 and divide "
                     f"batch_size {config.batch_size}")
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  rules = sharding.rules_dict(config.sharding_rules)
  abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  graphdef, _, _ = split_model(abstract_model)
  axes = sharding.logical_axes(abstract_model)
  state_axes = sharding.logical_axes(abstract_model, NOT_PARAM)
  schedule = optimizer.make_schedule(config.lr, config.total_steps, **config.schedule)
  tx = optimizer.make_optimizer(config.optimizer, schedule)
  replicated = NamedSharding(mesh, P())
  setup = Setup(config, task, mesh, graphdef, tx, schedule, None, None,
                sharding.batch_sharding(mesh), replicated)
  abstract_state = jax.eval_shape(setup._init)
  param_sh = sharding.param_shardings(abstract_state.params, axes, rules, mesh)
  # Optimizer leaves that mirror a parameter (their path ends with its path, same shape: Adam's
  # moments, momentum) keep its sharding; the rest (step counts, adafactor's factored row and
  # column statistics) stay replicated. Frozen parameters have no optimizer leaves at all (an
  # optax.MaskedNode, kept as is), so this reads the state's paths rather than re-running
  # ``tx.init`` on placeholders as ``optax.tree_map_params`` would.
  key = lambda path: jax.tree_util.keystr(tuple(path))
  param_shapes = {key(p): leaf.shape
                  for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
  param_shardings = {key(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

  def opt_leaf_sharding(path, leaf):
    for i in range(len(path)):  # the longest suffix of the path that names a parameter
      if param_shapes.get(key(path[i:])) == leaf.shape:
        return param_shardings[key(path[i:])]
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf_sharding, abstract_state.opt_state)
  setup.abstract_state = abstract_state
  state_sh = sharding.param_shardings(abstract_state.model_state, state_axes, rules, mesh)
  setup.shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                               model_state=state_sh)
  return setup


def _meta(setup: Setup, step: int) -> dict:
  c = setup.config
  return {"signature": setup.task.signature(), "step": step, "dataset": c.dataset,
          "examples_seen": step * c.batch_size, "data_order": data_order(c, setup.task)}


def data_order(config: Any, task: Task) -> dict:
  """What fixes the order of the training examples from a step on (a resume with other values
  would silently change it): the config's data keys and the task's own (``Task.data_order``)."""
  return {"dataset": config.dataset, "train_split": config.train_split,
          "batch_size": config.batch_size, "seed": config.seed,
          "num_data_shards": config.num_data_shards or None, **task.data_order()}


def check_data_order(meta: dict, setup: Setup, where: str) -> None:
  """Raises a ValueError naming what differs when resuming ``setup`` would not continue the
  checkpoint's data order (older checkpoints: dataset and batch size from their meta; a task's key
  they lack counts as empty, the task's value without the feature)."""
  saved = meta.get("data_order")
  if saved is None:  # written before data_order was recorded
    step = meta.get("step") or 0
    saved = {"dataset": meta["dataset"]} if meta.get("dataset") else {}
    if step and meta.get("examples_seen") is not None:
      saved["batch_size"] = meta["examples_seen"] // step
  wanted = data_order(setup.config, setup.task)
  saved = {**{k: type(v)() for k, v in setup.task.data_order().items()}, **saved}
  diffs = [f"{k}: the checkpoint's run had {saved[k]!r}, the config has {wanted[k]!r}"
           for k in saved if k in wanted and saved[k] != wanted[k]]
  if diffs:
    raise ValueError(
        f"resuming {where} with this config would change the order of the training data ("
        + "; ".join(diffs) + "). Resume with the run's own values, or start a new run in a fresh "
        "--workdir (config.pretrained can start it from this one's checkpoint).")


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir`` holds a checkpoint of a run (it has started)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def restore_or_init(setup: Setup, ckpt: checkpointing.Checkpointer) -> TrainState:
  if ckpt.latest_step() is None:
    return setup.init_state()
  state, meta = ckpt.restore(setup.sharded_abstract_state(), setup.task.signature())
  check_data_order(meta, setup, f"{ckpt.directory} at step {meta.get('step')}")
  return state


def evaluate(setup: Setup, state: TrainState, eval_step=None, split: str | None = None,
             evaluator: tasks.Evaluator | None = None) -> dict:
  """One pass over the eval split (every example exactly once, padding masked out): each
  batch's outputs, replicated to every process, feed the task's host-side evaluator (a new
  one unless ``evaluator`` is given)."""
  eval_step = eval_step or setup.jit_eval_step()
  evaluator = evaluator if evaluator is not None else setup.task.evaluator()
  batches = 0
  for local in setup.task.eval_data(split):
    evaluator.update(jax.device_get(eval_step(state.params, state.model_state,
                                              setup.global_batch(local))))
    batches += 1
  if not batches:
    raise ValueError(f"the eval split {split or setup.config.eval_split!r} is empty")
  return evaluator.result()


def check_batch(batch: dict, specs: list[dict]) -> None:
  """Raises a ValueError unless ``batch`` has every entry of one of the task's ``input_specs``
  with the same shape after the (per-host) batch axis."""
  for key in specs[0]:
    if key not in batch:
      raise ValueError(f"the data's batches lack {key!r} (they hold {sorted(batch)}); the task "
                       f"takes {sorted(specs[0])}")
  fits = lambda spec: all(np.shape(batch[k])[1:] == w.shape[1:] for k, w in spec.items())
  if any(fits(spec) for spec in specs):
    return
  unfit = [k for k in specs[0] if all(np.shape(batch[k])[1:] != s[k].shape[1:] for s in specs)]
  key = (unfit or list(specs[0]))[0]
  got = tuple(np.shape(batch[key]))
  takes = " or ".join(f"(batch, {', '.join(map(str, s[key].shape[1:]))})" for s in specs)
  raise ValueError(
      f"the data's {key!r} of shape {got} does not fit this model: it takes {takes}. Check "
      f"image_size and the preprocessing strings (pp_train, pp_eval).")


def _check_finite(loss: float, step: int, last_ckpt: int | None) -> None:
  if not np.isfinite(loss):
    where = f"step {last_ckpt}" if last_ckpt is not None else "none yet"
    raise NonFiniteLossError(
        f"the loss became {loss} at step {step}; stopped without writing a checkpoint from this "
        f"state (last good checkpoint: {where}). Lower the learning rate, raise the warm-up or "
        f"set optimizer.grad_clip_norm.")


def _shut_down(close, failing: bool) -> None:
  """Runs one clean-up; while another error is on its way out, a failing clean-up (say a log
  that cannot be flushed to a full disk) is logged instead of replacing that error."""
  if not failing:
    close()
    return
  try:
    close()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("while stopping: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)


def _few_shot_evaluator(setup: Setup) -> Any:
  """The run's few-shot evaluator (``config.few_shot``; its options, model and datasets checked
  now), or None without few-shot datasets (or a config saved before they existed)."""
  if not (setup.config.get("few_shot") or {}).get("datasets"):
    return None
  from vit_jax import few_shot  # pylint: disable=g-import-not-at-top  (it imports this module)
  return few_shot.FewShotEvaluator(setup)


def _run_few_shot(evaluator: Any, state: TrainState, step: int, writer: MetricsWriter) -> dict:
  from vit_jax import few_shot  # pylint: disable=g-import-not-at-top
  metrics = few_shot.metrics(evaluator.run(state))
  writer.write(step, metrics)
  writer.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  return metrics


def train_and_evaluate(config: Any, workdir: str, devices: Sequence[jax.Device] | None = None
                       ) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its last checkpoint. Returns the final eval.

  ``devices``: the mesh's devices (default: every device of every process). A
  ``config.pretrained`` of "train:configs/NAME.py[:ARG]" trains that stage first
  (``vit_jax.train.stages``)."""
  with workdir_lock.hold(workdir):
    return _train_and_evaluate(config, workdir, devices)


def _train_and_evaluate(config: Any, workdir: str, devices: Sequence[jax.Device] | None) -> dict:
  config = stages.run_stages(config, workdir, lambda c, w: train_and_evaluate(c, w, devices),
                             has_checkpoint)
  setup = make_setup(config, devices)
  few_shot = _few_shot_evaluator(setup)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  writer = MetricsWriter(workdir, total_steps=config.total_steps, batch_size=config.batch_size)
  # The data is opened before the state is built, so that a bad dataset or preprocessing
  # string fails in seconds rather than after compiling.
  start = ckpt.latest_step() or 0
  batches: Iterator[dict] = setup.task.train_data(start)
  first = next(batches)
  check_batch(first, setup.task.input_specs(config.batch_size))
  batches = itertools.chain([first], batches)
  state = restore_or_init(setup, ckpt)
  if int(jax.device_get(state.step)) != start:
    start = int(jax.device_get(state.step))
    batches = setup.task.train_data(start)
  train_step, eval_step = setup.jit_train_step(), setup.jit_eval_step()
  check_state = jax.jit(all_finite)
  last_ckpt = ckpt.latest_step()
  if start:
    writer.log(f"resumed from step {start} in {workdir}")
  writer.start_clock(start)
  guard = PreemptionGuard()
  final, few_shot_metrics, failing = {}, {}, True
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
        final = evaluate(setup, state, eval_step)
        writer.write(step, {f"eval/{k}": v for k, v in final.items()})
        writer.log(f"step {step}: eval {setup.task.format_metrics(final)}")
      if few_shot and (step % (config.few_shot.every or config.eval_every) == 0 or last):
        few_shot_metrics = _run_few_shot(few_shot, state, step, writer)
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
        failing = False
        return {"step": step, "preempted": True}
    if not final:  # resumed at the end: evaluate what is there
      final = evaluate(setup, state, eval_step)
    if few_shot and not few_shot_metrics:
      few_shot_metrics = _run_few_shot(few_shot, state, config.total_steps, writer)
    failing = False
  except OSError as e:
    if disk_space.is_disk_full(e):
      raise disk_space.DiskFullError(
          f"no space left on device writing {e.filename or 'to ' + workdir}. "
          f"{ckpt.last_complete_note()} Free some space (or point --workdir elsewhere) and run "
          "the same command to resume.") from None
    raise
  finally:
    for close in (guard.close, ckpt.wait, ckpt.close, writer.close):
      _shut_down(close, failing)
  final = {"step": config.total_steps, **final, **few_shot_metrics}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  return final
