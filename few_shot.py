"""Few-shot linear evaluation of a checkpoint: python few_shot.py --config configs/NAME.py --workdir DIR [--checkpoint PATH]

Restores the latest checkpoint in DIR (or the checkpoint directory PATH, e.g. DIR/checkpoints/3000), fits
a linear classifier in closed form to k examples per class of the frozen pre-logits features, for every
dataset of config.few_shot.datasets and k of config.few_shot.shots, and prints the test accuracies (mean ±
std over config.few_shot.seeds) as a table; writes them as JSON (DIR/fewshot_<step>.json, or --output).
For example: --config.few_shot.datasets="('sklearn_digits:train:test',)" --config.few_shot.shots="(1, 5)"
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
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON (default: in the workdir).")
command_line.define_process_flags()  # --xla_preset, --host_memory, --fake_devices, --cpu_matmul
flags.mark_flag_as_required("config")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if len(argv) > 1:
    command_line.usage_error(f"unexpected arguments {argv[1:]}: few_shot.py takes only flags")
  from vit_jax import few_shot
  from vit_jax.train import checkpointing, trainer
  if not _WORKDIR.value and not _CHECKPOINT.value:
    command_line.usage_error("give --workdir (latest checkpoint) or --checkpoint PATH")
  try:
    directory, step, out_dir = checkpointing.locate(_WORKDIR.value, _CHECKPOINT.value)
    if not _CONFIG.value.few_shot.datasets:
      raise ValueError("config.few_shot.datasets is empty: name the datasets, e.g. "
                       "--config.few_shot.datasets=\"('sklearn_digits:train:test',)\"")
    setup = trainer.make_setup(_CONFIG.value)
    evaluator = few_shot.FewShotEvaluator(setup)
    state, meta = checkpointing.restore_for_reading(directory, step, setup.sharded_abstract_state(),
                                                    setup.task.signature())
    results = evaluator.run(state)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"step {meta['step']}: few-shot accuracy (mean ± std over {_CONFIG.value.few_shot.seeds} seeds)")
  print(few_shot.format_table(results))
  output = _OUTPUT.value or os.path.join(out_dir, f"fewshot_{meta['step']}.json")
  with open(output, "w") as f:
    json.dump({"step": meta["step"], **few_shot.as_json(results)}, f, indent=2)
  print(f"written to {output}")


if __name__ == "__main__":
  command_line.prepare_process(sys.argv)  # before JAX starts; may re-execute this program
  app.run(main, flags_parser=command_line.parse_flags)
