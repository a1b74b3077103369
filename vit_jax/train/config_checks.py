"""The run's scalar config values checked before anything is built, each with a clear message.

The schema (configs/base.py) fixes each key's type; these checks add the ranges and the
relations between keys that a wrong value would otherwise turn into a traceback (a modulo by
zero at the first logging step) or a silent no-op (a run of zero steps); a warm-up longer than
the run is only warned about (shortened smoke runs of a recipe have one).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

_POSITIVE = ("batch_size", "eval_batch_size", "total_steps", "log_every", "eval_every",
             "checkpoint_every", "keep_checkpoints", "num_classes", "grad_accum_steps")


def check_config(config: Any) -> None:
  """Raises a ValueError naming the first value out of range and what would be valid."""
  for key in _POSITIVE:
    if key in config and config[key] is not None and config[key] < 1:
      raise ValueError(f"config.{key} must be a positive integer, got {config[key]}")
  if not config.lr > 0:
    raise ValueError(f"config.lr must be a positive learning rate, got {config.lr}")
  size = config.image_size
  sides = size if isinstance(size, (tuple, list)) else (size,)
  if not sides or any(not isinstance(s, int) or s < 1 for s in sides):
    raise ValueError(f"config.image_size must be a positive int or a (height, width) pair, got {size!r}")
  warmup = config.schedule.get("warmup_steps") or 0
  if warmup < 0:
    raise ValueError(f"config.schedule.warmup_steps must be >= 0, got {warmup}")
  if warmup >= config.total_steps:
    # Refusing it would also refuse every shortened smoke run of a recipe; say it instead.
    logging.warning("config.schedule.warmup_steps=%d >= total_steps=%d: the learning rate never "
                    "reaches config.lr=%g in this run", warmup, config.total_steps, config.lr)
  if (config.optimizer.get("grad_clip_norm") or 0) < 0:
    raise ValueError(f"config.optimizer.grad_clip_norm must be >= 0 (0 or None: no clipping), "
                     f"got {config.optimizer.grad_clip_norm}")
  if (config.optimizer.get("weight_decay") or 0) < 0:
    raise ValueError(f"config.optimizer.weight_decay must be >= 0, got {config.optimizer.weight_decay}")
  pretrained = config.get("pretrained") or ""
  if pretrained and not pretrained.startswith("train:") and "://" not in pretrained \
      and not os.path.exists(pretrained):
    raise ValueError(f"config.pretrained {pretrained!r}: no such file or directory (a released "
                     ".npz, a timm/torch file, a trainer workdir or checkpoint, or "
                     "'train:configs/NAME.py[:ARG]' for a stage this run trains first)")
