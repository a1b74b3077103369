"""The JAX workloads the benchmark scripts time: a jitted forward pass and the trainer's real step.

Import this only after ``harness.apply_xla_preset`` (it imports jax).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from harness import parse_options  # noqa: F401  (re-exported)
from vit_jax import flops, models
from vit_jax.tasks.base import model_kwargs


def random_images(batch: int, image_size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, image_size, image_size, channels)).astype(np.float32)


def memory_bytes(compiled: Any) -> dict[str, int]:
  """Device memory of a compiled step: XLA's static analysis, plus the allocator's peak where the
  device reports one (GPU, TPU; not the CPU)."""
  out: dict[str, int] = {}
  try:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}
    out["static_peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                                + out["temp_bytes"])
  except Exception:  # noqa: BLE001  (not every backend implements it)
    pass
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return out


def jax_forward(name: str, *, batch: int, image_size: int = 224, num_classes: int = 1000,
                options: dict[str, Any] | None = None) -> tuple[Callable[[], Any], dict[str, Any]]:
  """A no-argument callable running one jitted forward pass to completion, and build facts."""
  options = dict(options or {})
  model = models.create(name, num_classes=num_classes, image_size=image_size, **options)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  images = jax.device_put(random_images(batch, image_size, options.get("channels", 3)))
  t = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - t
  info = {"compile_s": compile_s, "memory": memory_bytes(compiled),
          "forward_flops_per_image": flops.forward_flops(name, image_size, num_classes, **options)}
  return lambda: compiled(params, images).block_until_ready(), info


def trainer_config(name: str, *, batch_size: int, image_size: int = 224, num_classes: int = 1000,
                   options: dict[str, Any] | None = None, mesh: str | None = None,
                   grad_clip_norm: float | None = None, label_smoothing: float = 0.0) -> Any:
  """The default config turned into a ``name`` run on synthetic data of this shape (AdamW)."""
  from configs import base, default

  c = default.get_config()
  c.model = base.model_block(name=name, **(options or {}))
  c.image_size, c.num_classes = image_size, num_classes
  c.batch_size = c.eval_batch_size = batch_size
  c.total_steps = 10_000
  c.label_smoothing, c.mixup_alpha = label_smoothing, 0.0
  c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip_norm=grad_clip_norm)
  c.optimizer.adamw.update(b1=0.9, b2=0.999)
  if mesh:
    c.mesh = mesh  # a preset or sizes such as "data=2,fsdp=-1" (vit_jax.train.sharding)
  return c


def jax_train_step(config: Any, batch: dict[str, np.ndarray] | None = None
                   ) -> tuple[Callable[[], Any], dict[str, Any]]:
  """The trainer's own jitted step (``trainer.make_setup``) on one batch already placed on the
  devices: ``batch`` (the task's keys are kept), or a synthetic classification batch; returns a
  callable running one step to completion, and build facts."""
  from vit_jax.train import trainer

  setup = trainer.make_setup(config)
  state = setup.init_state()
  if batch is None:
    rng = np.random.default_rng(0)
    channels = config.model.channels or 3
    labels = np.eye(config.num_classes, dtype=np.float32)[rng.integers(0, config.num_classes, config.batch_size)]
    batch = {"image": random_images(config.batch_size, config.image_size, channels), "labels": labels}
  keys = setup.task.input_spec(1)
  batch = setup.global_batch({k: v for k, v in batch.items() if k in keys})
  t = time.perf_counter()
  compiled = setup.jit_train_step().lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  holder = [state]

  def run() -> None:
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics["loss"])

  options = model_kwargs(config)
  info = {"compile_s": compile_s, "memory": memory_bytes(compiled), "num_devices": setup.mesh.size,
          "mesh": dict(zip(setup.mesh.axis_names, setup.mesh.devices.shape)),
          "train_flops_per_image": flops.train_flops(config.model.name, config.image_size,
                                                     config.num_classes, **options)}
  return run, info


def device_kind() -> str:
  d = jax.local_devices()[0]
  return f"{d.platform}:{d.device_kind}"
