"""Train a model: python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

Re-running the same command resumes from the last checkpoint in DIR.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import command_line  # imports no JAX: the process is set up in __main__ first

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step for the mesh without data and "
                             "print per-device memory, FLOPs and shardings; trains nothing.")
command_line.define_process_flags()  # --xla_preset, --host_memory, --fake_devices, --cpu_matmul
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "explicit", "none"],
                                 "Multi-process start: auto-detect Cloud TPU / SLURM, explicit flags, or none.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout", 60, "Multi-process runs: a process silent for half this many seconds counts as "
    "dead and the others exit with an error naming it (instead of waiting in a collective); JAX's "
    "own heartbeat ends them at the full timeout.")
flags.mark_flag_as_required("config")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if len(argv) > 1:
    command_line.usage_error(f"unexpected arguments {argv[1:]}: train.py takes only flags "
                             "(--config, --workdir, --config.KEY=VALUE, ...)")
  if _DRY_RUN.value:
    from vit_jax.train import dry_run
    try:
      print(dry_run.format_report(dry_run.dry_run(_CONFIG.value)))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    return
  if not _WORKDIR.value:
    command_line.usage_error("--workdir is required (except with --dry_run)")
  from vit_jax.train import disk_space, distributed, peer_watch, trainer
  disk_space.report_once()
  try:
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value, _PEER_TIMEOUT.value)
    watch = peer_watch.PeerWatch(_PEER_TIMEOUT.value).start()
    try:
      final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Exception as e:  # pylint: disable=broad-except
      if peer_watch.lost_peer(e):
        peer_watch.end("a collective failed because another process of the run went away ("
                       + (str(e).strip().splitlines() or [""])[0][:200] + ")")
      raise
    finally:
      watch.stop()
  except (ValueError, trainer.NonFiniteLossError, disk_space.DiskFullError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if final.get("preempted"):
    return
  from vit_jax import tasks
  summary = tasks.create(_CONFIG.value).format_metrics(final)
  print(f"final: {summary} (written to {_WORKDIR.value}/final_metrics.json)")


if __name__ == "__main__":
  command_line.prepare_process(sys.argv)  # before JAX starts; may re-execute this program
  app.run(main, flags_parser=command_line.parse_flags)
