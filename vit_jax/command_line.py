"""What train.py, evaluate.py and predict.py share: the process set-up before JAX starts, and flag parsing.

Every script does the same three things, and imports no JAX at module level::

  command_line.define_process_flags()          # at import: the process flags

  if __name__ == "__main__":
    command_line.prepare_process(sys.argv)     # host memory, fake devices, XLA flags; may re-execute
    app.run(main, flags_parser=command_line.parse_flags)

(predict.py, whose own options argparse reads, parses with ``known_only=True`` and hands the rest
on.) Importing a script therefore sets nothing up and never re-executes anything.

``prepare_process`` reads the process flags from ``argv`` itself, before absl parses anything:
glibc reads its tunables only at process start (``vit_jax/host_memory.py`` re-executes the
program with one) and XLA reads ``XLA_FLAGS`` at the first ``import jax``, which loading a config
file or a model may do. absl then parses the same flags as usual (so ``--help`` lists them), and
``parse_flags`` checks that what it parsed is what was applied.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import textwrap
from typing import Callable, Sequence

from absl import flags

from vit_jax import host_memory, kernels, xla_presets  # none imports JAX

# Flags defined by define_process_flags() belong to the script that calls it (its --help lists them).
flags.disclaim_key_flags()

PROCESS_FLAGS = ("xla_preset", "host_memory", "fake_devices", "cpu_matmul")
DEFAULT_XLA_PRESET = "cpu"
DEFAULT_HOST_MEMORY = "hugepages"
DEFAULT_CPU_MATMUL = "xla"

_applied: dict[str, object] | None = None  # the process flags prepare_process applied in this process


def define_process_flags() -> None:
  """Defines the absl flags --xla_preset, --host_memory and --fake_devices (once per process)."""
  if PROCESS_FLAGS[0] in flags.FLAGS:
    return
  flags.DEFINE_enum(
      "xla_preset", DEFAULT_XLA_PRESET, sorted(xla_presets.PRESETS),
      "XLA flags preset, set before JAX starts (vit_jax/xla_presets.py); 'cpu' touches only the CPU "
      "backend, 'none' keeps XLA's defaults (measured: docs/benchmarks.md).")
  flags.DEFINE_enum(
      "host_memory", DEFAULT_HOST_MEMORY, list(host_memory.POLICIES),
      "hugepages: back the large blocks XLA allocates at every step with transparent huge pages; "
      "keep: huge pages, and freed memory stays in the process (the fastest step; the resident "
      "set does not shrink); release: glibc's defaults. Restarts the process with glibc tunables "
      "(vit_jax/host_memory.py; measured: docs/benchmarks.md).")
  flags.DEFINE_enum(
      "cpu_matmul", DEFAULT_CPU_MATMUL, list(kernels.CPU_MATMUL_CHOICES),
      "Who computes float32 matrix products on a single CPU device: xla (its own kernels), mkl "
      "(`pip install mkl`) or openblas (numpy's), through vit_jax/kernels/cpu_gemm.cc, built once "
      "with g++ (vit_jax/kernels/blas.py; measured: docs/benchmarks.md).")
  flags.DEFINE_integer(
      "fake_devices", None,
      "Run on this many fake CPU devices (sets JAX_PLATFORMS=cpu and XLA's host platform device "
      "count), e.g. to compile a mesh with train.py --dry_run.", lower_bound=1)


def _argv_value(argv: Sequence[str], name: str) -> str | None:
  """The value of ``--name=V`` or ``--name V`` (or one dash) in argv, as absl will read it (the
  last one given; nothing after ``--``); None when absent."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    for prefix in (f"--{name}", f"-{name}"):
      if arg.startswith(prefix + "="):
        value = arg.split("=", 1)[1]
      elif arg == prefix and i + 1 < len(argv):
        value = argv[i + 1]
  return value


def usage_error(message: str) -> None:
  """One ``error:`` line and exit code 2 (absl's UsageError would print the whole help first)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def prepare_process(argv: Sequence[str]) -> None:
  """Applies the process flags in ``argv`` (``sys.argv``) before JAX's first import.

  In order: the host memory policy (``hugepages`` and ``keep`` re-execute the program with glibc
  tunables, once; see vit_jax/host_memory.py), ``--fake_devices`` (``JAX_PLATFORMS=cpu`` and
  XLA's host device count), the XLA preset (``XLA_FLAGS``) and ``--cpu_matmul``
  (``VIT_JAX_CPU_MATMUL``, read by vit_jax/kernels/blas.py). Also quiets TensorFlow's C++
  logging. A bad value exits with status 2 and a one-line message, before anything is applied.
  """
  global _applied
  if "jax" in sys.modules:
    raise RuntimeError("prepare_process must run before jax is imported")
  policy = _argv_value(argv, "host_memory")
  policy = DEFAULT_HOST_MEMORY if policy is None else policy
  preset = _argv_value(argv, "xla_preset")
  preset = DEFAULT_XLA_PRESET if preset is None else preset
  fake_devices = _argv_value(argv, "fake_devices")
  cpu_matmul = _argv_value(argv, "cpu_matmul")
  cpu_matmul = DEFAULT_CPU_MATMUL if cpu_matmul is None else cpu_matmul
  problem = kernels.cpu_matmul_problem(cpu_matmul)
  if problem is not None:
    usage_error(problem)
  if policy not in host_memory.POLICIES:
    usage_error(f"--host_memory {policy!r} is not one of {list(host_memory.POLICIES)}")
  if preset not in xla_presets.PRESETS:
    usage_error(f"--xla_preset {preset!r} is not one of {sorted(xla_presets.PRESETS)}")
  if fake_devices is not None:
    try:
      fake_devices = int(fake_devices)
    except ValueError:
      fake_devices = 0
    if fake_devices < 1:
      usage_error(f"--fake_devices {_argv_value(argv, 'fake_devices')!r} is not a positive integer")

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  host_memory.apply(policy)  # may replace this process with a new one that starts over
  if fake_devices is not None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={fake_devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
  xla_presets.apply(preset)
  os.environ[kernels.CPU_MATMUL_ENV] = cpu_matmul  # read by vit_jax.kernels.blas at import
  _applied = {"xla_preset": preset, "host_memory": policy, "fake_devices": fake_devices,
              "cpu_matmul": cpu_matmul}


def process_flags_help() -> str:
  """The process flags' help text, for a script that parses its own options with argparse."""
  define_process_flags()
  lines = ["process flags (applied before JAX starts; the same in train.py and evaluate.py):"]
  for name in PROCESS_FLAGS:
    flag = flags.FLAGS[name]
    values = getattr(flag.parser, "enum_values", None)
    lines.append(f"  --{name} {'{' + ','.join(values) + '}' if values else 'N'}")
    text = re.sub(r"^<[^>]*>: ", "", flag.help)  # absl puts an enum's values before its help
    lines += textwrap.wrap(f"{text} (default: {flag.default if flag.default is not None else 'none'})",
                           92, initial_indent=" " * 6, subsequent_indent=" " * 6)
  return "\n".join(lines)


def _config_keys(argv: list[str]) -> list[str]:
  """Dotted keys of the config named by --config (best effort, for the error message)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv:
    spec = argv[argv.index("--config") + 1]
  if not spec:
    return []
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
  except Exception:  # noqa: BLE001 - only feeds the message
    return []

  def walk(c, prefix=""):
    for k, v in c.items():
      if hasattr(v, "items"):
        yield from walk(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}"
  return sorted(walk(config))


def parse_flags(argv: list[str], known_only: bool = False) -> list[str]:
  """absl's parser, turning an unknown ``--config.KEY`` into a one-line error and exit code 2.

  ``known_only``: leave flags absl does not know in the returned arguments (for a script that
  parses its own options after absl, as predict.py). After ``prepare_process``, a process flag
  whose parsed value differs from the applied one (set in a ``--flagfile``) is an error too.
  """
  try:
    rest = flags.FLAGS(argv, known_only=known_only)
  except (AttributeError, KeyError, flags.Error) as e:
    match = re.search(r"'([^']+)'", str(e))
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    if isinstance(e, (AttributeError, KeyError)) and bad:
      name = match.group(1) if match else str(e)
      keys = _config_keys(argv)
      print(f"error: unknown config key {name!r} in {' '.join(bad)}. Valid keys: {', '.join(keys)}",
            file=sys.stderr)
    elif "Traceback (most recent call last)" in str(e):  # ml_collections: a config file that raised
      flag = str(e).split(": ", 1)[0].removeprefix("flag ")
      last = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
      print(f"error: {flag}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}", file=sys.stderr)
    else:
      print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if "config" in flags.FLAGS and flags.FLAGS["config"].present:
    _load_config(flags.FLAGS["config"])
  for name, value in (_applied or {}).items():
    if name in flags.FLAGS and flags.FLAGS[name].value != value:
      usage_error(f"--{name} is applied before flags are parsed: give it on the command line, "
                   "not in a --flagfile")
  return rest


def _load_config(flag) -> None:
  """Loads ``--config FILE[:ARG]`` now (ml_collections loads it lazily, inside ``main``), so a
  missing file or a refused argument is one line and exit code 2, not a traceback."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top  (train.py's, evaluate.py's)
  path = config_flags.get_config_filename(flag).partition(":")[0]
  if path and not os.path.exists(path):
    configs = sorted(f"configs/{n}" for n in os.listdir("configs") if n.endswith(".py")
                     and not n.startswith("_")) if os.path.isdir("configs") else []
    usage_error(f"--config file {path!r} does not exist" + (f"; the configs here: {', '.join(configs)}"
                                                            if configs else ""))
  try:
    flag.value  # pylint: disable=pointless-statement  (loads the file, applies the overrides)
  except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:
    usage_error(f"--config {path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")


# Command lines with their own argparse options beside the process flags (predict.py, visualize.py).
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def exit_code(run: Callable[[list[str]], object], argv: list[str]) -> int:
  """``run(argv)``; a ValueError or FileNotFoundError becomes one ``error: ...`` line and 1."""
  try:
    run(argv)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def run_argparse_script(main: Callable[[list[str]], int],
                        parse_args: Callable[[list[str]], object]) -> None:
  """The ``__main__`` of such a script: the process set-up (before JAX starts; may re-execute
  the program), absl parsing the process flags, ``parse_args`` the script's own options (and
  --help), then ``main`` on what absl left, with the libraries' INFO lines off."""
  from absl import app, logging  # pylint: disable=g-import-not-at-top

  def flags_parser(argv: list[str]) -> list[str]:
    if any(a in HELP_FLAGS for a in argv[1:]):
      parse_args(["--help"])  # prints the options and the process flags, and exits
    return parse_flags(argv, known_only=True)

  def run(argv: list[str]) -> int:
    logging.set_verbosity(logging.WARNING)
    return main(argv[1:])  # argv: the program, then what absl left

  prepare_process(sys.argv)
  app.run(run, flags_parser=flags_parser)
