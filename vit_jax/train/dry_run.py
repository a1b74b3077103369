"""Dry run: compile the configured train step for the mesh, with no data, and report per device
memory (parameters, optimizer state, temporaries), FLOPs per step and how parameters are sharded.

Compiled on CPU the memory figures are estimates for TPU/GPU: layouts, fusion and the
allocator differ by backend.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from vit_jax import flops
from vit_jax.train import sharding
from vit_jax.tasks.base import model_kwargs
from vit_jax.train.trainer import make_setup


def per_device_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of ``abstract`` under ``shardings`` (the most loaded device)."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
  return total


def dry_run(config: Any) -> dict:
  """Compiles the train step and returns the report (also printed by ``format_report``)."""
  t0 = time.time()
  setup = make_setup(config)
  state = setup.sharded_abstract_state()
  batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=setup.batch_sharding),
                       setup.task.input_spec(config.batch_size))
  compiled = setup.jit_train_step().lower(state, batch).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  params = per_device_bytes(setup.abstract_state.params, setup.shardings.params)
  opt = per_device_bytes(setup.abstract_state.opt_state, setup.shardings.opt_state)
  batch_bytes = per_device_bytes(batch, jax.tree.map(lambda _: setup.batch_sharding, batch))
  temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
  hw = tuple(batch["image"].shape[1:3]) if "image" in batch else None  # the compiled size
  image_size = config.image_size if hw in (None, (config.image_size,) * 2) else hw
  step_flops = config.batch_size * flops.train_flops(
      config.model.name, image_size=image_size, num_classes=config.num_classes, **model_kwargs(config))
  rows = sharding.describe(setup.shardings.params, setup.abstract_state.params)
  return {
      "model": config.model.name, "mesh": dict(setup.mesh.shape), "devices": setup.mesh.size,
      "platform": jax.devices()[0].platform, "batch_size": config.batch_size,
      "param_bytes": params, "opt_state_bytes": opt, "batch_bytes": batch_bytes,
      "temp_bytes": temp, "total_bytes": params + opt + batch_bytes + temp,
      "train_flops_per_step": step_flops, "train_flops_per_device": step_flops // setup.mesh.size,
      "compile_seconds": compile_s, "param_shardings": rows,
  }


def _gib(b: int) -> str:
  return f"{b / 2**30:8.3f} GiB"


def format_report(r: dict, max_rows: int = 12) -> str:
  lines = [
      f"dry run: {r['model']}, batch {r['batch_size']}, mesh {r['mesh']} over {r['devices']} "
      f"{r['platform']} devices (compiled in {r['compile_seconds']:.1f} s)",
      "per device:",
      f"  parameters        {_gib(r['param_bytes'])}",
      f"  optimizer state   {_gib(r['opt_state_bytes'])}",
      f"  input batch       {_gib(r['batch_bytes'])}",
      f"  temporaries       {_gib(r['temp_bytes'])}   (activations, gradients; XLA memory analysis)",
      f"  total             {_gib(r['total_bytes'])}",
      f"FLOPs per step: {r['train_flops_per_step']:.3e} ({r['train_flops_per_device']:.3e} per device; "
      "analytic, 3x forward, remat recompute not counted)",
      "parameter shardings (path, shape, spec):",
  ]
  groups: dict[tuple, tuple] = {}
  for path, shape, spec in r["param_shardings"]:
    key = (_group(path), spec)
    groups.setdefault(key, (path, shape, 0))
    groups[key] = (groups[key][0], groups[key][1], groups[key][2] + 1)
  for i, ((_, spec), (path, shape, n)) in enumerate(groups.items()):
    if i == max_rows:
      lines.append(f"  ... {len(groups) - max_rows} more groups")
      break
    lines.append(f"  {path:<60s} {str(shape):<22s} {spec}" + (f"  (+{n - 1} alike)" if n > 1 else ""))
  if r["platform"] == "cpu":
    lines.append("note: compiled for CPU; memory figures are estimates for TPU/GPU.")
  return "\n".join(lines)


def _group(path: str) -> str:
  return "/".join(p for p in path.split("/") if not p.isdigit())
