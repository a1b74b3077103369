"""Train a model: python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

Re-running the same command resumes from the last checkpoint in DIR.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _argv_value(name: str) -> str | None:
  """The value of ``--name=V`` or ``--name V`` in sys.argv, before absl parses the flags."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return None


def _prepare_process() -> None:
  # glibc reads its tunables at process start (host_memory may re-execute this program) and XLA
  # reads XLA_FLAGS (the preset, the host device count) at the first jax import.
  from vit_jax import host_memory, xla_presets

  policy = _argv_value("host_memory") or "hugepages"
  if policy not in host_memory.POLICIES:
    sys.exit(f"--host_memory {policy!r} is not one of {list(host_memory.POLICIES)}")
  host_memory.apply(policy)
  fake_devices = _argv_value("fake_devices")
  if fake_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={int(fake_devices)}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
  preset = _argv_value("xla_preset") or "cpu"
  if preset not in xla_presets.PRESETS:
    sys.exit(f"--xla_preset {preset!r} is not one of {sorted(xla_presets.PRESETS)}")
  xla_presets.apply(preset)


_prepare_process()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vit_jax import host_memory, xla_presets  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step for the mesh without data and "
                             "print per-device memory, FLOPs and shardings; trains nothing.")
flags.DEFINE_enum("xla_preset", "cpu", sorted(xla_presets.PRESETS),
                  "XLA flags preset (vit_jax/xla_presets.py); 'cpu' touches only the CPU backend.")
flags.DEFINE_enum("host_memory", "hugepages", list(host_memory.POLICIES),
                  "hugepages: back the large blocks XLA allocates at every step with transparent huge pages "
                  "(restarts the process with a glibc tunable; vit_jax/host_memory.py). release: glibc's "
                  "defaults.")
_FAKE_DEVICES = flags.DEFINE_integer("fake_devices", None, "With --dry_run: this many fake CPU devices.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "explicit", "none"],
                                 "Multi-process start: auto-detect Cloud TPU / SLURM, explicit flags, or none.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flag_as_required("config")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DRY_RUN.value:
    from vit_jax.train import dry_run
    try:
      print(dry_run.format_report(dry_run.dry_run(_CONFIG.value)))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  from vit_jax.train import distributed, trainer
  try:
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, trainer.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if final.get("preempted"):
    return
  print(f"final: top-1 {final['top1']:.4f}, top-5 {final['top5']:.4f}, loss {final['loss']:.4f} "
        f"on {final['examples']} held-out images (written to {_WORKDIR.value}/final_metrics.json)")


if __name__ == "__main__":
  from vit_jax.command_line import parse_flags
  app.run(main, flags_parser=parse_flags)
