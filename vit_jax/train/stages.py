"""A run that starts from another run: ``config.pretrained = "train:configs/NAME.py[:ARG]"``.

``trainer.train_and_evaluate`` (so train.py) first trains that config in ``WORKDIR/pretrain`` (resuming it like any run), then starts
this run from its checkpoint, so a recipe with a pre-training stage is still one command. Once
this run has a checkpoint of its own, the stage is not looked at again.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any, Callable

PREFIX = "train:"
STAGE_DIR = "pretrain"


def load_config(spec: str) -> Any:
  """``configs/NAME.py[:ARG]`` (relative to the working directory or to the repository) ->
  the config its ``get_config(ARG)`` returns."""
  path, _, arg = spec.partition(":")
  candidates = [path, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise ValueError(f"pretrained {PREFIX}{spec}: no config file {path!r} (give "
                     f"'{PREFIX}configs/NAME.py[:ARG]')")
  module_spec = importlib.util.spec_from_file_location("_stage_config", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def run_stages(config: Any, workdir: str, train: Callable[[Any, str], Any],
               has_checkpoint: Callable[[str], bool]) -> Any:
  """``config`` itself, or, when ``config.pretrained`` names a stage, a copy pointing at the
  stage's workdir, after training the stage there if this run has not started.
  ``train(config, workdir)`` trains a run; ``has_checkpoint(workdir)`` tells whether a run has
  started."""
  pretrained = config.pretrained or ""
  if not pretrained.startswith(PREFIX):
    return config
  stage_dir = os.path.join(workdir, STAGE_DIR)
  if not has_checkpoint(workdir):
    print(f"stage 1: training {pretrained[len(PREFIX):]} in {stage_dir}", flush=True)
    train(load_config(pretrained[len(PREFIX):]), stage_dir)
    print(f"stage 2: training from {stage_dir}", flush=True)
  config = copy.deepcopy(config)
  config.pretrained = stage_dir
  return config
