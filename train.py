"""Train a model: python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

Re-running the same command resumes from the last checkpoint in DIR.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from vit_jax.train import trainer
  try:
    final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, trainer.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"final: top-1 {final['top1']:.4f}, top-5 {final['top5']:.4f}, loss {final['loss']:.4f} "
        f"on {final['examples']} held-out images (written to {_WORKDIR.value}/final_metrics.json)")


if __name__ == "__main__":
  from vit_jax.command_line import parse_flags
  app.run(main, flags_parser=parse_flags)
