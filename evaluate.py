"""Evaluate a checkpoint: python evaluate.py --config configs/NAME.py --workdir DIR [--checkpoint PATH] [--split S]

Evaluates the latest checkpoint in DIR (or the checkpoint directory PATH, e.g. DIR/checkpoints/3000), prints
the task's metrics (classification: top-1, top-5 and loss; detection: COCO's 12 AP/AR figures) and writes them
as JSON (DIR/eval_<split>_<step>.json, or --output). Detection: --detections FILE also writes the detections
in COCO results format.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import command_line  # imports no JAX: the process is set up in __main__ first

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file the checkpoint was trained with.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is evaluated).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoint step directory, e.g. DIR/checkpoints/3000.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval_split).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON (default: in the workdir).")
_DETECTIONS = flags.DEFINE_string("detections", None,
                                  "Detection: write the detections here in COCO results format.")
command_line.define_process_flags()  # --xla_preset, --host_memory, --fake_devices, --cpu_matmul
flags.mark_flag_as_required("config")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if len(argv) > 1:
    command_line.usage_error(f"unexpected arguments {argv[1:]}: evaluate.py takes only flags")
  from vit_jax.train import checkpointing, trainer
  if not _WORKDIR.value and not _CHECKPOINT.value:
    command_line.usage_error("give --workdir (latest checkpoint) or --checkpoint PATH")
  try:
    directory, step, out_dir = checkpointing.locate(_WORKDIR.value, _CHECKPOINT.value)
    setup = trainer.make_setup(_CONFIG.value)
    state, meta = checkpointing.restore_for_reading(directory, step, setup.sharded_abstract_state(),
                                                    setup.task.signature())
    split = _SPLIT.value or _CONFIG.value.eval_split
    evaluator = setup.task.evaluator()
    if _DETECTIONS.value and not hasattr(evaluator, "results_json"):
      raise ValueError(f"--detections: the {_CONFIG.value.task} task writes no detections")
    result = trainer.evaluate(setup, state, split=split, evaluator=evaluator)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  result = {"step": meta["step"], "split": split, **result}
  print(f"step {result['step']} {split}: {setup.task.format_metrics(result)}")
  if hasattr(setup.task, "table"):
    print(setup.task.table(result))
  if _DETECTIONS.value:
    with open(_DETECTIONS.value, "w") as f:
      json.dump(evaluator.results_json(), f)
    print(f"detections written to {_DETECTIONS.value}")
  output = _OUTPUT.value or os.path.join(out_dir, f"eval_{split}_{result['step']}.json")
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  print(f"written to {output}")


if __name__ == "__main__":
  command_line.prepare_process(sys.argv)  # before JAX starts; may re-execute this program
  app.run(main, flags_parser=command_line.parse_flags)
