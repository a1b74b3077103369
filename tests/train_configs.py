"""Tiny configs for the training tests (derived from configs/default.py), and configs parsed as
train.py parses them."""

import os

from absl import flags
from ml_collections import config_flags

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_like_train_py(spec: str, overrides=()):
  """The config ``train.py --config=SPEC OVERRIDES...`` builds (``spec`` relative to the
  repository, e.g. ``configs/default.py:ARG``)."""
  argv = ["train.py", f"--config={os.path.join(ROOT, spec)}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def tiny_config(**overrides):
  """A 2-layer width-32 ViT on the digits that trains in seconds."""
  c = default.get_config()
  c.model.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  c.batch_size = 32
  c.eval_batch_size = 80
  c.total_steps = 10
  c.log_every = 5
  c.eval_every = 10
  c.checkpoint_every = 5
  c.schedule.warmup_steps = 2
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c
